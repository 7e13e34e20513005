"""Archives and hashes: tar + multi-threaded zstd (+ age) + sha256 in one pass over the data.

GNU tar reads the tree (POSIX pax format: nanosecond mtimes, numeric owners, symlinks,
hardlinks, empty directories, sparse files, names that are not UTF-8); its stream is
compressed by zstd on every core and hashed as it is written. With recipients, the compressed
stream is hashed (the plaintext digest), encrypted in the age format and hashed again as it is
written (the stored digest), still in the same pass. Memory stays flat.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from agent.core import encryption, excludes

ARCHIVE_NAME = "data.tar.zst"
ENCRYPTED_ARCHIVE_NAME = ARCHIVE_NAME + encryption.SUFFIX
ARCHIVE_NAMES = (ARCHIVE_NAME, ENCRYPTED_ARCHIVE_NAME)
CHUNK = 1 << 20
JOB_SIZE = 2 << 20
TAR_CREATE = (
    "tar",
    "--create",
    "--file=-",
    "--format=posix",
    "--numeric-owner",
    "--sparse",
    "--pax-option=delete=atime,delete=ctime",
)


class ArchiveError(Exception):
    pass


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str


class HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()

    def digest(self) -> Digest:
        return Digest(self.size, self._hash.hexdigest())


class _HashingReader:
    """A read-only stream that reads its source a chunk at a time, hashing and counting what
    it hands out (pyrage asks for small pieces)."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self._hash = hashlib.sha256()
        self.size = 0
        self._pending = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        if not self._pending:
            chunk = self._source.read(CHUNK)
            if not chunk:
                return b""
            self._hash.update(chunk)
            self.size += len(chunk)
            self._pending = memoryview(chunk)
        if size < 0 or size >= len(self._pending):
            data, self._pending = self._pending, memoryview(b"")
        else:
            data, self._pending = self._pending[:size], self._pending[size:]
        return data.tobytes()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def digest(self) -> Digest:
        return Digest(self.size, self._hash.hexdigest())


@dataclass(frozen=True)
class Archived:
    """What `create` wrote: the stored file's digest, and with encryption the plaintext's
    (the zstd-compressed tar that `age -d` gives back)."""

    stored: Digest
    plaintext: Digest | None = None


def create(
    root: Path,
    members: Sequence[str],
    target: Path,
    level: int,
    threads: int,
    recipients: Sequence[Any] = (),
    skip: excludes.Skip | None = None,
) -> Archived:
    """Write a zstd-compressed tar of `members` (paths relative to `root`) to `target`, durably,
    encrypted to `recipients` when there are any, leaving out what `skip` excludes (tar is
    then given the list of what is left in). Return the size and sha256 of the written file
    (and of the plaintext, when encrypted). Raise ArchiveError with tar's message if tar
    fails (the partial target is removed)."""
    # Small jobs keep memory flat as cores are added (about 6 MiB a worker instead of ~45)
    # at the same speed, and let an interrupted compression end quickly.
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=threads or -1, job_size=JOB_SIZE
    )
    compressor = zstandard.ZstdCompressor(compression_params=params)
    with (
        tempfile.TemporaryFile() as errors,
        tempfile.NamedTemporaryFile(dir=target.parent, prefix=".members-") as names,
    ):
        selection: list[str] = ["--", *members]
        if skip is not None and excludes.listing(root, members, skip, names):
            names.flush()
            selection = [
                "--null",
                "--verbatim-files-from",
                "--no-recursion",
                f"--files-from={names.name}",
            ]
        tar = subprocess.Popen(
            [*TAR_CREATE, "--directory", str(root), *selection],
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        stream = tar.stdout
        assert stream is not None  # stdout=PIPE
        try:
            with stream, open(target, "wb") as handle:
                writer = HashingWriter(handle)
                plain = None
                if recipients:
                    plain = _HashingReader(compressor.stream_reader(stream, read_size=CHUNK))
                    encryption.encrypt(plain, writer, recipients)
                else:
                    # zstandard only calls write() and flush() of its destination
                    compressor.copy_stream(
                        stream, cast(IO[bytes], writer), read_size=CHUNK, write_size=CHUNK
                    )
                handle.flush()
                os.fsync(handle.fileno())
            if tar.wait() != 0:
                errors.seek(0)
                message = errors.read().decode(errors="replace").strip()[-500:]
                raise ArchiveError(f"tar failed (exit {tar.returncode}): {message}")
        except BaseException:
            tar.kill()
            tar.wait()
            target.unlink(missing_ok=True)
            raise
    return Archived(writer.digest(), plain.digest() if plain is not None else None)


def encrypt_file(source: Path, target: Path, recipients: Sequence[Any]) -> Archived:
    """Encrypt the file `source` into `target` (durably) in one pass that hashes both. Return
    the stored (encrypted) and plaintext digests."""
    with open(source, "rb") as reading, open(target, "wb") as handle:
        plain = _HashingReader(reading)
        writer = HashingWriter(handle)
        encryption.encrypt(plain, writer, recipients)
        handle.flush()
        os.fsync(handle.fileno())
    return Archived(writer.digest(), plain.digest())


def member_name(path: Path) -> str:
    """The name a source path has inside the mirror, an archive or a log generation:
    the absolute path without its leading slash."""
    return str(path).lstrip("/")


def hash_file(path: Path) -> Digest:
    """Return the size and sha256 of the file at `path`, read in chunks."""
    with open(path, "rb") as handle:
        return hash_handle(handle)


def hash_handle(handle: io.BufferedReader) -> Digest:
    """Return the size and sha256 of the content of `handle`, open at its start."""
    digest = hashlib.file_digest(handle, "sha256")
    return Digest(handle.tell(), digest.hexdigest())


def walk_files(root: Path) -> Iterator[Path]:
    """Yield every regular file below `root` (not following symlinks), sorted per directory."""
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            ordered = sorted(entries, key=lambda e: e.name)
        yield from (Path(e.path) for e in ordered if e.is_file(follow_symlinks=False))
        stack.extend(Path(e.path) for e in reversed(ordered) if e.is_dir(follow_symlinks=False))
