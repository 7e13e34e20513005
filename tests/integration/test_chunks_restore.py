"""Restoring chunked generations into a running Docker application's volume: verify before
the swap, the application stopped only for the renames, never touched when the generation is
damaged; `--path` in place."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.chunkgen import build_chunked, corrupt, pack_files
from tests.conftest import agent_env, run_agent
from tests.forkserver import forked_run, killed_run
from tests.integration.test_restore import make_realistic_tree
from tests.trees import snapshot

pytestmark = pytest.mark.docker

GEN = "2026-11-28T02-00-00Z"


def push_env(app, tmp_path: Path, s3, mail=None) -> dict[str, str]:
    return {
        **agent_env(app, tmp_path / "handover", mail),
        **s3.env(),
        "DATA_FORMAT": "chunks",
        "LOG_PATHS": "",
    }


def test_a_file_changed_in_place_between_runs_restores_as_it_was_in_each(
    make_app, s3, tmp_path: Path
) -> None:
    app = make_app()
    db = app.data_dir / "db.bin"
    versions = [os.urandom(3 << 20)]
    db.write_bytes(versions[0])
    env = push_env(app, tmp_path, s3)
    assert run_agent(env, "source", "run").returncode == 0
    changed = bytearray(versions[0])
    changed[1 << 20 : (1 << 20) + 4096] = os.urandom(4096)
    with open(db, "r+b") as handle:  # in place: same inode, same size
        handle.seek(1 << 20)
        handle.write(changed[1 << 20 : (1 << 20) + 4096])
    versions.append(bytes(changed))
    assert run_agent(env, "source", "run").returncode == 0
    first, second = sorted(os.listdir(tmp_path / "store" / "data"))

    for gen, content in ((first, versions[0]), (second, versions[1])):
        out = tmp_path / f"out-{gen}"
        result = run_agent(
            env, "restore", "--from", "s3", "--generation", gen, "--target", str(out)
        )
        assert result.returncode == 0, result.stderr
        assert (out / str(app.data_dir).lstrip("/") / "db.bin").read_bytes() == content


@pytest.mark.parametrize("damage", ["corrupted", "deleted"])
def test_a_damaged_pack_is_refused_and_the_application_is_never_stopped(
    make_app, smtp_server, tmp_path: Path, damage: str
) -> None:
    app = make_app()
    make_realistic_tree(app.data_dir)
    build_chunked(tmp_path / "store", [app.data_dir], GEN)
    (app.data_dir / "db" / "PG_VERSION").write_text("17\n")  # what runs now
    now = snapshot(app.data_dir)
    started = app.started_at()
    damaged = max(pack_files(tmp_path / "store"), key=lambda p: p.stat().st_size)
    if damage == "corrupted":
        corrupt(damaged, at=damaged.stat().st_size // 2)
    else:
        damaged.unlink()

    result = run_agent(agent_env(app, tmp_path / "handover", smtp_server), "restore")

    assert result.returncode == 1
    assert damaged.stem in result.stderr
    assert app.reload() == "running" and app.started_at() == started
    assert snapshot(app.data_dir) == now
    assert not any(p.name.startswith(".backup-agent") for p in app.data_dir.iterdir())
    [mail] = smtp_server.wait_for(1)
    assert "fetch, verify and unpack" in mail.get_content()


def test_restore_path_in_place_replaces_one_file_and_leaves_the_rest(
    make_app, tmp_path: Path
) -> None:
    app = make_app()
    make_realistic_tree(app.data_dir)
    photo = app.data_dir / "uploads" / "photo one.jpg"
    original = photo.read_bytes()
    build_chunked(tmp_path / "store", [app.data_dir], GEN)
    photo.write_bytes(b"overwritten by mistake")
    (app.data_dir / "db" / "PG_VERSION").write_text("17\n")
    shutil.rmtree(app.data_dir / "empty")
    env = agent_env(app, tmp_path / "handover")

    result = run_agent(env, "restore", "--path", str(photo))
    assert result.returncode == 0, result.stderr
    assert photo.read_bytes() == original
    assert os.stat(photo).st_mtime_ns == 1_600_000_000_123_456_789
    assert (app.data_dir / "db" / "PG_VERSION").read_text() == "17\n", "another file changed"
    assert not (app.data_dir / "empty").exists()

    result = run_agent(env, "restore", "--path", str(app.data_dir / "empty"))
    assert result.returncode == 0, result.stderr
    assert (app.data_dir / "empty" / "nested-empty").is_dir()
    assert app.reload() == "running"
    assert not any(p.name.startswith(".backup-agent") for p in app.data_dir.iterdir())


def test_restore_path_keep_previous_keeps_the_replaced_file(make_app, tmp_path: Path) -> None:
    app = make_app()
    (app.data_dir / "config.yml").write_text("good: true\n")
    build_chunked(tmp_path / "store", [app.data_dir], GEN)
    (app.data_dir / "config.yml").write_text("good: false\n")
    env = agent_env(app, tmp_path / "handover")

    result = run_agent(
        env, "restore", "--path", str(app.data_dir / "config.yml"), "--keep-previous"
    )

    assert result.returncode == 0, result.stderr
    assert (app.data_dir / "config.yml").read_text() == "good: true\n"
    [kept] = (tmp_path / "handover" / ".replaced").iterdir()
    assert (kept / str(app.data_dir).lstrip("/") / "config.yml").read_text() == "good: false\n"


def test_restore_path_killed_at_any_point_ends_with_one_whole_version(
    make_app, tmp_path: Path
) -> None:
    """Killed before every file system change of a `restore --path` in turn, then repaired by
    `source reconcile`: the path holds the version before the restore or the restored one,
    never a mix, the rest of the data path is untouched and the application runs."""
    app = make_app()
    tree = app.data_dir / "tree"
    (tree / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/deep"):
        (tree / name).write_text(f"backed up {name}\n")
    (app.data_dir / "other").write_text("not restored\n")
    build_chunked(tmp_path / "store", [app.data_dir], GEN)
    backed_up = snapshot(tree)
    # Paused rather than stopped: the swap is what is tested, at some 75 points, and a pause
    # costs the Docker engine far less than a stop and a start (test_restore.py kills a
    # restore of a stopped application).
    env = agent_env(app, tmp_path / "handover", QUIESCE_MODE="pause")

    outcomes = []
    for point in range(1, 200):
        shutil.rmtree(tree)
        (tree / "sub").mkdir(parents=True)
        for name in ("a", "sub/deep", "only-current"):
            (tree / name).write_text(f"current {name}\n")
        current, other = snapshot(tree), snapshot(app.data_dir)[b"other"]
        run = killed_run(env, point, "restore", "--path", str(tree))
        if run.returncode != 0:
            assert run.returncode == -signal.SIGKILL, (point, run.stderr)
            assert forked_run(env, "source", "reconcile").returncode == 0, point
        now = snapshot(tree)
        assert now in (current, backed_up), point
        outcomes.append("restored" if now == backed_up else "previous")
        assert snapshot(app.data_dir)[b"other"] == other, point
        assert app.reload() == "running", point
        assert not any(p.name.startswith(".backup-agent") for p in app.data_dir.iterdir())
        if run.returncode == 0:
            break
    assert outcomes[-1] == "restored" and outcomes[0] == "previous", outcomes
    assert len(outcomes) > 10, "too few file system changes to kill at"
