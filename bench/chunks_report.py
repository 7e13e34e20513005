"""The figures bench/chunks.py gathers, and its tables: printed, and written as markdown to
bench/results/chunks.md."""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from chunks_agent import AgentRun
from common import (
    DataSet,
    MiB,
    Series,
    agent_revision,
    log,
    markdown_table,
    text_table,
    verdict,
    weed_version,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "chunks.md"
AGENT_LOG = RESULTS.with_name("chunks-agent.log")

# Targets of the issue.
STORE_VS_RESTIC = 0.9
UPLOAD_VS_CHANGED = 1.5
FIRST_VS_RESTIC = 0.8
RERUN_VS_RESTIC = 1.0
RESTORE_VS_RESTIC = 1.0
PATH_SECONDS = 1.0
RSS_LIMIT = 150 * 10**6
FLAT = 1.2  # "flat": the larger situation's peak RSS at most this times the smaller one's


@dataclass
class Figures:
    args: argparse.Namespace
    load_start: list[str]
    load_end: list[str] = field(default_factory=list)
    cold: bool = False
    minutes: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    storage_set: DataSet | None = None
    storage: list[dict[str, int]] = field(default_factory=list)
    times_set: DataSet | None = None
    times: dict[str, Series] = field(default_factory=lambda: defaultdict(lambda: Series("")))
    one_percent: list[int] = field(default_factory=list)
    rss: dict[str, list[int]] = field(default_factory=dict)
    rss_parts: dict[str, str] = field(default_factory=dict)
    peer_rss: dict[str, list[int]] = field(default_factory=dict)
    file_sets: list[DataSet] = field(default_factory=list)
    agent_runs: list[AgentRun] = field(default_factory=list)
    wrong_format: list[str] = field(default_factory=list)
    changes: tuple[str, str] = ("", "")
    stores: list[tuple[str, str]] = field(default_factory=list)  # storage: (key, title)

    def add_rss(self, title: str, done: AgentRun) -> None:
        """Count the run's peak RSS under `title`; keep the processes of the largest."""
        if done.peak_rss > max(self.rss.get(title, [0])):
            self.rss_parts[title] = done.rss_parts
        self.rss.setdefault(title, []).append(done.peak_rss)

    def check_format(self, done: AgentRun, expected: str) -> None:
        """Note (and say) a run whose generation is not of the format it was asked for."""
        if done.data_format != expected:
            self.wrong_format.append(f"{done.title} made {done.data_format or 'no generation'}")
            log(f"WARNING: {done.title} made a {done.data_format!r} generation, not {expected}")


def exact(size: int) -> str:
    return f"{size:,} ({size / MiB:.1f} MiB)"


def mib(size: float) -> str:
    return f"{size / MiB:.1f} MiB"


def storage_rows(f: Figures) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The storage table, and the rows of the targets it checks."""
    rows = []
    for run, row in enumerate(f.storage, 1):
        before = f.storage[run - 2] if run > 1 else {key: 0 for key in row}
        rows.append(
            (
                str(run),
                mib(row["changed"]) if run > 1 else "(first)",
                *(f"{exact(row[key])}; +{mib(row[key] - before[key])}" for key, _ in f.stores),
            )
        )
    last = f.storage[-1]
    ratio = last["chunks"] / last["restic"]
    targets = [
        (
            f"store after {len(f.storage)} runs ({f.storage_set.describe()})",
            exact(last["chunks"]),
            f"restic {exact(last['restic'])}; borg "
            f"{exact(last['borg'])}; archive {exact(last['archive'])}",
            f"{ratio:.2f}",
            f"<= {STORE_VS_RESTIC} x restic",
            verdict(ratio <= STORE_VS_RESTIC),
        )
    ]
    if len(f.storage) > 1:
        uploads = [
            (row["chunks"] - before["chunks"]) / row["changed"]
            for before, row in itertools.pairwise(f.storage)
        ]
        changed = statistics.median(row["changed"] for row in f.storage[1:])
        added = statistics.median(
            row["chunks"] - before["chunks"] for before, row in itertools.pairwise(f.storage)
        )
        targets.append(
            (
                "added to the store per run after the first (= uploaded: nothing is deleted)",
                f"median {mib(added)}; ratio to changed {min(uploads):.2f}-{max(uploads):.2f}",
                f"changed bytes, median {mib(changed)}",
                f"{max(uploads):.2f} (max)",
                f"<= {UPLOAD_VS_CHANGED} x changed",
                verdict(max(uploads) <= UPLOAD_VS_CHANGED),
            )
        )
    return rows, targets


def time_rows(f: Figures) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    t = f.times
    pairs = [
        (
            "first",
            f"`source run`, first run ({f.times_set.describe()})",
            "restic first backup",
            FIRST_VS_RESTIC,
        ),
        (
            "unchanged",
            "`source run`, nothing changed",
            "restic backup, nothing changed",
            RERUN_VS_RESTIC,
        ),
        (
            "changed",
            "`source run`, 1 % changed"
            + (
                f" (median {mib(statistics.median(f.one_percent))} written)"
                if f.one_percent
                else ""
            ),
            "restic backup of the same change",
            RERUN_VS_RESTIC,
        ),
        (
            "restore",
            "`restore --from s3 --target` of the newest generation",
            "`restic restore latest`",
            RESTORE_VS_RESTIC,
        ),
    ]
    rows, targets = [], []
    for key, ours, theirs, limit in pairs:
        if not t[f"agent {key}"].walls:
            continue
        a, r = t[f"agent {key}"], t[f"restic {key}"]
        ratio = a.median / r.median
        targets.append(
            (
                ours,
                a.time_cell(),
                f"{theirs}: {r.time_cell()}",
                f"{ratio:.2f}",
                f"<= {limit} x",
                verdict(ratio <= limit),
            )
        )
        rows += [(ours, a.time_cell(), a.cpu_cell()), (theirs, r.time_cell(), r.cpu_cell())]
    if t["agent path"].walls:
        a, r = t["agent path"], t["restic path"]
        targets.append(
            (
                "`restore --from s3 --path` of one 1 MiB file",
                a.time_cell(),
                f"`restic restore latest --include`: {r.time_cell()}",
                f"{a.median / r.median:.2f}",
                f"< {PATH_SECONDS:g} s",
                verdict(a.median < PATH_SECONDS),
            )
        )
        rows += [
            ("`restore --path` of one 1 MiB file", a.time_cell(), a.cpu_cell()),
            ("`restic restore --include` of the same file", r.time_cell(), r.cpu_cell()),
        ]
        warm = t["agent path warm"]
        if warm.walls:
            rows.append(
                (
                    "`restore --path` of the same file, caches warm",
                    warm.time_cell(),
                    warm.cpu_cell(),
                )
            )
    floor = t["floor stop-start"]
    if floor.walls:
        rows.append(
            (
                "`docker stop` + `docker start` of the application alone (ours stops it, "
                "restic does not)",
                floor.time_cell(),
                floor.cpu_cell(),
            )
        )
    return rows, targets


def rss_rows(f: Figures) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    rows = [
        (
            title,
            mib(max(peaks)),
            ", ".join(mib(p) for p in peaks) if len(peaks) > 1 else "",
            f.rss_parts.get(title, ""),
        )
        for title, peaks in f.rss.items()
    ]
    rows += [
        (f"peer: {title}", mib(max(peaks)), ", ".join(mib(p) for p in peaks), "")
        for title, peaks in f.peer_rss.items()
    ]
    source_runs = {
        title: peaks
        for title, peaks in f.rss.items()
        if not title.startswith("restore") and "archive" not in title
    }
    targets = []
    if source_runs:
        worst = max(source_runs, key=lambda title: max(source_runs[title]))
        peak = max(source_runs[worst])
        targets.append(
            (
                "peak RSS of the agent's process tree, every chunked `source run`",
                f"{mib(peak)} ({worst})",
                "",
                "",
                f"<= {RSS_LIMIT / 10**6:.0f} MB ({mib(RSS_LIMIT)})",
                verdict(peak <= RSS_LIMIT),
            )
        )
    if len(f.file_sets) == 2:
        low, high = (max(f.rss[f"{ds.files} files, first run"]) for ds in f.file_sets)
        targets.append(
            (
                f"flat in file count: first run on {f.file_sets[1].files} files",
                mib(high),
                f"{f.file_sets[0].files} files: {mib(low)}",
                f"{high / low:.2f}",
                f"<= {FLAT} x",
                verdict(high <= FLAT * low),
            )
        )
    runs = f.rss.get("storage chunks", [])
    if len(runs) > 2:
        later = max(runs[2:])
        targets.append(
            (
                f"flat in generations: runs 3-{len(runs)} of the storage series",
                mib(later),
                f"run 2: {mib(runs[1])}",
                f"{later / runs[1]:.2f}",
                f"<= {FLAT} x",
                verdict(later <= FLAT * runs[1]),
            )
        )
    return rows, targets


def step_rows(f: Figures) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Median seconds per agent step of the chunked runs on the times data set."""
    groups: dict[str, list[AgentRun]] = defaultdict(list)
    for run in f.agent_runs:
        if run.title.startswith("times-"):
            groups[run.title.split(": ", 1)[1]].append(run)
    names: list[str] = []
    for runs in groups.values():
        for run in runs:
            names += [name for name in run.steps if name not in names]
    rows = [
        (
            name,
            *(
                f"{statistics.median(run.steps.get(name, 0.0) for run in runs):.2f}"
                if any(name in run.steps for run in runs)
                else ""
                for runs in groups.values()
            ),
        )
        for name in names
    ]
    rows.append(
        (
            "outside every step line: start-up (imports, configuration, lock) and the end",
            *(
                f"{statistics.median(run.wall - sum(run.steps.values()) for run in runs):.2f}"
                for runs in groups.values()
            ),
        )
    )
    rows.append(
        (
            "whole process",
            *(f"{statistics.median(run.wall for run in runs):.2f}" for runs in groups.values()),
        )
    )
    return ("step (median seconds, times data set)", *groups), rows


def report(f: Figures, parts: set[str]) -> int:
    targets: list[tuple[str, ...]] = []
    sections: list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]] = []
    if f.storage:
        rows, checked = storage_rows(f)
        targets += checked
        sections.append(
            (
                f"Bytes in the store after each run (mixed set of initially "
                f"{f.storage_set.describe()}; exact bytes; + added by the run)",
                ("run", "changed", *(title for _, title in f.stores)),
                rows,
            )
        )
    if f.times_set is not None:
        rows, checked = time_rows(f)
        targets += checked
        sections.append(
            (
                "Times (medians of the runs, min-max; caches "
                + ("dropped before each" if f.cold else "warm")
                + ")",
                ("measurement", "time", "CPU s: client / weed / rest of machine"),
                rows,
            )
        )
    rows, checked = rss_rows(f)
    targets += checked
    sections.append(
        (
            "Peak RSS of the whole process tree (sum over its processes, sampled every 20 ms)",
            ("situation", "peak RSS (max)", "every run", "processes at the largest peak"),
            rows,
        )
    )
    steps_headers, steps = step_rows(f)
    if steps:
        sections.append(("Agent steps", steps_headers, steps))
    if f.wrong_format:
        targets.append(
            (
                "every run of ours in the format asked for",
                f"{len(f.wrong_format)} runs were not, e.g. {f.wrong_format[0]}",
                "",
                "",
                "DATA_FORMAT honoured",
                "FAIL",
            )
        )
    all_ok = all(row[-1] == "PASS" for row in targets)
    target_headers = ("measurement", "ours", "baseline", "ratio", "target", "result")

    args = f.args
    command = (
        f"python bench/chunks.py --size-mib {args.size_mib} --runs {args.runs} "
        f"--rounds {args.rounds} --files {args.files}"
        + (f" --only {args.only}" if parts != {"storage", "times", "restore", "files"} else "")
        + "".join(f" --variant {name}" for name, _ in args.variant)
        + (" --warm" if args.warm else "")
    )
    machine = (
        f"{os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB "
        f"RAM, Linux {platform.release()}, Python {platform.python_version()}, "
        f"{weed_version()}, restic {f.versions.get('restic')}, borg "
        f"{f.versions.get('borg')}"
    )
    revision = agent_revision()
    load = f"{' '.join(f.load_start)} at the start, {' '.join(f.load_end)} at the end"

    print()
    print(f"agent at {revision}; load average {load}")
    print(text_table(target_headers, targets))
    for title, headers, rows in sections:
        print(f"\n{title}\n{text_table(headers, rows)}")
    print(f"\noverall: {verdict(all_ok)}")

    caches = (
        "dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every timed run (not in "
        "the storage series, which counts bytes)"
        if f.cold
        else "not dropped (`--warm`)"
    )
    lines = [
        "# Deduplicated data generations (`DATA_FORMAT=chunks`) against restic and borg",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}` on {machine}; "
        f"agent at {revision}; {f.minutes:.0f} minutes.",
        "",
        "- **The machine is shared and loaded**: about seven engineers build and test on its "
        f"{os.cpu_count()} cores at the same time (load average {load}); times are medians of "
        "interleaved runs, and the CPU column says how busy the rest of the machine was. Bytes "
        "do not depend on the load.",
        "- The agent runs on the host as the other benchmarks run it: `python -m agent "
        "--env-file /dev/null source run` (the whole job: stop the application container, "
        "mirror, start it, build the generation, 2.a upload to S3 and verify, rotate, 2.c move "
        "to the source store), default settings except DATA_FORMAT and, in the storage series, "
        "SINK_KEEP_LAST=1000 (every generation kept, as restic and borg keep every snapshot). "
        "Data in Docker named volumes of a running application container that leaves them "
        "alone; every change is made by the benchmark with seeded content.",
        f"- Changes: storage series, before every run after the first: {f.changes[0]}; times, "
        f"the 1 % run: {f.changes[1]}.",
        "- One SeaweedFS (`weed mini`) on this machine for ours and restic (a bucket each, http "
        "on loopback); borg into a local directory (its repository's file bytes). restic: "
        "repository version 2, compression auto (its default); borg: repokey-blake2, "
        "`--compression zstd,1`. Both choose their chunker parameters randomly per repository, "
        "so their bytes vary a little from one repository to the next.",
        f"- Caches: {caches}.",
        "- Peak RSS: the sum of the resident set of the agent process and all its descendants "
        "(rsync, ...) sampled every 20 ms; shared pages count once per process, so it errs high.",
        "",
        "## Against the targets",
        "",
        markdown_table(target_headers, targets),
        "",
        f"Overall: **{verdict(all_ok)}**",
        "",
    ]
    for title, headers, rows in sections:
        lines += [f"## {title}", "", markdown_table(headers, rows), ""]
    RESULTS.write_text("\n".join(lines))
    AGENT_LOG.write_text("".join(f"===== {run.title}\n{run.stderr}\n" for run in f.agent_runs))
    log(f"wrote {RESULTS.relative_to(ROOT)} and {AGENT_LOG.relative_to(ROOT)}")
    return 0 if all_ok else 1
