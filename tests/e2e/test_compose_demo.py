"""End to end: both agent images built from the local base, the compose demo stack started with
docker-compose, the full cycle run in it, and the two transport failures recovered from: the
S3 store stopped during a push, the sink killed during a pull."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, _unavailable

# One compose project: `--dist loadfile` keeps every test of this file on one xdist worker.
pytestmark = pytest.mark.docker

_spec = importlib.util.spec_from_file_location("demo", ROOT / "tools" / "demo.py")
demo = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["demo"] = demo
_spec.loader.exec_module(demo)  # type: ignore[union-attr]

MiB = 1 << 20


@pytest.fixture(scope="module")
def stack(docker_client, base_image):
    if shutil.which("docker-compose") is None:
        _unavailable("docker-compose is not installed")
    demo.down()
    demo.build_images()
    demo.make_secrets()
    demo.start()
    yield docker_client
    demo.down()


def service_container(client, service: str):
    [container] = client.containers.list(
        filters={
            "label": [
                f"com.docker.compose.project={demo.PROJECT}",
                f"com.docker.compose.service={service}",
            ]
        }
    )
    return container


def app_container(client):
    return service_container(client, "app")


class StartCounter:
    """Counts the app container's `start` events from a live event stream opened now. A query
    of past events afterwards can miss some: dockerd keeps only its last 256 events, and the
    tests running beside this one on a busy machine make more than that in a cycle."""

    def __init__(self, client) -> None:
        container = app_container(client)
        self._stream = client.events(
            decode=True, filters={"container": container.id, "event": "start"}
        )
        self.starts = 0
        self._thread = threading.Thread(target=self._count, daemon=True)
        self._thread.start()

    def _count(self) -> None:
        try:
            for _ in self._stream:
                self.starts += 1
        except Exception:  # the stream closed under the reader
            pass

    def wait_for(self, expected: int, timeout: float = 30.0) -> int:
        """The count once it reaches `expected` (events arrive a little after the fact), or
        whatever it is when `timeout` has passed; the stream is closed then."""
        deadline = time.monotonic() + timeout
        while self.starts < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        self._stream.close()
        return self.starts


def listing(service: str) -> list[dict]:
    """`list --json`; a store that cannot be listed (S3 down) is left out."""
    return json.loads(demo.agent(service, "list", "--json").stdout)


def generations(rows: list[dict], store: str, kind: str) -> list[str]:
    return sorted(
        r["generation"] for r in rows if r["store"] == store and r["kind"] == kind and r["complete"]
    )


def mails() -> int:
    out = demo.compose("exec", "-T", "mail", "sh", "-c", "ls /mail/new | wc -l").stdout
    return int(out.strip() or 0)


def background(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "docker-compose",
            "-p",
            demo.PROJECT,
            "-f",
            str(demo.STACK / "docker-compose.yml"),
            "exec",
            "-T",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"{text!r} not seen in:\n{''.join(seen)}")


def test_the_demo_cycle_backs_up_pulls_verifies_and_restores_exactly(stack):
    demo.compose(
        "exec",
        "-T",
        "app",
        "sh",
        "-c",
        "head -c 20000000 /dev/urandom > /data/catalog.db && mkdir -p /data/img && "
        "for i in $(seq 1 200); do head -c 3000 /dev/urandom > /data/img/$i.jpg; done",
    )
    counter = StartCounter(stack)

    cycle = demo.run_cycle()

    assert cycle.ok, demo.summary(cycle)
    [compare] = [s for s in cycle.steps if s.name.startswith("restore drill: compare")]
    assert "identical" in compare.detail
    pages = [s for s in cycle.steps if s.name.startswith("status page")]
    assert [s.detail for s in pages] == list(demo.STATUS_PAGES.values())  # each one answered
    assert int(compare.detail.split()[0]) > 200
    # The application ran throughout except during the backup's copy and the restore's swap:
    # started again exactly twice, and running now.
    assert counter.wait_for(2) == 2
    assert app_container(stack).status == "running"
    assert float(cycle.backup_downtime.split()[0]) < 10
    source = listing("source-agent")
    assert cycle.generation in generations(source, "sink store", "data")
    assert generations(listing("sink-agent"), "sink store", "logs")[-1] == cycle.generation
    assert mails() == 0


def test_a_push_cut_off_by_the_s3_store_going_away_is_recovered_by_the_next_run(stack):
    demo.compose(
        "exec", "-T", "app", "sh", "-c", "head -c 150000000 /dev/urandom > /data/big-upload.bin"
    )
    before = mails()
    store_pid = service_container(stack, "s3").attrs["State"]["Pid"]
    run = background("source-agent", "backup-agent", "source", "run")
    wait_for_line(run, "hand over: write manifests and publish the generations: done")
    # Killed from here at once: `docker-compose stop` took so long on a loaded machine that
    # the upload had finished before the store went away.
    os.kill(store_pid, signal.SIGKILL)
    output = run.communicate(timeout=180)[0]

    assert run.returncode == 1, output
    assert "2.a upload" in output
    waiting = generations(listing("source-agent"), "handover", "data")
    assert len(waiting) == 1
    deadline = time.monotonic() + 30
    while mails() <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert mails() == before + 1

    demo.start()  # the store comes back
    result = demo.agent("source-agent", "source", "run")

    assert result.returncode == 0, result.stderr
    rows = listing("source-agent")
    assert generations(rows, "handover", "data") == []
    pushed = generations(rows, "sink store", "data")
    assert waiting[0] in pushed and len(pushed) >= 3  # the demo's, the cut-off one, this one
    assert generations(rows, "source store", "data")[-2:] == pushed[-2:]
    assert demo.agent("source-agent", "verify", "--all").returncode == 0


def test_a_pull_cut_off_by_the_sink_going_away_is_recovered_by_the_next_pull(stack):
    demo.compose(
        "exec", "-T", "app", "sh", "-c", "head -c 200000000 /dev/urandom | base64 > /logs/bulk.log"
    )
    assert demo.agent("source-agent", "source", "backup").returncode == 0
    pull = background("sink-agent", "backup-agent", "sink", "pull-logs")
    wait_for_line(pull, "list the logs generations waiting on demo-shop: done")
    # Watched from inside the sink's container, every 20 ms: a `docker-compose exec` per look
    # took longer on a loaded machine than the whole transfer, which then went unseen.
    started = demo.compose(
        "exec",
        "-T",
        "sink-agent",
        "timeout",
        "60",
        "sh",
        "-c",  # rsync's partial file
        "until find /backup/sink/.incoming -name '*bulk.log*' | grep -q .; do sleep 0.02; done;"
        # ... and the pull and its rsync killed from there at once: `docker-compose kill`
        # alone took so long on a loaded machine that the transfer finished and was acked.
        " pkill -KILL -f 'sink pull-log[s]'; pkill -KILL -x rsync; true",
        check=False,
    )
    assert started.returncode == 0, "the pull did not start"
    demo.compose("kill", "sink-agent")
    pull.communicate(timeout=60)
    waiting = generations(listing("source-agent"), "handover", "logs")
    assert waiting, "the cut-off pull must not have freed the handover"

    demo.compose("start", "sink-agent")
    result = demo.agent("sink-agent", "sink", "pull-logs")

    assert result.returncode == 0, result.stderr
    assert generations(listing("source-agent"), "handover", "logs") == []
    stored = generations(listing("sink-agent"), "sink store", "logs")
    assert set(waiting) <= set(stored)
    assert demo.agent("sink-agent", "verify", "--all").returncode == 0


@pytest.mark.parametrize(
    "name",
    [
        "demo/docker-compose.yml",
        "production/push.yml",
        "production/pull-source.yml",
        "production/pull-sink.yml",
    ],
)
def test_every_compose_file_is_valid(name):
    if shutil.which("docker-compose") is None:
        _unavailable("docker-compose is not installed")
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose" / name), "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
