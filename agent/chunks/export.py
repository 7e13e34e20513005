"""`export`: any data generation as one standard tar stream (POSIX pax), so that
`backup-agent export | tar -x` works wherever the agent runs.

An archive generation is its `data.tar.zst` decompressed (decrypted first when encrypted),
its stored sha256 — and the plaintext's — checked at the end. A chunked generation is
written entry by entry from its index: pax headers (nanosecond mtimes, numeric owners,
names that are not UTF-8 as binary pax records), each file's content from its blobs in
order, ranged reads running ahead, its sha256 checked at the end of the file. A mismatch
stops the stream before the end-of-archive blocks, so `tar -x` reports a truncated archive
and the command exits 1. Holes of sparse files are written as zeros.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from agent.chunks import content
from agent.chunks.index import Entry
from agent.chunks.reader import (
    Location,
    Objects,
    ReadFailed,
    chunk_map,
    fetch_blobs,
    open_generation,
)
from agent.core import encryption
from agent.core.manifest import Manifest
from agent.core.members import MemberPolicy

logger = logging.getLogger(__name__)

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_READ = 1 << 20


@dataclass
class Exported:
    entries: int = 0
    size: int = 0


class _Counting:
    """A write-only stream that counts what it passes on (stdout cannot tell)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.count = 0

    def write(self, data: bytes | memoryview) -> int:
        self._out.write(data)
        self.count += len(data)
        return len(data)


class StoredStream:
    """A readable stream over a stored file's chunks that hashes and counts what it gives."""

    def __init__(self, chunks: Iterable[bytes | memoryview]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        if not self._pending:
            chunk = next(self._chunks, b"")
            self.hash.update(chunk)
            self.size += len(chunk)
            self._pending = memoryview(chunk)
        take = len(self._pending) if size < 0 else min(size, len(self._pending))
        data, self._pending = self._pending[:take], self._pending[take:]
        return data.tobytes()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ArchiveStream:
    """The tar inside an archive generation as a readable stream (decrypted, decompressed);
    `check()` after the last read compares the stored (and plaintext) digests with the
    manifest and raises ReadFailed if they differ."""

    def __init__(self, store: Objects, m: Manifest, identities: Sequence[Any]) -> None:
        self.entry = m.files[0]
        self.stored = StoredStream(store.chunks("data", m.generation, self.entry.path))
        self._plain = hashlib.sha256()
        self._plain_size = 0
        source: Any = self.stored
        self._decrypting: encryption.Decrypting | None = None
        if self.entry.encrypted:
            self._decrypting = encryption.Decrypting(self.stored, identities, self._count)
            source = self._decrypting
        self._reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=_READ)

    def _count(self, data: bytes) -> None:
        self._plain.update(data)
        self._plain_size += len(data)

    def read(self, size: int = -1) -> bytes:
        try:
            return bytes(self._reader.read(size))
        except zstandard.ZstdError as exc:
            raise ReadFailed(f"the archive is damaged: {exc}") from None

    def check(self) -> None:
        while self.read(_READ):
            pass
        if self._decrypting is not None:
            self._decrypting.finish()
        if (self.stored.size, self.stored.hash.hexdigest()) != (self.entry.size, self.entry.sha256):
            raise ReadFailed(
                f"{self.entry.path} is damaged: {self.stored.size} bytes with "
                f"sha256 {self.stored.hash.hexdigest()}; the manifest says "
                f"{self.entry.size} bytes, {self.entry.sha256}"
            )
        if self.entry.encrypted and (self._plain_size, self._plain.hexdigest()) != (
            self.entry.plaintext_size,
            self.entry.plaintext_sha256,
        ):
            raise ReadFailed(f"{self.entry.path} decrypted differs from the manifest")

    def close(self) -> None:
        if self._decrypting is not None:
            self._decrypting.close()


def export_archive(
    store: Objects, m: Manifest, identities: Sequence[Any], out: BinaryIO
) -> Exported:
    stream = ArchiveStream(store, m, identities)
    result = Exported()
    try:
        while data := stream.read(_READ):
            out.write(data)
            result.size += len(data)
        stream.check()
    finally:
        stream.close()
    return result


def _mtime(ns: int) -> str:
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


_TYPES = {
    "dir": tarfile.DIRTYPE,
    "file": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def header(entry: Entry) -> bytes:
    """The pax header block(s) of an index entry."""
    info = tarfile.TarInfo(os.fsdecode(entry.path) + ("/" if entry.type == "dir" else ""))
    info.type = _TYPES[entry.type]
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = max(0, entry.mtime_ns // 1_000_000_000)
    info.pax_headers = {"mtime": _mtime(entry.mtime_ns)}
    if entry.type == "file":
        info.size = entry.size
    elif entry.type == "symlink":
        info.linkname = os.fsdecode(entry.target or b"")
    elif entry.type == "hardlink":
        info.linkname = os.fsdecode(entry.link or b"")
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def export_chunked(
    store: Objects, m: Manifest, identities: Sequence[Any], target: BinaryIO
) -> Exported:
    """Write the chunked generation `m` to `out` as a pax tar; return what was written.
    Raise ReadFailed if it is damaged (the stream then ends without end-of-archive blocks),
    NeedsKey / ReadFailed for a key that is missing or does not open it, UnsafeMember for an
    entry that must not be written."""
    result = Exported()
    out = _Counting(target)
    with open_generation(store, m, identities) as opened:
        mapped = chunk_map(opened)
        try:
            policy = MemberPolicy([p.lstrip("/") for p in m.paths])
            blobs = fetch_blobs(store, content.locations(mapped, opened.entries()))
            for entry in opened.entries():
                link = entry.target if entry.type == "symlink" else entry.link
                policy.check(os.fsdecode(entry.path), entry.type, os.fsdecode(link or b""))
                out.write(header(entry))
                result.entries += 1
                if entry.type == "file":
                    _write_content(entry, blobs, opened.identities, out)
                    result.size += entry.size
        finally:
            mapped.close()
    out.write(bytes(2 * _BLOCK))
    if out.count % _RECORD:
        out.write(bytes(_RECORD - out.count % _RECORD))
    return result


def _write_content(
    entry: Entry,
    blobs: Iterator[tuple[Location, bytes | memoryview]],
    identities: Sequence[Any],
    out: _Counting,
) -> None:
    for piece in content.file_content(entry, blobs, identities):
        out.write(piece)
    if entry.size % _BLOCK:
        out.write(bytes(_BLOCK - entry.size % _BLOCK))


def export(store: Objects, m: Manifest, identities: Sequence[Any], out: BinaryIO) -> Exported:
    """Write the data generation `m` of `store`, of either format, to `out` as a tar."""
    if m.chunked:
        return export_chunked(store, m, identities, out)
    return export_archive(store, m, identities, out)
