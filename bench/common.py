"""What the benchmarks share: reproducible content, cache control, progress lines, tables."""

from __future__ import annotations

import itertools
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KiB, MiB = 1 << 10, 1 << 20


def log(message: str) -> None:
    """Print a progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache. Return False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


class Content:
    """Reproducible content from a seed: random bytes and log-like text."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.words = [
            "".join(self.rng.choices(letters, k=self.rng.randint(2, 10))) for _ in range(3000)
        ]

    def random(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def text(self, size: int) -> bytes:
        chunks, length = [], 0
        while length < size:
            count = max(64, (size - length) // 5)
            seq = self.rng.choices(self.words, k=count)
            stamp = self.rng.randint(0, 10**9)
            lines = [f"{stamp + i} INFO " + " ".join(seq[i : i + 12]) for i in range(0, count, 12)]
            chunk = ("\n".join(lines) + "\n").encode()
            chunks.append(chunk)
            length += len(chunk)
        return b"".join(chunks)[:size]

    def mixed(self, size: int, binary: bool) -> bytes:
        return self.random(size) if binary else self.text(size)


def write_chunked(path: Path, parts: Iterable[bytes]) -> int:
    """Write the parts to `path`; return the bytes written."""
    written = 0
    with open(path, "wb") as handle:
        for part in parts:
            handle.write(part)
            written += len(part)
    return written


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def text_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), "-+-".join("-" * w for w in widths), *map(line, rows)])


def markdown_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    def cell(value: str) -> str:
        return str(value).replace("|", "\\|")

    return "\n".join(
        [
            "| " + " | ".join(map(cell, headers)) + " |",
            "|" + "---|" * len(headers),
            *("| " + " | ".join(map(cell, row)) + " |" for row in rows),
        ]
    )


def docker_with_image(image: str):  # -> docker.DockerClient | None
    """Return a Docker client, or None after saying that `image` is missing (it is built
    locally by tools/build-base-image.sh; no registry is reachable, it is never pulled)."""
    import docker
    import docker.errors

    client = docker.from_env()
    client.ping()
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        print(
            f"image {image} not found; build it with tools/build-base-image.sh "
            "(no registry is reachable; it is never pulled)",
            file=sys.stderr,
        )
        return None
    return client


def interrupt(signum: int, _frame: object) -> None:
    """A SIGTERM handler that raises KeyboardInterrupt, so that the cleanup runs."""
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- the mixed data set


@dataclass
class DataSet:
    root: Path
    files: int = 0
    bytes: int = 0
    parts: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.files} files, {self.bytes / MiB:.0f} MiB"


def make_data_set(root: Path, size_gib: float, content: Content) -> DataSet:
    """Fill `root` with ~size_gib GiB: one large file (first half random, second half text),
    ~5000 small files of 1-64 KiB (nested, half text, half random), 16 MiB medium files
    (alternating random and text MiB) up to the size, and ~50 MiB of rotated text logs."""
    total = int(size_gib * (1 << 30))
    ds = DataSet(root)
    large = int(560 * MiB * size_gib) // MiB * MiB
    half = large // 2
    ds.bytes += write_chunked(
        root / "large.bin",
        itertools.chain(
            (content.random(min(4 * MiB, half - o)) for o in range(0, half, 4 * MiB)),
            (content.text(min(4 * MiB, large - o)) for o in range(half, large, 4 * MiB)),
        ),
    )
    ds.files += 1
    ds.parts.append(f"one {large / MiB:.0f} MiB file (first half random, second half text)")

    small_count, small_bytes = max(50, round(5000 * size_gib)), 0
    for index in range(small_count):
        folder = root / "small" / f"d{index % 50:02d}" / f"s{index // 50 % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        binary = content.rng.random() < 0.5
        size = content.rng.randint(KiB, 64 * KiB)
        (folder / f"file-{index:06d}.{'bin' if binary else 'txt'}").write_bytes(
            content.random(size) if binary else content.text(size)
        )
        small_bytes += size
    ds.files += small_count
    ds.bytes += small_bytes
    ds.parts.append(
        f"{small_count} small files of 1-64 KiB ({small_bytes / MiB:.0f} MiB, "
        "nested, half text, half random)"
    )

    log_size, rotated = int(50 * MiB * size_gib), 10
    (root / "logs").mkdir()
    for index in range(rotated):
        name = "app.log" if index == 0 else f"app.log.{index}"
        ds.bytes += write_chunked(root / "logs" / name, [content.text(log_size // rotated)])
    ds.files += rotated
    ds.parts.append(
        f"{log_size / MiB:.0f} MiB of text logs in {rotated} rotated files "
        "(the application appends to logs/app.log)"
    )

    (root / "medium").mkdir()
    count = max(0, round((total - ds.bytes) / (16 * MiB)))
    for index in range(count):
        ds.bytes += write_chunked(
            root / "medium" / f"table-{index:02d}.db",
            (content.random(MiB) if block % 2 == 0 else content.text(MiB) for block in range(16)),
        )
    ds.files += count
    ds.parts.append(
        f"{count} files of 16 MiB (alternating random and text MiB) filling up to the size"
    )
    return ds


# ---------------------------------------------------------------- measuring


class CpuMeter:
    """CPU seconds used between start() and stop() by this process (client threads), its
    waited-for children (the agent, restic and what they run) and the SeaweedFS process."""

    def __init__(self, weed_pid: int) -> None:
        self.weed_pid = weed_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def _weed(self) -> float:
        fields = Path(f"/proc/{self.weed_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / self.tick  # utime stime cutime cstime

    def _children(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def _busy(self) -> float:
        """CPU seconds all cores spent busy (user, nice, system, irq, softirq, steal)."""
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / self.tick

    def start(self) -> None:
        self.t0 = (
            time.process_time(),
            self._children(),
            self._weed(),
            self._busy(),
            time.perf_counter(),
        )

    def stop(self) -> Cpu:
        own, children, weed, busy, wall = self.t0
        client = time.process_time() - own + self._children() - children
        weed = self._weed() - weed
        other = max(0.0, self._busy() - busy - client - weed)
        return Cpu(client=client, weed=weed, other=other, wall=time.perf_counter() - wall)


@dataclass
class Cpu:
    client: float
    weed: float
    other: float
    wall: float

    def describe(self) -> str:
        return f"{self.client:.1f} / {self.weed:.1f} / {self.other:.1f} s"


def throughput(size: int, seconds: float) -> float:
    """MiB/s."""
    return size / MiB / seconds


@dataclass
class Series:
    """Repeated measurements of one thing; the median counts."""

    title: str
    walls: list[float] = field(default_factory=list)
    cpus: list[Cpu] = field(default_factory=list)
    info: str = ""

    def add(self, seconds: float, cpu: Cpu) -> None:
        self.walls.append(seconds)
        self.cpus.append(cpu)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    def time_cell(self) -> str:
        if len(self.walls) == 1:
            return f"{self.walls[0]:.2f} s"
        return f"{self.median:.2f} s ({min(self.walls):.2f}-{max(self.walls):.2f})"

    def cpu_cell(self) -> str:
        med = lambda values: statistics.median(values)  # noqa: E731
        return (
            f"{med(c.client for c in self.cpus):.1f} / {med(c.weed for c in self.cpus):.1f}"
            f" / {med(c.other for c in self.cpus):.1f} s"
        )


# ---------------------------------------------------------------- SeaweedFS and versions


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def running_weeds() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if (proc / "comm").read_text().strip() == "weed" and state != "Z":
                    found.append(
                        f"{proc.name}: "
                        + (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    )
            except OSError:
                continue
    return found


def agent_revision() -> str:
    """The commit the agent was run from, and whether agent/ had uncommitted changes."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    return f"commit {commit}" + (
        " + uncommitted changes in agent/" if git("status", "--porcelain", "--", "agent") else ""
    )


def weed_version() -> str:
    out = subprocess.run(["weed", "version"], capture_output=True, text=True).stdout.split()
    return f"SeaweedFS {out[2]}" if len(out) > 2 else "SeaweedFS"


# ---------------------------------------------------------------- peers, changes, memory


def ensure_debian_tools(tools: dict[str, str]) -> str | None:
    """Install with apt-get the Debian packages of the commands missing from PATH (`tools`:
    command -> package). Return None when every command is there afterwards, else one line
    naming what is missing and how to install it."""
    missing = sorted(
        {package for command, package in tools.items() if shutil.which(command) is None}
    )
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"needs {', '.join(missing)}: run `apt-get install {' '.join(missing)}` as root"
    log(f"installing {', '.join(missing)} with apt-get (benchmark peers)")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return (
                f"`apt-get install {' '.join(missing)}` failed: "
                f"{result.stderr.strip().splitlines()[-1:]}"
            )
    still = [command for command in tools if shutil.which(command) is None]
    return f"still missing after apt-get: {', '.join(still)}" if still else None


@dataclass
class Change:
    """What an application changes between two backups of the mixed data set."""

    in_place: int  # bytes rewritten in place in the large file (the DB-like file)
    small_fraction: float  # share of the small files rewritten (same size, new content)
    append: int  # bytes appended to logs/app.log
    new_file: int  # size of one new random file, new/added-<run>.bin

    def describe(self) -> str:
        return (
            f"{self.in_place / MiB:g} MiB rewritten in place in large.bin, "
            f"{self.small_fraction:.0%} of the small files rewritten, "
            f"{self.append / KiB:g} KiB appended to logs/app.log, one new "
            f"{self.new_file / MiB:g} MiB file"
        )


def apply_change(root: Path, change: Change, content: Content, run: int) -> int:
    """Change the data set at `root` (made by make_data_set) as `change` says, with seeded
    content of the same kind as what it replaces; return the bytes written."""
    written = 0
    large = root / "large.bin"
    size = large.stat().st_size
    offset = content.rng.randrange(0, (size - change.in_place) // 4096) * 4096
    with open(large, "r+b") as handle:
        handle.seek(offset)
        written += handle.write(content.mixed(change.in_place, binary=offset < size // 2))
    small = sorted((root / "small").rglob("file-*"))
    for path in content.rng.sample(small, max(1, round(len(small) * change.small_fraction))):
        written += write_chunked(
            path, [content.mixed(path.stat().st_size, binary=path.suffix == ".bin")]
        )
    with open(root / "logs" / "app.log", "ab") as handle:
        written += handle.write(content.text(change.append))
    (root / "new").mkdir(exist_ok=True)
    written += write_chunked(
        root / "new" / f"added-{run:03d}.bin", [content.random(change.new_file)]
    )
    return written


def make_many_files(root: Path, count: int, content: Content) -> DataSet:
    """Fill `root` with `count` small files of 0-4 KiB (half text, half random), 100 to a
    directory: a data set whose cost is its file count."""
    ds = DataSet(root)
    for index in range(count):
        folder = root / "many" / f"d{index // 10000:02d}" / f"e{index // 100 % 100:02d}"
        if index % 100 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        binary = index % 2 == 0
        size = content.rng.randint(0, 4 * KiB)
        (folder / f"f{index:06d}.{'bin' if binary else 'txt'}").write_bytes(
            content.random(size) if binary else content.text(size)
        )
        ds.bytes += size
    ds.files = count
    ds.parts.append(f"{count} files of 0-4 KiB, 100 to a directory, half text, half random")
    return ds


PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now (from /proc/<pid>/task/*/children)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        try:
            for task in os.scandir(f"/proc/{current}/task"):
                with open(f"{task.path}/children") as handle:
                    stack += [int(child) for child in handle.read().split()]
        except OSError:
            continue
    return found


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class PeakRss:
    """The peak resident memory of a process tree: the sum of the RSS of a process and all its
    descendants, sampled every `interval` seconds in a thread while the block runs, and at that
    peak the RSS per command name (`parts`). RSS counts shared pages (libraries) once per
    process, so the figure errs high."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self.parts: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            sizes = [(pid, _rss(pid)) for pid in _tree(self.pid)]
            total = sum(size for _, size in sizes)
            if total > self.peak:
                self.peak, self.parts = total, {}
                for pid, size in sizes:
                    self.parts.setdefault(_comm(pid), []).append(size)
            self._stop.wait(self.interval)

    def describe(self) -> str:
        """The processes at the peak, e.g. `python3 96.1, rsync 3 x 4.0 MiB`."""
        return (
            ", ".join(
                f"{name} {len(sizes)} x {max(sizes) / MiB:.1f}"
                if len(sizes) > 1
                else f"{name} {sizes[0] / MiB:.1f}"
                for name, sizes in sorted(self.parts.items(), key=lambda item: -sum(item[1]))
            )
            + " MiB"
        )

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return "?"


def run_with_peak_rss(
    command: list[str], env: dict[str, str], cwd: Path
) -> tuple[subprocess.CompletedProcess[str], PeakRss]:
    """Run `command` with its output captured; return the result and the peak RSS of its
    process tree."""
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with PeakRss(process.pid) as peak:
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak


def directory_bytes(root: Path) -> int:
    """The sum of the sizes of the regular files below `root`."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                continue
    return total
