#!/usr/bin/env python3
"""Benchmark of encryption at rest: the archive step of `backup-agent source backup` (tar →
zstd → sha256 → file, `agent.core.archive.create`) with ENCRYPT_RECIPIENTS against the same step
without, measured in the same run.

    python bench/encryption.py [--size-gib 1] [--repeat 3] [--workdir DIR]

(run from the repository root). It builds the mixed data set of bench/push.py (one large
file, half random and half text; ~5000 small files; 16 MiB files up to the size; text logs) in
a temporary directory, makes an age key with `age-keygen`, then --repeat times, interleaved,
with page caches dropped before every run when allowed (root):

- a. baseline: `agent.core.archive.create` as the agent runs it without encryption (zstd level 1,
  every core), in a fresh process;
- b. the same with one age recipient: tar → zstd → sha256 of the plaintext → age → sha256 of
  the ciphertext → file, in the same pass;
- c. for information, `age -d -i KEY data.tar.zst.age | zstd -d | tar -t`: decrypting by
  hand with the standard tools.

Target: b takes <= 1.15 x a's time (medians). The decrypted archive of b is compared with a's
archive (same bytes) the first time. Peak RSS of a and b is reported (memory stays flat
whatever the size). It prints a table and writes it as markdown to
bench/results/encryption.md. Everything it creates is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
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

from common import (  # noqa: E402
    Content,
    MiB,
    agent_revision,
    drop_caches,
    interrupt,
    log,
    make_data_set,
    markdown_table,
    text_table,
    throughput,
    verdict,
)

TARGET = 1.15
ZSTD_LEVEL = 1
ARCHIVE_ONE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from agent.core import archive, encryption
recipients = encryption.parse_recipients(sys.argv[5]) if sys.argv[5] else ()
start = time.perf_counter()
done = archive.create(Path(sys.argv[2]), [sys.argv[3]], Path(sys.argv[4]), int(sys.argv[6]), 0,
                      recipients)
seconds = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss would also count the parent's pages before exec)
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"seconds": seconds, "size": done.stored.size, "hwm_kib": int(hwm),
                  "plaintext": done.plaintext.sha256 if done.plaintext else done.stored.sha256}))
"""


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    size: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def cell(self) -> str:
        return f"{self.median:.2f} s (" + ", ".join(f"{s:.2f}" for s in self.seconds) + ")"


def archive_once(
    root: Path, member: str, target: Path, recipients: str
) -> tuple[dict, float, float]:
    """Run agent.core.archive.create in a fresh process. Return its report, its CPU seconds and its
    peak RSS in MiB."""
    target.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ARCHIVE_ONE,
            str(ROOT),
            str(root),
            member,
            str(target),
            recipients,
            str(ZSTD_LEVEL),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    out = process.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"archive.create failed (exit {process.returncode})")
    report = json.loads(out)
    return report, usage.ru_utime + usage.ru_stime, report["hwm_kib"] / 1024


def by_hand(key: Path, archive: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        f"age -d -i '{key}' '{archive}' | zstd -dc --no-progress | tar -t >/dev/null",
        shell=True,
        check=True,
    )
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="size of the data set")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (median)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to build the data set (default: a temporary directory)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    work = Path(tempfile.mkdtemp(prefix="bench-encryption-", dir=args.workdir))
    try:
        return benchmark(args.size_gib, args.repeat, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def benchmark(size_gib: float, repeat: int, work: Path) -> int:
    data = work / "data"
    data.mkdir()
    log(f"building the data set ({size_gib} GiB) in {data}")
    ds = make_data_set(data, size_gib, Content(7))
    log(f"  {ds.describe()}")
    key = work / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(
        ["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True
    ).stdout.strip()
    cold = drop_caches()
    plain, encrypted, manual = Runs(), Runs(), []
    plain_target, encrypted_target = work / "data.tar.zst", work / "data.tar.zst.age"
    checked = False
    for round_ in range(1, repeat + 1):
        for name, runs, target, recipients in (
            ("a. without encryption", plain, plain_target, ""),
            ("b. encrypted (age)", encrypted, encrypted_target, public),
        ):
            drop_caches()
            report, cpu, rss = archive_once(work, "data", target, recipients)
            runs.seconds.append(report["seconds"])
            runs.cpu.append(cpu)
            runs.rss_mb.append(rss)
            runs.size = report["size"]
            log(
                f"  round {round_} {name}: {report['seconds']:.2f} s, {cpu:.1f} CPU s, "
                f"peak RSS {rss:.0f} MiB"
            )
        if not checked:
            decrypted = subprocess.run(
                ["age", "-d", "-i", str(key), str(encrypted_target)],
                check=True,
                capture_output=True,
            ).stdout
            if decrypted != plain_target.read_bytes():
                log("FAIL: the decrypted archive differs from the unencrypted one")
                return 1
            checked = True
        drop_caches()
        manual.append(by_hand(key, encrypted_target))
        log(f"  round {round_} c. age -d | zstd -d | tar -t: {manual[-1]:.2f} s")

    ratio = encrypted.median / plain.median
    headers = (
        "case",
        "time (median; runs)",
        "MiB/s of data",
        "CPU s (median)",
        "peak RSS",
        "stored size",
        "target",
    )
    rows = [
        (
            "a. archive step without encryption",
            plain.cell(),
            f"{throughput(ds.bytes, plain.median):.0f}",
            f"{statistics.median(plain.cpu):.1f}",
            f"{max(plain.rss_mb):.0f} MiB",
            f"{plain.size / MiB:.1f} MiB",
            "baseline",
        ),
        (
            "b. archive step encrypted to one age recipient",
            encrypted.cell(),
            f"{throughput(ds.bytes, encrypted.median):.0f}",
            f"{statistics.median(encrypted.cpu):.1f}",
            f"{max(encrypted.rss_mb):.0f} MiB",
            f"{encrypted.size / MiB:.1f} MiB",
            f"{ratio:.2f} x a (<= {TARGET} x: {verdict(ratio <= TARGET)})",
        ),
        (
            "c. by hand: age -d | zstd -d | tar -t",
            f"{statistics.median(manual):.2f} s",
            "",
            "",
            "",
            "",
            "information",
        ),
    ]
    print(text_table(headers, rows))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join(
        [
            "# Benchmark: encryption at rest (archive step of `source backup`)",
            "",
            f"{when}, {agent_revision()}, {platform.node()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}; data set {size_gib} GiB: {ds.describe()}; "
            f"zstd level {ZSTD_LEVEL}, every core; {repeat} runs each, interleaved; page caches "
            f"{'dropped before every run' if cold else 'warm (not root)'}.",
            "",
            markdown_table(headers, rows),
            "",
            "- a/b: `agent.core.archive.create` in a fresh process, as `source backup` runs it "
            "after "
            "the application is started again; b also hashes the plaintext and encrypts with "
            "pyrage (age, ChaCha20-Poly1305 in 64 KiB chunks) in the same pass.",
            "- The decrypted archive of b was checked to be byte for byte a's archive.",
            "",
        ]
    )
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "encryption.md").write_text(report)
    log(f"written to {results / 'encryption.md'}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
