"""A pull that dies, and a copy that fails verification, are taken up again by the next pull
(real sshd, gateway, rsync): a transfer resumes after any kind of death and a killed agent
leaves no transfer running; a bad copy in `.incoming` is fetched again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from agent.core import archive
from tests.conftest import bytes_below, start_agent, wait_until
from tests.generations import SOURCE, seal
from tests.integration.test_pull import (
    GEN1,
    GEN2,
    MiB,
    Site,
    bytes_received,
    site,  # noqa: F401 (a fixture)
)
from tests.sshd import share_tree

ARCHIVE = archive.ARCHIVE_NAME
SIZE = 128 * MiB


def offer_large_archive(site: Site) -> Path:
    directory = site.handover / "data" / GEN1
    directory.mkdir(parents=True)
    with open(directory / ARCHIVE, "wb") as handle:
        for _ in range(SIZE // (4 * MiB)):
            handle.write(os.urandom(4 * MiB))
    seal(directory, GEN1, "data")
    share_tree(site.handover)
    return site.sink_store / ".incoming" / SOURCE / "data" / GEN1


def received_so_far(incoming: Path) -> int:
    """The bytes of every file in the incoming copy (rsync's temporary and partial files)."""
    return bytes_below(incoming)


def session_members(session: int) -> list[str]:
    """The live processes of a session: `pid command` each."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue  # ended meanwhile
        command, fields = (
            stat[stat.index("(") + 1 : stat.rindex(")")],
            stat.rsplit(")", 1)[1].split(),
        )
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(f"{pid} {command}")
    return members


def kill_mid_transfer(site: Site, incoming: Path, whole_group: bool) -> None:
    """Start `sink pull-data` in a session of its own and SIGKILL it once the transfer of the
    archive is under way: the agent alone, or (`whole_group`) with rsync and ssh, as the OOM
    killer or `docker kill` would. Return once no process of that session is left."""
    job = start_agent(site.env, "sink", "pull-data", start_new_session=True)
    try:
        wait_until(
            lambda: received_so_far(incoming) > 8 * MiB or job.poll() is not None, timeout=60
        )
        assert job.poll() is None, "the transfer ended before it could be interrupted"
        if whole_group:
            os.killpg(job.pid, signal.SIGKILL)
        else:
            os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        wait_until(lambda: session_members(job.pid) == [], timeout=60, interval=0.1)
    finally:
        if session_members(job.pid):
            os.killpg(job.pid, signal.SIGKILL)
        job.communicate()


def assert_resumed(site: Site, kept: int) -> None:
    resumed = site.pull("data")

    assert resumed.returncode == 0, resumed.stderr
    stored = site.sink_store / SOURCE / "data" / GEN1
    assert sorted(os.listdir(stored)) == ["MANIFEST.json", ARCHIVE]
    assert site.waiting("data") == [] and site.in_source_store() == [GEN1]
    assert bytes_received(resumed) < SIZE - kept // 2, (bytes_received(resumed), kept)
    assert received_so_far(site.sink_store / ".incoming" / SOURCE / "data" / GEN1) == 0


# ---------------------------------------------------------------- 7. killed pulls


def test_a_pull_killed_with_its_transfer_resumes_where_it_stopped(site):
    incoming = offer_large_archive(site)

    kill_mid_transfer(site, incoming, whole_group=True)

    kept = received_so_far(incoming)
    assert 0 < kept < SIZE, sorted(incoming.rglob("*"))
    assert site.stored("data") == [] and site.waiting("data") == [GEN1]
    assert_resumed(site, kept)


def test_the_transfer_dies_with_a_killed_agent_and_the_next_pull_resumes(site):
    incoming = offer_large_archive(site)

    kill_mid_transfer(site, incoming, whole_group=False)

    assert not (incoming / ARCHIVE).exists(), "an orphaned rsync finished the transfer"
    kept = received_so_far(incoming)
    assert 0 < kept < SIZE, sorted(incoming.rglob("*"))
    assert site.stored("data") == [] and site.waiting("data") == [GEN1]
    assert_resumed(site, kept)


# ---------------------------------------------------------------- 8. a bad copy


def test_a_copy_that_failed_verification_is_fetched_again_once_the_source_is_repaired(site):
    good = os.urandom(200_000)
    directory = site.offer("data", GEN1, {ARCHIVE: good})
    archive_path = directory / ARCHIVE
    mtime = archive_path.stat().st_mtime_ns
    archive_path.write_bytes(os.urandom(len(good)))  # damaged after its manifest was written
    os.utime(archive_path, ns=(mtime, mtime))
    failed = site.pull("data")
    assert failed.returncode == 1, failed.stderr
    assert "takes it up again" in site.mail.wait_for(1)[0].get_content()

    archive_path.write_bytes(good)  # repaired, e.g. from a copy that kept its times
    os.utime(archive_path, ns=(mtime, mtime))
    repaired = site.pull("data")

    assert repaired.returncode == 0, repaired.stderr
    assert (site.sink_store / SOURCE / "data" / GEN1 / ARCHIVE).read_bytes() == good
    assert site.waiting("data") == [] and site.in_source_store() == [GEN1]


def test_a_log_that_equals_the_stored_one_only_in_size_and_time_is_fetched_again(site):
    site.offer("logs", GEN1, {"var/log/app.log": b"a" * 10_000})
    assert site.pull("logs").returncode == 0
    old = site.sink_store / SOURCE / "logs" / GEN1 / "var/log/app.log"
    directory = site.offer("logs", GEN2, {"var/log/app.log": b"b" * 10_000})
    mtime = old.stat().st_mtime_ns  # e.g. a filesystem with coarse times, or `touch -d`
    os.utime(directory / "var/log/app.log", ns=(mtime, mtime))
    share_tree(site.handover)
    failed = site.pull("logs")
    assert failed.returncode == 1, failed.stderr  # rsync took the stored file for it

    again = site.pull("logs")

    assert again.returncode == 0, again.stderr
    new = site.sink_store / SOURCE / "logs" / GEN2 / "var/log/app.log"
    assert new.read_bytes() == b"b" * 10_000
    assert old.read_bytes() == b"a" * 10_000  # the stored generation was not touched
    assert site.waiting("logs") == []
