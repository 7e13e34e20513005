#!/usr/bin/env python3
"""Benchmark of a sink serving many sources (`backup-agent sink pull-data`, SINK_CONCURRENCY):
the wall time of a full round over 20 sources at concurrency 1, 4 and 8, next to the slowest
source's pull × ⌈20 / concurrency⌉ (what a round should cost when the pulls overlap) and the
sum of the pulls (what it cost when they ran one after another).

    python bench/fanout.py [--sources 20] [--size-mib 8] [--concurrency 1,4,8]
                           [--bwlimit-kib 0,4096]

(run from the repository root, as root: it starts one real sshd per source on a loopback port,
each with the gateway as its ForceCommand, with the fixtures' helpers in tests/fleet.py and
tests/sshd.py). For each link speed of --bwlimit-kib (0: loopback as it is; N: each source's
rsync sends at most N KiB/s, as a source behind a slower link would: rsync's own `--bwlimit`
on the source side) and each concurrency, it hands over one data generation of --size-mib MiB
of random bytes on every source, pulls them all into an empty sink store, checks that every
source's generation arrived byte for byte and was acknowledged, and takes each source's pull
time from the agent's `pulled: ... s` line. It prints the table and writes it to
bench/results/fanout.md (the agent's logs to bench/results/fanout-agent.log). Everything it
creates (sshds, temporary directories) is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fleet import Fleet, start_fleet  # noqa: E402
from tests.generations import seal  # noqa: E402
from tests.sshd import SshCA, install_gateway_agent  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fanout.md"
AGENT_LOG = RESULTS.with_name("fanout-agent.log")
MiB = 1 << 20
ARCHIVE = "data.tar.zst"

# The ForceCommand's beginning: the source's rsync sends at most `cat LIMIT_FILE` KiB/s
# (0: no limit), then the gateway runs as always.
THROTTLE = r"""#!/bin/sh
limit=$(cat "$1")
shift
case "$SSH_ORIGINAL_COMMAND" in
    "rsync --server --sender "*)
        if [ "$limit" -gt 0 ]; then
            rest=${SSH_ORIGINAL_COMMAND#rsync --server --sender}
            SSH_ORIGINAL_COMMAND="rsync --server --sender --bwlimit=$limit$rest"
            export SSH_ORIGINAL_COMMAND
        fi ;;
esac
exec "$@"
"""


@dataclass
class Round:
    bwlimit_kib: int
    concurrency: int
    seconds: float
    pulls: dict[str, float]  # source id → seconds of its pull

    @property
    def slowest(self) -> float:
        return max(self.pulls.values())

    def rounds(self, sources: int) -> int:
        return math.ceil(sources / self.concurrency)


def offer(fleet: Fleet, gen: str, size: int) -> dict[str, str]:
    """A data generation `gen` of `size` random bytes on every source; return the sha256 of
    each source's archive."""
    digests = {}
    for source in fleet.sources:
        directory = source.handover / "data" / gen
        directory.mkdir(parents=True)
        digest = hashlib.sha256()
        with open(directory / ARCHIVE, "wb") as handle:
            left = size
            while left:
                block = os.urandom(min(left, 4 * MiB))
                handle.write(block)
                digest.update(block)
                left -= len(block)
        seal(directory, gen, "data", source.id)
        source.share()
        digests[source.id] = digest.hexdigest()
    return digests


def pull_round(
    fleet: Fleet, work: Path, gen: str, size: int, bwlimit: int, concurrency: int, log: list[str]
) -> Round:
    digests = offer(fleet, gen, size)
    sink_store = work / "sink-store"
    shutil.rmtree(sink_store, ignore_errors=True)
    env = fleet.sink_env(sink_store, SINK_CONCURRENCY=str(concurrency))
    os.sync()
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "agent", "sink", "pull-data"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    seconds = time.monotonic() - started
    title = f"bwlimit {bwlimit} KiB/s, SINK_CONCURRENCY={concurrency}"
    log.append(f"## {title}\n{process.stderr}")
    if process.returncode != 0:
        raise RuntimeError(f"{title}: sink pull-data exited {process.returncode}")
    pulls = {
        m[1]: float(m[2])
        for m in re.finditer(
            r"\[(\S+)\] agent\.sink\.fanout: pulled: .*?, ([\d.]+) s$", process.stderr, re.M
        )
    }
    for source in fleet.sources:  # every generation arrived, verified and acknowledged
        with open(sink_store / source.id / "data" / gen / ARCHIVE, "rb") as stored:
            digest = hashlib.file_digest(stored, "sha256").hexdigest()
        if digest != digests[source.id]:
            raise RuntimeError(f"{title}: {source.id}'s archive differs")
        if source.waiting() or source.in_source_store() != [gen]:
            raise RuntimeError(f"{title}: {source.id} was not acknowledged")
        shutil.rmtree(source.source_store / "data")
    if sorted(pulls) != sorted(s.id for s in fleet.sources):
        raise RuntimeError(f"{title}: pull times of {sorted(pulls)} only")
    return Round(bwlimit, concurrency, seconds, pulls)


def report(args: argparse.Namespace, rows: list[Round], load: tuple[str, str]) -> str:
    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    if git("status", "--porcelain", "--", "agent"):
        commit += " + uncommitted changes in agent/"
    n = args.sources
    lines = [
        "# Fan-out benchmark: one sink, many sources (`sink pull-data`, `SINK_CONCURRENCY`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `python bench/fanout.py "
        f"--sources {n} --size-mib {args.size_mib} --concurrency {args.concurrency} "
        f"--bwlimit-kib {args.bwlimit_kib}` on {os.cpu_count()} cores, Linux "
        f"{platform.release()}, Python {platform.python_version()}; agent at commit {commit}; "
        f"load average {load[0]} at the start, {load[1]} at the end (a machine shared with "
        "other jobs: figures move between runs).",
        "",
        f"- {n} sources, each an sshd of its own on a loopback port with the gateway as "
        "ForceCommand (the gateway's Python starts for each of a pull's four SSH sessions: "
        f"`list`, the manifest's rsync, the files' rsync, `ack`), each offering one data "
        f"generation of {args.size_mib} MiB of random bytes; the sink pulls all of them into an "
        "empty sink store, verifies and acknowledges; every archive is then compared by sha256.",
        "- link: `loopback` as it is, or each source's rsync limited to the given rate on the "
        "source side (rsync `--bwlimit`), as sources behind slower links are.",
        "- round: the wall time of the whole `sink pull-data` job. pull: one source's time "
        "from its first step to its acknowledgement (the agent's `[<source>] ... pulled: ... s` "
        "line). target: the slowest pull × ⌈sources / concurrency⌉; one after another: the "
        "sum of the pulls of the concurrency-1 round.",
        "",
        "| link | concurrency | round | slowest pull (this round) | slowest × ⌈"
        f"{n}/c⌉ | round / that | slowest pull alone (c=1) × ⌈{n}/c⌉ | one after another "
        "(sum, c=1) | speed-up over c=1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        alone = next(r for r in rows if r.bwlimit_kib == row.bwlimit_kib and r.concurrency == 1)
        target = row.slowest * row.rounds(n)
        link = "loopback" if row.bwlimit_kib == 0 else f"{row.bwlimit_kib / 1024:g} MiB/s"
        lines.append(
            f"| {link} | {row.concurrency} | {row.seconds:.1f} s | {row.slowest:.2f} s "
            f"| {target:.1f} s | {row.seconds / target:.2f} "
            f"| {alone.slowest * row.rounds(n):.1f} s | {sum(alone.pulls.values()):.1f} s "
            f"| {alone.seconds / row.seconds:.2f} × |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--size-mib", type=int, default=8)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--bwlimit-kib", default="0,4096")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if 1 not in concurrencies:
        concurrencies.insert(0, 1)  # the reference of every other row
    limits = [int(b) for b in args.bwlimit_kib.split(",")]
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    work = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    work.chmod(0o755)  # the gateway users must reach what is inside
    fleet: Fleet | None = None
    log: list[str] = []
    try:
        agent = install_gateway_agent(work / "agent")
        ca_dir = work / "ca"
        ca_dir.mkdir(mode=0o700)
        script = work / "throttle.sh"
        script.write_text(THROTTLE)
        script.chmod(0o755)
        limit_file = work / "bwlimit"
        limit_file.write_text("0\n")
        limit_file.chmod(0o644)
        fleet = start_fleet(
            work / "fleet",
            [f"bench-{i:02d}" for i in range(1, args.sources + 1)],
            SshCA(ca_dir),
            agent,
            wrap=lambda command: f"{script} {limit_file} {command}",
        )
        rows = []
        day = 0
        for limit in limits:
            limit_file.write_text(f"{limit}\n")
            for concurrency in concurrencies:
                day += 1
                gen = f"2026-11-{day:02d}T02-00-00Z"
                print(
                    f"link {limit or 'loopback'} KiB/s, concurrency {concurrency} ...", flush=True
                )
                rows.append(
                    pull_round(fleet, work, gen, args.size_mib * MiB, limit, concurrency, log)
                )
        load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        text = report(args, rows, (load_start, load_end))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        AGENT_LOG.write_text("\n".join(log))
        print(text)
        return 0
    finally:
        if fleet is not None:
            fleet.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
