"""What the benchmarks share: reproducible content, cache control, progress lines, tables."""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path

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
        self.words = ["".join(self.rng.choices(letters, k=self.rng.randint(2, 10)))
                      for _ in range(3000)]

    def random(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def text(self, size: int) -> bytes:
        chunks, length = [], 0
        while length < size:
            count = max(64, (size - length) // 5)
            seq = self.rng.choices(self.words, k=count)
            stamp = self.rng.randint(0, 10**9)
            lines = [f"{stamp + i} INFO " + " ".join(seq[i:i + 12]) for i in range(0, count, 12)]
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
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), "-+-".join("-" * w for w in widths), *map(line, rows)])


def markdown_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    def cell(value: str) -> str:
        return str(value).replace("|", "\\|")

    return "\n".join(["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(map(cell, row)) + " |" for row in rows)])


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
        print(f"image {image} not found; build it with tools/build-base-image.sh "
              "(no registry is reachable; it is never pulled)", file=sys.stderr)
        return None
    return client


def interrupt(signum: int, _frame: object) -> None:
    """A SIGTERM handler that raises KeyboardInterrupt, so that the cleanup runs."""
    raise KeyboardInterrupt(f"signal {signum}")
