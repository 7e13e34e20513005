#!/usr/bin/env python3
"""Downtime of `backup-agent source backup` on a real database, against baselines measured in the
same run.

    python bench/postgres.py [--scale 20] [--clients 4] [--repeat 3] [--baseline-agent DIR]

PostgreSQL 15 (Debian's, in an image built from the local base) in a named volume, initialised by
`pgbench -i -s SCALE`, under a continuous `pgbench -c CLIENTS` load, with a probe that opens a
connection every 100 ms. Per method — the agent's default (`stop`, `COLLECT_MODE=mirror`, a
`psql -c CHECKPOINT` pre-stop command), the same without the pre-stop command, `COLLECT_MODE=direct`
and `QUIESCE_MODE=pause` — it reports the downtime the agent measures, how long clients could not
connect, the collection inside the downtime (the final pass, or the archive in direct mode), the
whole job and the peak memory of the agent's whole process tree (agent + rsync + tar + zstd);
baselines: `cp -a` of the volume, `docker stop` + `start` alone (and until a query works).
With --baseline-agent (a checkout of an earlier agent, e.g. `git archive <commit> agent | tar -x`)
every method also runs with that agent, interleaved, so before and after share the machine's
state. Medians of --repeat rounds. Writes bench/results/postgres.md. Caches stay warm: a running
database's files are in the page cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import agent_revision, docker_with_image, interrupt, log, markdown_table  # noqa: E402
from source_backup import AgentRun, Measured, loadavg, run_backup  # noqa: E402

from tests.database import (  # noqa: E402
    Database,
    build_image,
    probe_outage,
    start_database,
)

RESULTS = ROOT / "bench" / "results" / "postgres.md"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "backup-agent-base:bookworm")
PRE_STOP = "psql -XAtqc CHECKPOINT"
FINAL_STEP = "(final pass, application stopped)"
DIRECT_STEP = "(archive, application stopped)"
DOWNTIME_VS_CP = 0.3  # target: downtime <= stop + start + 0.3 x cp -a

METHODS = (  # key, title, extra environment, runs with the baseline agent too
    ("default", "default: stop, mirror, pre-stop CHECKPOINT", {}, True),
    (
        "no-pre-stop",
        "stop, mirror, no pre-stop command",
        {"PRE_STOP_COMMAND_LABEL": "backup.bench-no-pre-stop"},
        False,
    ),
    ("direct", "COLLECT_MODE=direct", {"COLLECT_MODE": "direct"}, True),
    ("pause", "QUIESCE_MODE=pause", {"QUIESCE_MODE": "pause"}, True),
)


@dataclass
class Run:
    agent: AgentRun
    outage: float
    collect: float


@dataclass
class Method:
    title: str
    runs: list[Run] = field(default_factory=list)

    def cell(self, values: list[float], unit: str = " s") -> str:
        return Measured(values).cell(unit)

    def row(self) -> tuple[str, ...]:
        return (
            self.title,
            self.cell([r.agent.downtime for r in self.runs]),
            self.cell([r.outage for r in self.runs]),
            self.cell([r.collect for r in self.runs]),
            self.cell([r.agent.whole for r in self.runs]),
            f"{max(r.agent.rss_tree_mb for r in self.runs):.0f} MB "
            f"(agent {max(r.agent.rss_self_mb for r in self.runs):.0f})",
        )

    @property
    def downtime(self) -> float:
        return statistics.median(r.agent.downtime for r in self.runs)


HEADERS = (
    "agent, method",
    "downtime (agent)",
    "clients could not connect",
    "collection while stopped",
    "whole job",
    "peak RSS, whole tree",
)


def env_for(database: Database, handover: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "DOCKER_HOST")
    }
    env.update(
        SOURCE_ID="bench-postgres",
        DATA_PATHS=str(database.data_dir),
        HANDOVER_DIR=str(handover),
        SOURCE_STORE_DIR=str(handover.parent / "store"),
        STOP_LABEL=f"{database.label}=true",
        STOP_TIMEOUT="30",
        # an earlier agent ran these in every container on the host (issue 11)
        PRE_COMMAND_LABEL=f"{database.label}.pre-command",
        POST_COMMAND_LABEL=f"{database.label}.post-command",
        **extra,
    )
    return env


def measure(
    database: Database,
    load,
    title: str,
    env: dict[str, str],
    handover: Path,
    work: Path,
    agent_root: Path,
) -> Run:
    """One agent run under load: its figures and the probe's view of it."""
    since = time.time()
    run = run_backup(title, env, handover, work, agent_root)
    until = time.time()
    time.sleep(1.5)  # the probe's next successful connections
    outage = probe_outage(load.logs().decode(errors="replace"), since, until)
    collect = sum(
        s
        for name, s in run.steps.items()
        if name.endswith(FINAL_STEP) or name.endswith(DIRECT_STEP)
    )
    return Run(run, outage, collect)


def stop_start(database: Database, load) -> tuple[float, float, float]:
    """`docker stop` + `start` of the database alone: the API calls, until a query works, and
    how long the probe could not connect."""
    since = time.time()
    started = time.perf_counter()
    database.container.stop(timeout=30)  # type: ignore[attr-defined]
    database.container.start()  # type: ignore[attr-defined]
    calls = time.perf_counter() - started
    database.wait_ready()
    ready = time.perf_counter() - started
    until = time.time()
    time.sleep(1.5)
    return calls, ready, probe_outage(load.logs().decode(errors="replace"), since, until)


def cp_volume(database: Database, target: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "-a", str(database.data_dir), str(target)], check=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(target)
    return elapsed


def volume_size(path: Path) -> tuple[int, int]:
    """Bytes of the database (without pg_wal) and of pg_wal."""
    total = wal = 0
    for directory, _dirs, files in os.walk(path):
        size = sum(os.lstat(os.path.join(directory, f)).st_size for f in files)
        total += size
        if "pg_wal" in Path(directory).parts:
            wal += size
    return total - wal, wal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=20, help="pgbench -i -s (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="pgbench -c (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians reported")
    parser.add_argument(
        "--warm-up", type=float, default=30.0, help="seconds of load before the first measurement"
    )
    parser.add_argument(
        "--baseline-agent",
        type=Path,
        default=None,
        help="the root of an earlier agent's checkout to run beside this one",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    client = docker_with_image(BASE_IMAGE)
    if client is None:
        return 2
    signal.signal(signal.SIGTERM, interrupt)
    log("building the PostgreSQL image")
    image = build_image(BASE_IMAGE)
    work = Path(tempfile.mkdtemp(prefix="bench-postgres-", dir=args.workdir))
    database = start_database(
        client, image, "bench-pg", labels={"backup.pre-stop-command": PRE_STOP}
    )
    try:
        return benchmark(args, database, work)
    finally:
        log("cleaning up containers, volumes and temporary directories")
        database.remove()
        shutil.rmtree(work, ignore_errors=True)
        client.close()


def benchmark(args: argparse.Namespace, database: Database, work: Path) -> int:
    load_before = loadavg()
    log(f"pgbench -i -s {args.scale}")
    database.run("pgbench", "-i", "-q", "-s", str(args.scale))
    load = database.start_load(args.clients)
    agents = {"this agent": ROOT}
    if args.baseline_agent:
        agents["baseline agent"] = args.baseline_agent.resolve()
    handovers = {name: work / f"handover-{index}" for index, name in enumerate(agents)}
    log(f"warming up under load for {args.warm_up:.0f} s")
    time.sleep(args.warm_up)
    for name, root in agents.items():
        log(f"priming the mirror of {name} (its first copy is not measured)")
        run_backup("prime", env_for(database, handovers[name]), handovers[name], work, root)
    data_bytes, wal_bytes = volume_size(database.data_dir)

    cp, calls, ready, floor_outage = Measured(), Measured(), Measured(), Measured()
    methods: dict[tuple[str, str], Method] = {}
    for round_ in range(1, args.repeat + 1):
        log(f"round {round_} of {args.repeat}")
        cp.values.append(cp_volume(database, work / "cp-copy"))
        stop, up, outage = stop_start(database, load)
        calls.values.append(stop)
        ready.values.append(up)
        floor_outage.values.append(outage)
        log(
            f"  cp -a {cp.values[-1]:.2f} s; docker stop + start {stop:.2f} s, "
            f"until a query works {up:.2f} s, clients locked out {outage:.2f} s"
        )
        for key, title, extra, both in METHODS:
            for name, root in agents.items():
                if name != "this agent" and not both:
                    continue
                method = methods.setdefault((name, key), Method(f"{name}: {title}"))
                run = measure(
                    database,
                    load,
                    method.title,
                    env_for(database, handovers[name], **extra),
                    handovers[name],
                    work,
                    root,
                )
                method.runs.append(run)
                log(
                    f"  {method.title}: downtime {run.agent.downtime:.2f} s, clients locked "
                    f"out {run.outage:.2f} s, collection {run.collect:.2f} s, tree "
                    f"{run.agent.rss_tree_mb:.0f} MB"
                )
    return report(
        args, database, methods, cp, calls, ready, floor_outage, data_bytes, wal_bytes, load_before
    )


def report(
    args: argparse.Namespace,
    database: Database,
    methods: dict[tuple[str, str], Method],
    cp: Measured,
    calls: Measured,
    ready: Measured,
    floor_outage: Measured,
    data_bytes: int,
    wal_bytes: int,
    load_before: str,
) -> int:
    MB = 1e6
    baselines = [
        ("cp -a of the volume", cp.cell()),
        ("docker stop + start alone (API calls)", calls.cell()),
        ("docker stop + start until a query works", ready.cell()),
        ("clients could not connect during docker stop + start", floor_outage.cell()),
    ]
    rows = [method.row() for method in methods.values()]
    target = calls.median + DOWNTIME_VS_CP * cp.median
    verdicts = []
    for (agent, key), method in methods.items():
        direct = methods.get((agent, "direct"))
        if agent == "this agent" and key == "default":
            verdicts.append(
                (
                    f"{method.title}: downtime <= stop + start + {DOWNTIME_VS_CP} x "
                    f"cp -a = {target:.2f} s",
                    f"{method.downtime:.2f} s",
                    "PASS" if method.downtime <= target else "FAIL",
                )
            )
        if direct is not None and key != "direct":
            verdicts.append(
                (
                    f"{method.title}: not slower than {direct.title}",
                    f"{method.downtime:.2f} s vs {direct.downtime:.2f} s",
                    "PASS" if method.downtime <= direct.downtime else "FAIL",
                )
            )
    lines = [
        "# Downtime on PostgreSQL under load",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `python bench/postgres.py "
        f"--scale {args.scale} --clients {args.clients} --repeat {args.repeat}` "
        f"({agent_revision()}) on {os.cpu_count()} cores, Linux {platform.release()}; load "
        f"average {load_before} before, {loadavg()} after.",
        "",
        f"- PostgreSQL 15 (Debian) in a Docker named volume: {data_bytes / MB:.0f} MB database + "
        f"{wal_bytes / MB:.0f} MB pg_wal after `pgbench -i -s {args.scale}` and the load; "
        f"`pgbench -c {args.clients}` runs throughout, restarted whenever the server went away; a "
        "probe opens a connection every 100 ms.",
        "- Downtime: `downtime_seconds` of the generation's manifest (1.a stop to 1.c start). "
        "Clients could not connect: the longest gap between two successful probe connections "
        "during the run. Collection while stopped: the final pass (mirror) or the archive "
        "(direct). Peak RSS: the sum of VmRSS over the agent's process tree (agent, rsync, tar, "
        "zstd), sampled every 50 ms; in brackets the agent's own VmHWM.",
        f"- Medians of {args.repeat} rounds (min-max), every method once per round; the mirror "
        "of each agent is kept between its runs, as on a host with a cron schedule. Caches warm. "
        "The machine is shared (2 cores), so figures are noisy.",
        "",
        "## Baselines",
        "",
        markdown_table(("baseline", "time"), baselines),
        "",
        "## Agent",
        "",
        markdown_table(HEADERS, rows),
        "",
        "## Targets",
        "",
        markdown_table(("target", "measured", "verdict"), verdicts),
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    RESULTS.with_name("postgres-agent.log").write_text(
        "".join(f"===== {m.title}\n{r.agent.stderr}\n" for m in methods.values() for r in m.runs)
    )
    log(f"wrote {RESULTS.relative_to(ROOT)}")
    ours = [v for v in verdicts if v[0].startswith("this agent")]  # the baseline's are info
    return 0 if all(v[2] == "PASS" for v in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
