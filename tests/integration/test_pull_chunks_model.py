"""A model-based test (hypothesis stateful) of chunked generations in pull mode: random
interleavings of source backups, pulls, sink rotations with garbage collection, the source's
housekeeping, lost acknowledgements, and crashes on either side, after each of which every
generation the sink store or the source store holds restores byte for byte.

The sink is `backup-agent sink pull-data` as it runs, the gateway is `backup-agent gateway`
with Debian's rrsync, and the packs and indexes travel by real rsync; only sshd is replaced
by a pipe (an `ssh` first in PATH that runs the gateway with SSH_ORIGINAL_COMMAND set, as
sshd's ForceCommand does), so an example takes seconds; test_pull_chunks.py runs the same
paths through a real sshd with certificates."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.chunks import handover as chunked
from agent.chunks import prune, pulled
from agent.core.handover import Handover
from agent.stores.local import LocalStore
from tests.chunked import restore_by_hand
from tests.conftest import AGENT, ROOT
from tests.pulled import DATA, hand_over_mirror, mirror_dir

SOURCE = "model-source"
FILES = [f"f{i}.bin" for i in range(4)]
SSH = """#!/bin/sh
# sshd stand-in: skip ssh's options up to `-l USER`, then the host; run the gateway
while [ "$1" != "-l" ]; do shift; done
shift 2
shift
export SSH_ORIGINAL_COMMAND="$*"
exec {python} -m agent --env-file {env} gateway
"""


def blob(seed: int) -> bytes:
    return random.Random(seed).randbytes(300_000 + seed % 7 * 50_000)


class PullLifecycle(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pull-model-"))
        self.handover = self.root / "handover"
        self.source_store = self.root / "store"
        self.sink_store = self.root / "sink"
        for directory in (self.handover, self.source_store, self.sink_store):
            directory.mkdir()
        env_file = self.root / "gateway.env"
        env_file.write_text(
            f"HANDOVER_DIR={self.handover}\nSOURCE_STORE_DIR={self.source_store}\n"
            f"SSH_DATA_USER=root\nSSH_LOG_USER=nobody\nSOURCE_KEEP_LAST=3\n"
            "SOURCE_KEEP_DAILY=0\nSOURCE_KEEP_WEEKLY=0\nSOURCE_KEEP_MONTHLY=0\n"
        )
        bin_dir = self.root / "bin"
        bin_dir.mkdir()
        (bin_dir / "ssh").write_text(SSH.format(python=sys.executable, env=env_file))
        (bin_dir / "ssh").chmod(0o755)
        for name in ("key", "cert", "known_hosts"):
            (self.root / name).write_text("unused by the stand-in\n")
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/root"),
            "PYTHONPATH": str(ROOT),
            "SINK_SOURCES": f"{SOURCE}=127.0.0.1:22",
            "SSH_DATA_USER": "root",
            "SINK_SSH_KEY": str(self.root / "key"),
            "SINK_SSH_CERT": str(self.root / "cert"),
            "SINK_KNOWN_HOSTS": str(self.root / "known_hosts"),
            "SINK_STORE_DIR": str(self.sink_store),
            "SINK_KEEP_LAST": "2",
            "SINK_KEEP_DAILY": "0",
            "SINK_KEEP_WEEKLY": "0",
            "SINK_KEEP_MONTHLY": "0",
        }
        self.files: dict[str, bytes] = {}
        self.contents: dict[str, dict[str, bytes]] = {}
        self.day = 0

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the source

    @rule(changes=st.lists(st.tuples(st.sampled_from(FILES), st.integers(0, 5)), max_size=3))
    def backup(self, changes: list[tuple[str, int]]) -> None:
        for name, seed in changes:
            self.files[name] = blob(seed)
        if not self.files:
            self.files[FILES[0]] = blob(0)
        mirror = mirror_dir(self.handover)
        shutil.rmtree(mirror, ignore_errors=True)
        mirror.mkdir(parents=True)
        for name, data in self.files.items():
            (mirror / name).write_bytes(data)
        self.day += 1
        gen = f"2026-11-{self.day:02d}T02-00-00Z"
        hand_over_mirror(self.handover, self.source_store, SOURCE, gen, pack_size=600_000)
        self.contents[gen] = dict(self.files)

    @rule()
    def backup_killed_before_it_published(self) -> None:
        """What a killed build leaves: new packs in the handover that nothing lists."""
        mirror = mirror_dir(self.handover)
        (mirror / "partial.bin").parent.mkdir(parents=True, exist_ok=True)
        (mirror / "partial.bin").write_bytes(blob(self.day + 100))
        place = Handover(self.handover)
        place.discard_staging()
        store = LocalStore(self.source_store)
        from agent.chunks.builder import BuildSettings

        chunked.build(
            place,
            [store],
            place.fresh_staging("data"),
            [DATA],
            BuildSettings(3, (), None, 600_000, 1),
            "",
            {store.url: pulled.given_up(place)},
        )
        place.discard_staging()
        (mirror / "partial.bin").unlink()

    @rule()
    def source_housekeeping(self) -> None:
        place = Handover(self.handover)
        store = LocalStore(self.source_store)
        prune.after_rotation(store, "source store", place, prune.Settings(), f"{self.day:04d}")
        chunked.free_packs(place)
        pulled.forget_gone(place, (p for p, _ in chunked.packs_of(store)))

    # -- the sink

    @rule()
    def pull(self) -> None:
        result = subprocess.run(
            [*AGENT, "sink", "pull-data"], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-3000:]

    @rule(after=st.floats(0.05, 1.5))
    def sink_killed_mid_pull(self, after: float) -> None:
        job = subprocess.Popen(
            [*AGENT, "sink", "pull-data"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            job.wait(timeout=after)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    @rule()
    def acknowledgement_lost(self) -> None:
        """The sink stored and collected, but its ack never reached the source."""
        noack = self.root / "noack"
        env = {**self.env, "PATH": f"{noack}:{self.env['PATH']}"}
        noack.mkdir(exist_ok=True)
        (noack / "ssh").write_text(
            "#!/bin/sh\ncase \"$*\" in *' ack '*) exit 255;; esac\n"
            f'exec {self.root / "bin" / "ssh"} "$@"\n'
        )
        (noack / "ssh").chmod(0o755)
        subprocess.run(
            [*AGENT, "sink", "pull-data"], env=env, capture_output=True, text=True, timeout=120
        )

    # -- invariant 9 on both sides

    @invariant()
    def every_stored_generation_restores_byte_for_byte(self) -> None:
        if not hasattr(self, "root"):
            return
        for store in (self.sink_store / SOURCE, self.source_store):
            for gen in LocalStore(store).generations("data")[0]:
                target = self.root / "restored"
                shutil.rmtree(target, ignore_errors=True)
                restore_by_hand(store, gen, target)
                found = {p.name: p.read_bytes() for p in (target / DATA).iterdir()}
                assert found == self.contents[gen], (store, gen)
                shutil.rmtree(target)


PullLifecycle.TestCase.settings = settings(
    max_examples=5,
    stateful_step_count=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
test_pull_lifecycle = PullLifecycle.TestCase
