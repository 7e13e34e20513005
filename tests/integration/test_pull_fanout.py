"""A sink pulls many sources at once (SINK_CONCURRENCY), against real sshd instances on loopback
ports (one per source, the real gateway as ForceCommand, real rsync), real mail (aiosmtpd): all
of them land and are verified, one that fails alerts on its own and stops none of the others,
no more than SINK_CONCURRENCY run at once, and SIGTERM stops every running transfer."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core import archive, manifest
from agent.runtime import processes
from agent.runtime.interrupts import Interrupted
from tests.conftest import bytes_below, run_agent, start_agent, wait_until
from tests.fleet import Fleet, start_fleet
from tests.generations import make_generation, seal, write_generation
from tests.sshd import make_shared_dir

GEN = "2026-11-01T02-00-00Z"
MiB = 1 << 20
ARCHIVE = archive.ARCHIVE_NAME

# The ForceCommand around the gateway: it counts the gateway sessions open at once over every
# source (STATE/open; the most ever in STATE/max) and holds each session of the stage HOLD
# (`list`, or `files`: the rsync of a generation's files) until WANT sessions of that stage
# have begun (at most 60 s), so that pulls one after another cannot pass by chance; with a
# limit in STATE/bwlimit (KiB/s, 0: none) the source's rsync sends no faster, as a slow source
# would.
GATE = r"""#!/bin/sh
state=$1 want=$2 hold=$3
shift 3
bwlimit=$(cat "$state/bwlimit")
add() {
    flock 9
    n=$(( $(cat "$state/open") + $1 ))
    echo "$n" > "$state/open"
    if [ "$n" -gt "$(cat "$state/max")" ]; then echo "$n" > "$state/max"; fi
}
( add 1 ) 9>>"$state/lock"
case "$SSH_ORIGINAL_COMMAND" in
    list) stage=list ;;
    "rsync --server --sender "*/)
        stage=files
        if [ "$bwlimit" -gt 0 ]; then
            rest=${SSH_ORIGINAL_COMMAND#rsync --server --sender}
            SSH_ORIGINAL_COMMAND="rsync --server --sender --bwlimit=$bwlimit$rest"
            export SSH_ORIGINAL_COMMAND
        fi ;;
    *) stage=other ;;
esac
if [ "$stage" = "$hold" ]; then
    ( flock 9; echo . >> "$state/arrived" ) 9>>"$state/lock"
    i=0
    while [ "$(wc -l < "$state/arrived")" -lt "$want" ] && [ "$i" -lt 600 ]; do
        sleep 0.1
        i=$((i + 1))
    done
fi
"$@"
rc=$?
( add -1 ) 9>>"$state/lock"
exit $rc
"""


def gate(directory: Path, want: int, hold: str = "list", bwlimit: int = 0) -> tuple[Path, str]:
    """Install GATE below `directory`; return its state directory and the ForceCommand's
    beginning (the gateway's command line follows)."""
    script = directory / "gate.sh"
    script.write_text(GATE)
    script.chmod(0o755)
    state = make_shared_dir(directory / "gate")
    files = {"open": "0\n", "max": "0\n", "arrived": "", "lock": "", "bwlimit": f"{bwlimit}\n"}
    for name, text in files.items():
        (state / name).write_text(text)
        (state / name).chmod(0o666)
    return state, f"{script} {state} {want} {hold}"


@pytest.fixture
def fleet_of(gateway_tmp_path, ssh_ca, gateway_agent) -> Iterator:
    """A factory: `fleet_of(ids, wrap=...)` starts a Fleet of those sources (tests/fleet.py);
    every one is stopped at the end of the test."""
    fleets: list[Fleet] = []

    def start(ids: list[str], **options) -> Fleet:
        fleet = start_fleet(gateway_tmp_path, ids, ssh_ca, gateway_agent, **options)
        fleets.append(fleet)
        return fleet

    yield start
    for fleet in fleets:
        fleet.stop()


def mail_env(mail) -> dict[str, str]:
    return {
        "SMTP_HOST": mail.host,
        "SMTP_PORT": str(mail.port),
        "SMTP_SECURITY": "none",
        "ALERT_TO": "ops@example.org",
    }


def stored(sink_store: Path, source_id: str) -> list[str]:
    directory = sink_store / source_id / "data"
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def test_twenty_sources_are_pulled_eight_at_once_and_a_failing_one_alerts_alone(
    fleet_of, gateway_tmp_path, tmp_path, smtp_server
):
    state, prefix = gate(gateway_tmp_path, want=8)
    ids = [f"fan-{n:02d}" for n in range(1, 21)]
    fleet = fleet_of(ids, wrap=lambda command: f"{prefix} {command}")
    contents = {}
    for source in fleet.sources:
        contents[source.id] = make_generation(source.handover, GEN, 64_000, source=source.id)
    bad = fleet.sources[12]  # its archive changes after its manifest was written
    (bad.handover / "data" / GEN / ARCHIVE).write_bytes(os.urandom(64_000))
    for source in fleet.sources:
        source.share()
    sink_store = tmp_path / "sink-store"

    result = run_agent(
        fleet.sink_env(sink_store, SINK_CONCURRENCY="8", **mail_env(smtp_server)),
        "sink",
        "pull-data",
        timeout=240,
    )

    assert result.returncode == 1, result.stderr
    for source in fleet.sources:
        if source is bad:
            continue
        copy = sink_store / source.id / "data" / GEN
        assert (copy / ARCHIVE).read_bytes() == contents[source.id], source.id
        assert manifest.read(copy).source_id == source.id
        assert source.waiting() == [] and source.in_source_store() == [GEN], source.id
    assert stored(sink_store, bad.id) == []
    assert bad.waiting() == [GEN] and bad.in_source_store() == []
    [mail] = smtp_server.wait_for(1, timeout=30)
    assert mail["Subject"] == (
        f"[backup-agent] {bad.id}: sink pull-data failed at verify data generation {GEN} "
        f"of {bad.id}"
    )
    assert "sha256" in mail.get_content()
    assert (state / "max").read_text().strip() == "8"  # eight at once, never more
    assert (
        f"sink pull-data done: 19 of 20 source(s) pulled; 1 failed: {bad.id}; "
        "19 generation(s) pulled" in result.stderr
    )
    # Every line but the summary names the source it is about in front, and no other one.
    per_source = dict.fromkeys(ids, 0)
    for line in result.stderr.splitlines():
        if "sink pull-data done: " in line:
            continue
        marked = re.match(r"\S+ (INFO|WARNING|ERROR) \[(fan-\d\d)\] agent\.", line)
        assert marked, line
        assert set(re.findall(r"fan-\d\d", line)) == {marked[2]}, line
        per_source[marked[2]] += 1
    assert min(per_source.values()) >= 4, per_source
    assert smtp_server.messages == [mail]


def test_sigterm_stops_every_running_pull_keeps_their_partial_files_and_starts_no_other(
    fleet_of, gateway_tmp_path, tmp_path, smtp_server
):
    # Both big transfers begin together and take about 8 s each (4 MiB/s).
    state, prefix = gate(gateway_tmp_path, want=2, hold="files", bwlimit=4096)
    fleet = fleet_of(["big-1", "big-2", "small"], wrap=lambda command: f"{prefix} {command}")
    size = 32 * MiB
    for source in fleet.sources[:2]:
        directory = source.handover / "data" / GEN
        directory.mkdir(parents=True)
        with open(directory / ARCHIVE, "wb") as handle:
            for _ in range(size // (4 * MiB)):
                handle.write(os.urandom(4 * MiB))
        seal(directory, GEN, "data", source.id)
    small = fleet.sources[2]
    write_generation(small.handover, "data", GEN, {ARCHIVE: b"s" * 1000}, small.id)
    for source in fleet.sources:
        source.share()
    sink_store = tmp_path / "sink-store"
    env = fleet.sink_env(
        sink_store, SINK_CONCURRENCY="2", LOG_FORMAT="json", **mail_env(smtp_server)
    )
    incoming = [sink_store / ".incoming" / s.id / "data" / GEN for s in fleet.sources[:2]]

    job = start_agent(env, "sink", "pull-data", start_new_session=True)
    try:
        wait_until(
            lambda: all(bytes_below(i) > 4 * MiB for i in incoming) or job.poll() is not None,
            timeout=60,
        )
        assert job.poll() is None, "a transfer ended before it could be interrupted"
        os.killpg(job.pid, signal.SIGTERM)
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    assert job.returncode == 128 + signal.SIGTERM, stderr
    [mail] = smtp_server.wait_for(1)
    assert "failed at 2.a fetch data generation" in mail["Subject"], mail["Subject"]
    body = mail.get_content()
    assert "SIGTERM" in body and "also stopped: big-" in body and "at 2.a fetch" in body, body
    for directory in incoming:
        kept = directory / ".rsync-partial" / ARCHIVE
        assert kept.is_file() and 0 < kept.stat().st_size < size, sorted(directory.rglob("*"))
    assert all(stored(sink_store, s.id) == [] for s in fleet.sources)
    assert small.waiting() == [GEN]
    assert "Accepted" not in small.server.log()  # never started: no session at all
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert {r.get("source") for r in records if r["logger"] == "agent.sink.fanout"} >= {
        "big-1",
        "big-2",
    }
    assert any("2 stopped by SIGTERM; 1 not started" in r["message"] for r in records), stderr

    (state / "bwlimit").write_text("0\n")  # the source is fast again
    resumed = run_agent(env, "sink", "pull-data", timeout=120)

    assert resumed.returncode == 0, resumed.stderr
    for source in fleet.sources:
        assert stored(sink_store, source.id) == [GEN]
        assert source.in_source_store() == [GEN]
    [summary] = [json.loads(line) for line in resumed.stderr.splitlines() if "done:" in line]
    received = int(re.search(r"(\d+) bytes received", summary["message"])[1])
    assert received < 2 * size - 4 * MiB  # the kept parts did not travel again


def test_a_cancelled_thread_stops_its_child_and_starts_no_other():
    cancellation = processes.Cancellation()
    raised: list[BaseException] = []
    started = threading.Event()

    def work() -> None:
        with cancellation.under():
            try:
                started.set()
                processes.run(["sleep", "60"])
            except Interrupted as exc:
                raised.append(exc)
            try:
                processes.run(["true"])
            except Interrupted as exc:
                raised.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    started.wait(10)
    wait_until(lambda: _children_named("sleep"), timeout=10)
    cancellation.cancel(signal.SIGTERM)
    thread.join(30)
    cancellation.close()

    assert not thread.is_alive()
    assert [e.signum for e in raised if isinstance(e, Interrupted)] == [signal.SIGTERM] * 2
    assert _children_named("sleep") == []


def _children_named(name: str) -> list[int]:
    """The live child processes of this process running `name`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)
            comm = fields[0].split("(", 1)[1]
        except (OSError, IndexError):
            continue
        rest = fields[1].split()
        if comm == name and rest[0] != "Z" and int(rest[1]) == os.getpid():
            found.append(int(pid))
    return found


@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_an_invalid_sink_concurrency_is_refused_naming_the_setting(tmp_path, value):
    result = run_agent(
        {
            "PATH": os.environ["PATH"],
            "SINK_SOURCES": "a=127.0.0.1:1",
            "SINK_STORE_DIR": str(tmp_path),
            "SINK_CONCURRENCY": value,
        },
        "sink",
        "pull-data",
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert f"SINK_CONCURRENCY: '{value}' is not allowed; use an integer from 1 to 64" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".state").exists() and not os.listdir(tmp_path)
