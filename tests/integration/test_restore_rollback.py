"""A restore killed in its swap, and the rollback of it killed again — with real SIGKILLs, at
many points, any number of times — ends with the data path holding exactly one complete
version, byte for byte. Against a real application container and its named volume.

The kills are deterministic (tests.forkserver): the agent SIGKILLs itself just before its
N-th file system change, so "killed at point N" means the first N - 1 changes happened and no
other.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.swap.journal import REPLACED, STAGING
from tests.conftest import App, agent_env, run_agent
from tests.forkserver import killed_run
from tests.trees import snapshot

pytestmark = pytest.mark.docker

FILES = 2000  # top-level entries: one rename each, in every phase of the swap and rollback


def write_version(data: Path, name: str) -> None:
    """Every file of the data path rewritten as version `name`; some entries only in it."""
    for index in range(FILES):
        (data / f"f{index:04d}").write_text(f"{name} {index}\n")
    (data / "tree" / "sub").mkdir(parents=True, exist_ok=True)
    (data / "tree" / "sub" / "deep.txt").write_text(f"{name} deep\n")
    for index in range(50):
        (data / f"only-{name}-{index:02d}").write_text(name)


@dataclass
class Site:
    app: App
    env: dict[str, str]
    record: Path
    previous: dict  # the contents before the restore: what a rollback must bring back
    restored: dict  # the generation's contents

    def phase(self) -> str:
        return json.loads(self.record.read_text())["paths"][0]["phase"]

    def previous_split(self) -> bool:
        """Whether the previous contents are part back in the data path, part still aside
        (seen by the entries only the previous contents have)."""
        data = self.app.data_dir
        back = any(name.startswith("only-current-") for name in os.listdir(data))
        return back and (data / REPLACED).is_dir() and any((data / REPLACED).iterdir())


@pytest.fixture
def site(make_app, tmp_path) -> Site:
    app = make_app()
    write_version(app.data_dir, "backup")
    env = agent_env(app, tmp_path / "handover", LOG_PATHS="")
    assert run_agent(env, "source", "backup", timeout=300).returncode == 0
    restored = snapshot(app.data_dir)
    for index in range(50):
        os.unlink(app.data_dir / f"only-backup-{index:02d}")
    write_version(app.data_dir, "current")
    previous = snapshot(app.data_dir)
    assert previous != restored
    return Site(app, env, tmp_path / "handover" / ".state" / "restore.json", previous, restored)


ENTRIES = FILES + 51  # top-level entries of each version
# (the swap phase the restore is killed in, the how-many-th rename of that phase it dies at,
#  the points at which the rollbacks that follow are killed, one after the other)
SCENARIOS = [
    ("moving-in", ENTRIES // 2, [1]),
    ("moving-in", ENTRIES // 2, [2]),
    ("moving-in", ENTRIES // 2, [3]),
    ("moving-in", ENTRIES // 2, [ENTRIES // 4]),
    ("moving-in", ENTRIES // 2, [ENTRIES // 2 + 5]),
    ("moving-in", ENTRIES // 2, [ENTRIES // 2 + ENTRIES // 3]),
    ("moving-in", ENTRIES // 2, [ENTRIES + ENTRIES // 3, ENTRIES // 2]),
    ("moving-in", ENTRIES // 2, [ENTRIES + ENTRIES // 2, 7, ENTRIES // 3, 2]),
    ("moving-in", ENTRIES, [ENTRIES + ENTRIES // 2, ENTRIES // 4]),
    ("moving-in", 1, [ENTRIES // 2, ENTRIES // 3]),
    ("moving-aside", ENTRIES // 2, [ENTRIES // 4, ENTRIES // 8]),
    ("moving-aside", ENTRIES, [ENTRIES // 2, 1, ENTRIES // 4]),
]


def test_a_rollback_killed_at_many_points_any_number_of_times_loses_nothing(site):
    needles = {"moving-aside": f"/{REPLACED}/", "moving-in": f"/{STAGING}/"}
    split_kills = 0  # kills that left the previous contents half in, half aside
    for phase, at, rollback_kills in SCENARIOS:
        case = f"restore killed {phase} at {at}, rollbacks at {rollback_kills}"
        restore = killed_run(site.env, at, "restore", "--from", "handover", on=needles[phase])
        assert restore.returncode == -signal.SIGKILL, (case, restore.stderr)
        assert site.phase() == phase, case
        assert site.app.reload() != "running", case

        for point in rollback_kills:
            rollback = killed_run(site.env, point, "source", "reconcile")
            assert rollback.returncode == -signal.SIGKILL, (case, point, rollback.stderr)
            split_kills += site.previous_split()

        final = run_agent(site.env, "source", "reconcile", timeout=300)

        assert final.returncode == 0, (case, final.stderr)
        assert snapshot(site.app.data_dir) == site.previous, case
        assert not site.record.exists(), case
        assert site.app.reload() == "running", case
    assert split_kills >= 5, "too few kills landed while the previous contents moved back"
