#!/usr/bin/env python3
"""Benchmark of step 1, `backup-agent source backup`, against baselines measured in the same run.

    python bench/source_backup.py [--size-gib 1] [--workdir DIR] [--repeat 3]

It builds a mixed data set (one large file, thousands of small files, text logs) in Docker named
volumes used by a real running application container, measures `cp -a` (what a stop-copy-start
design keeps the application down for) and `tar | zstd -T0 | sha256sum` (one archive pass), then
runs the agent: first run, nothing changed, 10 MB + 50 files changed before the run, the same
change landing while the application stops (after the pre-copy, so the final pass must copy it;
reported on its own too), and, for information, nothing changed with QUIESCE_MODE=pause and with
COLLECT_MODE=direct (no case may be slower than that). With --baseline-agent an earlier agent
runs the same cases, interleaved. Every baseline and case is measured
--repeat times and the median reported.
A second data set with 20x more tiny files shows whether peak RSS grows with the file count.

It prints a table against the targets of the performance design and writes it as markdown to
bench/results/source_backup.md. Page caches are dropped before every measurement when possible
(root), otherwise everything runs warm; the report says which. Everything the benchmark creates
(containers, volumes, temporary directories) is removed at the end, also on failure.
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
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import docker
import docker.errors
from common import (
    Content,
    KiB,
    MiB,
    docker_with_image,
    drop_caches,
    interrupt,
    log,
    markdown_table,
    text_table,
    verdict,
    write_chunked,
)

from agent.config import SETTINGS_BY_ENV

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "source_backup.md"
AGENT_LOG = RESULTS.with_name("source_backup-agent.log")
BASE_IMAGE = os.environ.get("BASE_IMAGE", "backup-agent-base:bookworm")
ZSTD_LEVEL = SETTINGS_BY_ENV["ZSTD_LEVEL"].default  # the baseline compresses as the agent does
CHANGE_BYTES = 10 * MiB
CHANGED_FILES = 50
MANY_FILES_FACTOR = 20

# Targets of the performance design (the numbers).
DOWNTIME_VS_CP = 0.15
DOWNTIME_ON_STOP_VS_CP = 0.2  # case c': the change lands after the pre-copy
BASELINE_AGENT = "baseline agent: "
FIRST_RUN_VS_BASELINE = 1.3
RSS_LIMIT_MB = 150.0
RSS_GROWTH_LIMIT = 0.10

# The application: appends to its log; on SIGTERM it exits at once, unless the benchmark left
# /control/change-on-stop, in which case it first rewrites 10 MiB of the large file in place and
# 50 small files (an application that flushes state on shutdown: the change lands after the
# agent's bulk pass, so the final pass, inside the downtime, has to copy it).
APP_SCRIPT = r"""
on_stop() {
  if [ -f /control/change-on-stop ]; then
    dd if=/control/blob of=/data/large.bin bs=1M seek="$(cat /control/offset-mib)" \
       conv=notrunc status=none
    cp -r /control/changes/. /data/
    rm -f /control/change-on-stop
  fi
  exit 0
}
trap on_stop TERM
i=0
while true; do
  i=$((i+1))
  echo "$(date -u +%FT%T.%N) INFO worker-1 request $i handled status=200" >> /logs/app.log
  sleep 0.2 & wait $!
done
"""

# Runs the agent in-process and reports its own peak RSS: VmHWM, the high-water mark of this
# process's memory since exec. (Not ru_maxrss: a child started with vfork, as subprocess does,
# inherits the parent's high-water mark in ru_maxrss at exec, so it would report the benchmark's
# own peak, not the agent's.)
WRAPPER = """
import re, sys
from agent.cli import main
code = 1
try:
    code = main(sys.argv[2:])
finally:
    with open("/proc/self/status") as status:
        hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read())[1])
    with open(sys.argv[1], "w") as handle:
        handle.write(str(hwm))
sys.exit(code)
"""

STEP_LINE = re.compile(r"agent\.steps: (?P<step>.+): done in (?P<seconds>[\d.]+) s$")


# ---------------------------------------------------------------- caches and timing


class Cache:
    """Puts every measurement in the same cache state: cold when caches can be dropped, else
    warm (everything was just written, and the machine's RAM holds it)."""

    def __init__(self) -> None:
        self.cold = drop_caches()

    def prepare(self) -> None:
        if self.cold:
            drop_caches()
        else:
            os.sync()

    @property
    def mode(self) -> str:
        return (
            "cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before every measurement"
            if self.cold
            else "warm: page caches could not be dropped (not root); all "
            "measurements run with the data set in the page cache"
        )


def run_timed(command: list[str], **kwargs: object) -> float:
    """Run `command`, raise if it fails, return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(command, check=True, **kwargs)  # type: ignore[arg-type]
    return time.perf_counter() - start


# ---------------------------------------------------------------- the data sets


@dataclass
class DataSet:
    """What was written into the data and logs volumes."""

    data_dir: Path
    logs_dir: Path
    large: Path | None = None
    small: list[Path] = field(default_factory=list)
    files: int = 0
    data_bytes: int = 0
    log_bytes: int = 0

    def describe(self) -> str:
        return (
            f"{self.files} files, {self.data_bytes / MiB:.0f} MiB data + "
            f"{self.log_bytes / MiB:.0f} MiB logs"
        )


def make_mixed_set(data_dir: Path, logs_dir: Path, size_gib: float, content: Content) -> DataSet:
    """Fill the volumes with ~size_gib GiB: one large file (first half random, second half text),
    small files (1-64 KiB, nested, text or random), medium files filling up to the size, and
    rotated text logs in the logs volume."""
    total = int(size_gib * (1 << 30))
    large_size = int(560 * MiB * size_gib) // MiB * MiB
    small_count = max(CHANGED_FILES, round(5000 * size_gib))
    log_size = int(50 * MiB * size_gib)
    ds = DataSet(data_dir, logs_dir, large=data_dir / "large.bin")

    half = large_size // 2
    ds.data_bytes += write_chunked(
        ds.large,
        (
            *(content.random(min(4 * MiB, half - off)) for off in range(0, half, 4 * MiB)),
            *(
                content.text(min(4 * MiB, large_size - off))
                for off in range(half, large_size, 4 * MiB)
            ),
        ),
    )
    ds.files += 1

    for index in range(small_count):
        folder = data_dir / "small" / f"d{index % 50:02d}" / f"s{index // 50 % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        binary = content.rng.random() < 0.5
        path = folder / f"file-{index:06d}.{'bin' if binary else 'txt'}"
        size = content.rng.randint(KiB, 64 * KiB)
        path.write_bytes(content.mixed(size, binary))
        ds.small.append(path)
        ds.data_bytes += size
        ds.files += 1

    medium_dir = data_dir / "medium"
    medium_dir.mkdir()
    fill = total - ds.data_bytes - log_size
    for index in range(max(0, round(fill / (16 * MiB)))):
        ds.data_bytes += write_chunked(
            medium_dir / f"table-{index:02d}.db",
            (content.mixed(MiB, binary=block % 2 == 0) for block in range(16)),
        )
        ds.files += 1

    rotated = 10
    for index in range(rotated):
        name = "app.log" if index == 0 else f"app.log.{index}"
        ds.log_bytes += write_chunked(logs_dir / name, iter([content.text(log_size // rotated)]))
        ds.files += 1
    return ds


def make_many_files_set(data_dir: Path, logs_dir: Path, count: int, content: Content) -> DataSet:
    """Fill the volumes with `count` tiny files (100-2000 bytes) in nested directories and one
    small log."""
    ds = DataSet(data_dir, logs_dir)
    for index in range(count):
        folder = data_dir / f"d{index % 100:02d}" / f"s{index // 100 % 100:02d}"
        if index < 10000:
            folder.mkdir(parents=True, exist_ok=True)
        size = content.rng.randint(100, 2000)
        (folder / f"f{index:07d}").write_bytes(content.mixed(size, content.rng.random() < 0.5))
        ds.data_bytes += size
        ds.files += 1
    ds.log_bytes += write_chunked(logs_dir / "app.log", iter([content.text(MiB)]))
    ds.files += 1
    return ds


def change_before_run(ds: DataSet, content: Content) -> None:
    """Rewrite 10 MiB in the middle of the large file in place and 50 small files (same size,
    new content), from the host, while the application runs."""
    assert ds.large is not None
    with open(ds.large, "r+b") as handle:
        handle.seek(middle_offset(ds))
        handle.write(content.random(CHANGE_BYTES))
    for path in content.rng.sample(ds.small, CHANGED_FILES):
        path.write_bytes(content.mixed(path.stat().st_size, path.suffix == ".bin"))


def arm_change_on_stop(ds: DataSet, control: Path, content: Content) -> None:
    """Prepare the same kind of change for the application to apply when it receives SIGTERM."""
    changes = control / "changes"
    shutil.rmtree(changes, ignore_errors=True)
    (control / "blob").write_bytes(content.random(CHANGE_BYTES))
    (control / "offset-mib").write_text(str(middle_offset(ds) // MiB))
    for path in content.rng.sample(ds.small, CHANGED_FILES):
        target = changes / path.relative_to(ds.data_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.mixed(path.stat().st_size, path.suffix == ".bin"))
    (control / "change-on-stop").touch()


def middle_offset(ds: DataSet) -> int:
    assert ds.large is not None
    return (ds.large.stat().st_size // 2 - CHANGE_BYTES // 2) // MiB * MiB


# ---------------------------------------------------------------- Docker


@dataclass
class App:
    """A running application container with its data and logs volumes."""

    container: object
    volumes: list[object]
    label: str
    data_dir: Path
    logs_dir: Path


class Resources:
    """Remembers every container, volume and directory made, and removes them all."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.containers: list[object] = []
        self.volumes: list[object] = []
        self.dirs: list[Path] = []

    def app(self, name: str, control: Path) -> App:
        tag = f"{name}-{uuid.uuid4().hex[:8]}"
        label = f"backup.bench-{tag}"
        volumes = []
        for kind in ("data", "logs"):
            volumes.append(self.client.volumes.create(f"bench-{tag}-{kind}"))
            self.volumes.append(volumes[-1])
        container = self.client.containers.run(
            BASE_IMAGE,
            ["bash", "-c", APP_SCRIPT],
            name=f"bench-app-{tag}",
            detach=True,
            labels={label: "true"},
            stop_signal="SIGTERM",
            volumes={
                volumes[0].name: {"bind": "/data", "mode": "rw"},
                volumes[1].name: {"bind": "/logs", "mode": "rw"},
                str(control): {"bind": "/control", "mode": "rw"},
            },
        )
        self.containers.append(container)
        data_dir, logs_dir = (Path(v.attrs["Mountpoint"]) for v in volumes)
        return App(container, volumes, label, data_dir, logs_dir)

    def cleanup(self) -> None:
        for container in reversed(self.containers):
            try:
                container.remove(force=True)  # type: ignore[attr-defined]
            except docker.errors.DockerException as exc:
                log(f"cleanup: could not remove container: {exc}")
        for volume in self.volumes:
            try:
                volume.remove(force=True)  # type: ignore[attr-defined]
            except docker.errors.DockerException as exc:
                log(f"cleanup: could not remove volume {volume.name}: {exc}")  # type: ignore
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


def stop_start_floor(app: App, rounds: int = 3) -> float:
    """Median seconds of `docker stop` + `docker start` of the application alone: what any
    design that stops the application pays before copying a byte."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        app.container.stop(timeout=5)  # type: ignore[attr-defined]
        app.container.start()  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
        time.sleep(1)  # let the app set its SIGTERM trap, or the next stop waits for the timeout
    return statistics.median(times)


# ---------------------------------------------------------------- baselines


def cp_baseline(ds: DataSet, target: Path) -> float:
    """Seconds for `cp -a` of the data and logs directories into a fresh directory."""
    target.mkdir()
    start = time.perf_counter()
    subprocess.run(["cp", "-a", str(ds.data_dir), str(target / "data")], check=True)
    subprocess.run(["cp", "-a", str(ds.logs_dir), str(target / "logs")], check=True)
    elapsed = time.perf_counter() - start
    shutil.rmtree(target)
    return elapsed


def archive_baseline(ds: DataSet, write_to: Path | None = None) -> float:
    """Seconds for `tar -c | zstd -T0 -<level> | sha256sum` (the agent's default level) of the
    data and logs directories; with
    `write_to`, the archive is also written there (tee) and synced, as the agent does."""
    members = " ".join(str(p).lstrip("/") for p in (ds.data_dir, ds.logs_dir))
    tee = f"| tee {write_to} " if write_to else ""
    sync = f" && sync {write_to}" if write_to else ""
    # The app appends to its log meanwhile: tar's exit 1 ("file changed as we read it") is fine.
    script = (
        f"set -o pipefail; {{ tar -cf - --warning=no-file-changed -C / {members}; "
        f"[ $? -le 1 ]; }} | zstd -T0 -{ZSTD_LEVEL} -q -c {tee}| sha256sum >/dev/null{sync}"
    )
    elapsed = run_timed(["bash", "-c", script])
    if write_to:
        write_to.unlink()
    return elapsed


# ---------------------------------------------------------------- agent runs


@dataclass
class AgentRun:
    """The figures of one `backup-agent source backup` run."""

    case: str
    downtime: float
    whole: float
    rss_self_mb: float
    rss_child_mb: float
    rss_child_name: str
    rss_tree_mb: float
    steps: dict[str, float]
    archive_bytes: int
    stderr: str


def agent_env(app: App, handover: Path, **extra: str) -> dict[str, str]:
    """The environment of a source agent backing up `app` into `handover`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "DOCKER_HOST", "PYTHONPATH")
    }
    env.update(
        SOURCE_ID="bench-source",
        DATA_PATHS=str(app.data_dir),
        LOG_PATHS=str(app.logs_dir),
        HANDOVER_DIR=str(handover),
        STOP_LABEL=f"{app.label}=true",
        STOP_TIMEOUT="5",
        # an earlier agent ran these in every container on the host (issue 11)
        PRE_COMMAND_LABEL=f"{app.label}.pre-command",
        POST_COMMAND_LABEL=f"{app.label}.post-command",
        **extra,
    )
    return env


class TreeSampler(threading.Thread):
    """Samples, every 50 ms, the processes below `root` (rsync, tar, cp): the highest VmHWM of
    any one of them, and the highest sum of VmRSS of the whole tree including `root`.
    (RUSAGE_CHILDREN is no use here: see WRAPPER.)"""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.done = threading.Event()
        self.child_peak_kib = 0
        self.child_name = ""
        self.tree_peak_kib = 0

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.sample()

    def sample(self) -> None:
        parents: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(entry.path, "stat").read_text()
                except OSError:
                    continue
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        tree, frontier = {self.root}, [self.root]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        total = 0
        for pid in tree:
            status = _status(pid)
            total += status.get("VmRSS", 0)
            if pid != self.root and status.get("VmHWM", 0) > self.child_peak_kib:
                self.child_peak_kib, self.child_name = status["VmHWM"], str(status.get("Name"))
        self.tree_peak_kib = max(self.tree_peak_kib, total)


def _status(pid: int) -> dict[str, int | str]:
    """VmRSS and VmHWM (KiB) and Name of a process; empty if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    found: dict[str, int | str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
        elif key == "Name":
            found[key] = value.strip()
    return found


def run_agent(case: str, app: App, handover: Path, scratch: Path, **extra: str) -> AgentRun:
    """Run the agent once in a fresh process; return its figures. The new generation is then
    removed from the handover, as a transport would move it away (the mirror stays)."""
    return run_backup(case, agent_env(app, handover, **extra), handover, scratch)


def run_backup(
    case: str, env: dict[str, str], handover: Path, scratch: Path, agent_root: Path = ROOT
) -> AgentRun:
    """Run `source backup` of the agent in `agent_root` with `env` in a fresh process; return
    its figures, and remove the new generation from `handover`."""
    usage = scratch / f"vmhwm-{uuid.uuid4().hex[:8]}.txt"
    env = {**env, "PYTHONPATH": str(agent_root)}
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(usage), "--env-file", os.devnull, "source", "backup"],
        env=env,
        cwd=agent_root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = TreeSampler(process.pid)
    sampler.start()
    _, stderr = process.communicate()
    whole = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(
            f"agent failed in case {case!r} (exit {process.returncode}):\n{stderr[-4000:]}"
        )
    self_kib = int(usage.read_text())
    steps: dict[str, float] = {}
    for line in stderr.splitlines():
        match = STEP_LINE.search(line)
        if match:
            steps[match["step"]] = steps.get(match["step"], 0.0) + float(match["seconds"])
    [gen_dir] = [d for d in (handover / "data").iterdir() if (d / "MANIFEST.json").exists()]
    manifest = json.loads((gen_dir / "MANIFEST.json").read_text())
    archive_bytes = sum(entry["size"] for entry in manifest["files"])
    for kind in ("data", "logs"):
        shutil.rmtree(handover / kind / gen_dir.name, ignore_errors=True)
    return AgentRun(
        case,
        float(manifest["downtime_seconds"]),
        whole,
        self_kib * 1024 / 1e6,
        sampler.child_peak_kib * 1024 / 1e6,
        sampler.child_name,
        sampler.tree_peak_kib * 1024 / 1e6,
        steps,
        archive_bytes,
        stderr,
    )


# ---------------------------------------------------------------- aggregation and report


@dataclass
class Measured:
    """Repeated measurements of one figure: the median is reported, with the range."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def cell(self, unit: str = " s") -> str:
        if len(self.values) == 1:
            return f"{self.median:.2f}{unit}"
        return f"{self.median:.2f}{unit} ({min(self.values):.2f}-{max(self.values):.2f})"


@dataclass
class Case:
    """All runs of one agent case: medians of times, maxima of memory."""

    title: str
    runs: list[AgentRun] = field(default_factory=list)

    @property
    def downtime(self) -> Measured:
        return Measured([r.downtime for r in self.runs])

    @property
    def whole(self) -> Measured:
        return Measured([r.whole for r in self.runs])

    @property
    def rss_self_mb(self) -> float:
        return max(r.rss_self_mb for r in self.runs)

    @property
    def rss_tree_mb(self) -> float:
        return max(r.rss_tree_mb for r in self.runs)

    @property
    def largest_child(self) -> tuple[float, str]:
        run = max(self.runs, key=lambda r: r.rss_child_mb)
        return run.rss_child_mb, run.rss_child_name

    def step_medians(self) -> dict[str, float]:
        names = dict.fromkeys(name for run in self.runs for name in run.steps)
        return {
            name: statistics.median(run.steps.get(name, 0.0) for run in self.runs) for name in names
        }


def rss_cell(ds: DataSet, case: Case) -> str:
    child, name = case.largest_child
    return (
        f"{ds.files} files: {case.rss_self_mb:.0f} / {child:.0f} ({name}) / "
        f"{case.rss_tree_mb:.0f} MB"
    )


HEADERS = ("case", "downtime", "baseline", "ratio", "target", "whole job", "peak RSS")


def main_rows(
    cases: dict[str, Case], cp: Measured, tar: Measured, many: dict[str, Case], many_cp: Measured
) -> tuple[list[tuple[str, ...]], bool]:
    """The main table, one row per case against its target (medians); and whether all pass.
    Every case of this agent must also be no slower than COLLECT_MODE=direct."""
    rows, all_ok = [], True
    for key, case in cases.items():
        rss_ok = case.rss_self_mb <= RSS_LIMIT_MB
        rss = f"{case.rss_self_mb:.0f} MB: {verdict(rss_ok)}"
        baseline_agent = key.startswith(BASELINE_AGENT)
        direct = cases[BASELINE_AGENT * baseline_agent + "direct (info)"]
        info = key.endswith("(info)") or baseline_agent
        limit = DOWNTIME_ON_STOP_VS_CP if key == "changed-on-stop" else DOWNTIME_VS_CP
        if key.removeprefix(BASELINE_AGENT) == "first":
            base = cp.median + tar.median
            ratio = case.whole.median / base
            ok = ratio <= FIRST_RUN_VS_BASELINE
            baseline = f"{base:.2f} s (cp -a + tar|zstd|sha)"
            target = (
                "info, no target" if info else f"whole <= {FIRST_RUN_VS_BASELINE} x: {verdict(ok)}"
            )
            ratio_cell = f"{ratio:.2f} (whole)"
        else:
            ratio = case.downtime.median / cp.median
            ok = ratio <= limit
            baseline = f"{cp.median:.2f} s (cp -a)"
            target = "info, no target" if info else f"downtime <= {limit} x: {verdict(ok)}"
            ratio_cell = f"{ratio:.2f} (downtime)"
        if case is not direct:
            not_slower = case.downtime.median <= direct.downtime.median
            target += f"; <= direct: {verdict(not_slower)}"
            ok = ok and not_slower
        if not info:
            all_ok = all_ok and ok and rss_ok
        rows.append(
            (case.title, case.downtime.cell(), baseline, ratio_cell, target, case.whole.cell(), rss)
        )
    for case in many.values():
        rows.append(
            (
                f"{case.title} (info)",
                case.downtime.cell(),
                f"{many_cp.median:.2f} s (cp -a)",
                f"{case.downtime.median / many_cp.median:.2f} (downtime)",
                "info, no target",
                case.whole.cell(),
                f"{case.rss_self_mb:.0f} MB",
            )
        )
    return rows, all_ok


def rss_rows(
    ds: DataSet, cases: dict[str, Case], many: DataSet, many_cases: dict[str, Case]
) -> tuple[list[tuple[str, ...]], bool]:
    """Peak RSS of the agent for the mixed set and the set with 20x more files."""
    rows, all_ok = [], True
    for key, label in (("first", "first run"), ("unchanged", "nothing changed")):
        small, big = cases[key].rss_self_mb, many_cases[key].rss_self_mb
        growth = big / small - 1
        ok = growth <= RSS_GROWTH_LIMIT and big <= RSS_LIMIT_MB
        all_ok = all_ok and ok
        rows.append(
            (
                label,
                rss_cell(ds, cases[key]),
                rss_cell(many, many_cases[key]),
                f"{growth:+.0%}",
                f"<= +{RSS_GROWTH_LIMIT:.0%} and <= {RSS_LIMIT_MB:.0f} MB: {verdict(ok)}",
            )
        )
    return rows, all_ok


FINAL_PASS = "1.b collect application data, 1.d collect log data (final pass, application stopped)"
ON_STOP_HEADERS = (
    "case",
    "downtime",
    "final pass alone",
    "docker stop + start alone",
    "downtime / cp -a",
    "target",
)


def on_stop_rows(cases: dict[str, Case], cp: Measured, floor: float) -> list[tuple[str, ...]]:
    """Case c' on its own: the change lands after the pre-copy, so the final pass must copy it
    while the application is stopped."""
    rows = []
    for prefix in ("", BASELINE_AGENT):
        case = cases.get(prefix + "changed-on-stop")
        if case is None:
            continue
        ratio = case.downtime.median / cp.median
        target = (
            "info, no target"
            if prefix
            else f"<= {DOWNTIME_ON_STOP_VS_CP} x: {verdict(ratio <= DOWNTIME_ON_STOP_VS_CP)}"
        )
        rows.append(
            (
                case.title,
                case.downtime.cell(),
                f"{case.step_medians().get(FINAL_PASS, 0.0):.2f} s",
                f"{floor:.2f} s",
                f"{ratio:.2f}",
                target,
            )
        )
    return rows


RSS_HEADERS = (
    "agent run",
    "mixed set: agent / largest child / whole tree",
    f"{MANY_FILES_FACTOR}x files: agent / largest child / whole tree",
    "growth",
    "target",
)


def step_table(cases: list[Case]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Median seconds per agent step (from its log lines), one column per case."""
    medians = [case.step_medians() for case in cases]
    names = list(dict.fromkeys(name for m in medians for name in m))
    headers = ("step", *(case.title for case in cases))
    rows = [(name, *(f"{m[name]:.2f}" if name in m else "-" for m in medians)) for name in names]
    return headers, rows


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="size of the mixed data set")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the handovers and baseline copies go (a temporary "
        "directory is made inside it; default: the system's temp dir)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="measure every baseline and agent case this many times and report "
        "the median (default: 3)",
    )
    parser.add_argument(
        "--baseline-agent",
        type=Path,
        default=None,
        help="the root of an earlier agent's checkout (e.g. `git archive "
        "<commit> agent | tar -x -C DIR`): its runs of the mixed-set cases "
        "are interleaved with this agent's and reported beside them",
    )
    args = parser.parse_args()

    client = docker_with_image(BASE_IMAGE)
    if client is None:
        return 2
    signal.signal(signal.SIGTERM, interrupt)

    resources = Resources(client)
    try:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="bench-source-backup-", dir=args.workdir))
        resources.dirs.append(work)
        return benchmark(args.size_gib, max(1, args.repeat), work, resources, args.baseline_agent)
    finally:
        log("cleaning up containers, volumes and temporary directories")
        resources.cleanup()
        client.close()


CASES = (
    ("first", "a. first run (empty handover)", None, {}),
    ("unchanged", "b. nothing changed", None, {}),
    ("changed", "c. 10 MB + 50 files changed before the run", "before", {}),
    ("changed-on-stop", "c'. same change, written by the app as it stops", "on-stop", {}),
    ("pause (info)", "b'. nothing changed, QUIESCE_MODE=pause", None, {"QUIESCE_MODE": "pause"}),
    ("direct (info)", "d. nothing changed, COLLECT_MODE=direct", None, {"COLLECT_MODE": "direct"}),
)


def benchmark(
    size_gib: float,
    repeat: int,
    work: Path,
    resources: Resources,
    baseline_agent: Path | None = None,
) -> int:
    """Make the data sets, measure baselines and agent runs, print and write the report."""
    control = work / "control"
    control.mkdir()
    cache = Cache()
    content = Content(seed=20261128)
    load_before = loadavg()

    log("starting the application containers")
    app = resources.app("mixed", control)
    (control / "many").mkdir()
    many_app = resources.app("many", control / "many")

    log(f"writing the mixed data set (~{size_gib:g} GiB)")
    start = time.perf_counter()
    ds = make_mixed_set(app.data_dir, app.logs_dir, size_gib, content)
    many_count = MANY_FILES_FACTOR * len(ds.small)
    log(
        f"  {ds.describe()} in {time.perf_counter() - start:.1f} s; "
        f"writing {many_count} tiny files for the file-count set"
    )
    many = make_many_files_set(many_app.data_dir, many_app.logs_dir, many_count, content)
    log(f"  {many.describe()}")

    log("baseline: docker stop + start of the application alone (median of 3)")
    floor = stop_start_floor(app)
    cache.prepare()
    log("baseline (info): cp -a of the file-count set")
    many_cp = Measured([cp_baseline(many, work / "cp-copy-many")])

    cp, tar, tar_written = Measured(), Measured(), Measured()
    agents = {"": (ROOT, work / "handover")}
    if baseline_agent is not None:
        agents[BASELINE_AGENT] = (baseline_agent.resolve(), work / "handover-baseline")
    cases = {prefix + key: Case(prefix + title) for key, title, _, _ in CASES for prefix in agents}
    for round_ in range(1, repeat + 1):
        log(f"round {round_} of {repeat}")
        cache.prepare()
        cp.values.append(cp_baseline(ds, work / "cp-copy"))
        cache.prepare()
        tar.values.append(archive_baseline(ds))
        cache.prepare()
        tar_written.values.append(archive_baseline(ds, work / "baseline.tar.zst"))
        log(
            f"  cp -a {cp.values[-1]:.2f} s, tar|zstd|sha {tar.values[-1]:.2f} s, "
            f"with the archive written {tar_written.values[-1]:.2f} s"
        )
        for _, handover in agents.values():
            shutil.rmtree(handover, ignore_errors=True)
        for key, title, change, extra in CASES:
            for prefix, (agent_root, handover) in agents.items():
                if change == "before":
                    change_before_run(ds, content)
                elif change == "on-stop":
                    arm_change_on_stop(ds, control, content)
                cache.prepare()
                run = run_backup(
                    prefix + title, agent_env(app, handover, **extra), handover, work, agent_root
                )
                if change == "on-stop" and (control / "change-on-stop").exists():
                    raise RuntimeError("the application did not apply its change on stop")
                cases[prefix + key].runs.append(run)
                log(
                    f"  {prefix or 'agent, '}{title}: downtime {run.downtime:.2f} s, whole "
                    f"{run.whole:.2f} s, RSS {run.rss_self_mb:.0f} MB"
                )

    many_handover = work / "handover-many"
    many_cases = {
        "first": Case(f"{MANY_FILES_FACTOR}x files: first run"),
        "unchanged": Case(f"{MANY_FILES_FACTOR}x files: nothing changed"),
    }
    for round_ in range(1, repeat + 1):
        shutil.rmtree(many_handover, ignore_errors=True)
        for case in many_cases.values():
            cache.prepare()
            run = run_agent(case.title, many_app, many_handover, work)
            case.runs.append(run)
            log(
                f"  agent, {case.title} ({round_}/{repeat}): downtime {run.downtime:.2f} s, "
                f"whole {run.whole:.2f} s, RSS {run.rss_self_mb:.0f} MB"
            )
    load_after = loadavg()

    table, main_ok = main_rows(cases, cp, tar, many_cases, many_cp)
    memory, memory_ok = rss_rows(ds, cases, many, many_cases)
    step_headers, steps = step_table([*cases.values(), *many_cases.values()])
    baselines = [
        ("docker stop + start of the app alone (median of 3)", f"{floor:.2f} s"),
        ("cp -a data + logs to a fresh dir", cp.cell()),
        (f"tar -c | zstd -T0 -{ZSTD_LEVEL} | sha256sum", tar.cell()),
        (
            f"tar -c | zstd -T0 -{ZSTD_LEVEL} | tee file | sha256sum; sync file (info)",
            tar_written.cell(),
        ),
        (f"cp -a of the {MANY_FILES_FACTOR}x files set (info)", many_cp.cell()),
    ]
    all_ok = main_ok and memory_ok
    times = f"median of {repeat} (min-max)" if repeat > 1 else "one run each"

    print()
    print(
        f"Data set: {ds.describe()}; caches {'cold' if cache.cold else 'warm'}; times: {times}; "
        f"load average before {load_before}, after {load_after}"
    )
    for headers, rows in (
        (("baseline", "time"), baselines),
        (HEADERS, table),
        (ON_STOP_HEADERS, on_stop_rows(cases, cp, floor)),
        (RSS_HEADERS, memory),
        (step_headers, steps),
    ):
        print(text_table(headers, rows))
        print()
    print(f"overall: {verdict(all_ok)}")

    assert ds.large is not None
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "\n".join(
            [
                "# Source backup benchmark (step 1)",
                "",
                f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `python "
                "bench/source_backup.py "
                f"--size-gib {size_gib:g} --repeat {repeat}` on {os.cpu_count()} cores, "
                f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB "
                "RAM, "
                f"Linux {platform.release()}, Python {platform.python_version()}; load average "
                f"{load_before} before, {load_after} after.",
                "",
                "- Mixed data set, in Docker named volumes of a running container: "
                f"{ds.describe()}: "
                f"one {ds.large.stat().st_size / MiB:.0f} MiB file (first half random, second half "
                f"text), {len(ds.small)} small files of 1-64 KiB (nested, half text, half random), "
                "16 MiB files (alternating random and text MiB) filling up to the size, and 10 "
                "rotated "
                "text logs in a separate logs volume.",
                f"- File-count set: {many.describe()} (100-2000 bytes each).",
                f"- Caches: {cache.mode}.",
                f"- Times: {times}. Downtime: `downtime_seconds` of the generation's MANIFEST.json "
                "(stop + final passes + start). Whole job: wall time of the agent process. Peak "
                "RSS: the "
                "agent's own Python process (its VmHWM, read by the process itself at exit; the "
                "maximum "
                "over the rounds). The file-count table also shows the largest child's VmHWM "
                "(rsync, "
                "tar, cp) and the peak sum of VmRSS over the agent's process tree, both sampled "
                "from "
                "/proc every 50 ms.",
                "- Case c changes the data from the host before the run (the bulk pass, "
                "application "
                "running, takes the change); case c' has the application write the same change "
                "when it "
                "receives SIGTERM, so it lands after the bulk pass and the final pass copies it "
                "inside "
                "the downtime. Case b' is case b with `QUIESCE_MODE=pause`, case d case b with "
                "`COLLECT_MODE=direct` (no case may be slower than d). Rows marked `baseline "
                "agent` ran "
                "an earlier agent (`--baseline-agent`) interleaved with this one, on its own "
                "handover.",
                "- After each run the new generation is removed from the handover, as a transport "
                "would move it; the mirror stays. Each round starts with an empty handover.",
                "",
                "## Baselines",
                "",
                markdown_table(("baseline", "time"), baselines),
                "",
                "## Agent against targets",
                "",
                markdown_table(HEADERS, table),
                "",
                "## Case c' separately",
                "",
                markdown_table(ON_STOP_HEADERS, on_stop_rows(cases, cp, floor)),
                "",
                "## Peak RSS against file count",
                "",
                markdown_table(RSS_HEADERS, memory),
                "",
                "## Median seconds per agent step (from the agent's log lines)",
                "",
                markdown_table(step_headers, steps),
                "",
                f"Overall: **{verdict(all_ok)}**",
                "",
            ]
        )
    )
    AGENT_LOG.write_text(
        "".join(
            f"===== {run.case}\n{run.stderr}\n"
            for case in (*cases.values(), *many_cases.values())
            for run in case.runs
        )
    )
    log(f"wrote {RESULTS.relative_to(ROOT)} and {AGENT_LOG.relative_to(ROOT)}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
