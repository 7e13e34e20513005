"""Packs: immutable files of many blobs, named by the sha256 of their bytes.

```
blob_0 ‖ blob_1 ‖ … ‖ blob_{n-1} ‖ trailer ‖ u32le n ‖ u32le trailer_length ‖ b"BAPACK01"
trailer = n × ( chunk_id[32] ‖ u32le stored_length ‖ u32le raw_length )
```

Offsets are implied (the sum of the stored lengths before). The trailer is plaintext, so what
a pack holds can be listed, and a pack repacked, without any key. `PackWriter` writes one
pack durably and renames it to its name; parsing a trailer is pure; `read_trailer` takes a
ranged-read function, so it serves a local file and an S3 object alike.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.chunks import ids
from agent.core.manifest import fsync_dir

logger = logging.getLogger(__name__)

MAGIC = b"BAPACK01"
_FOOTER = struct.Struct("<II8s")
FOOTER_SIZE = _FOOTER.size
_ENTRY = struct.Struct("<32sII")
ENTRY_SIZE = _ENTRY.size
# A first tail read that holds the whole trailer of a pack of about a thousand blobs.
TAIL_READ = 64 << 10
_MAX_LENGTH = (1 << 32) - 1


class PackError(ValueError):
    """A pack is not what its name or trailer says: damaged, truncated or foreign."""


@dataclass(frozen=True)
class BlobEntry:
    """One blob of a pack: its chunk id, where it lies in the pack, its stored length and
    the length of the chunk it holds."""

    chunk_id: bytes
    offset: int
    stored_length: int
    raw_length: int


@dataclass(frozen=True)
class PackInfo:
    """A written pack: its id (sha256 hex), size in bytes and blobs."""

    pack_id: str
    size: int
    blobs: tuple[BlobEntry, ...]


def encode_trailer(entries: list[tuple[bytes, int, int]]) -> bytes:
    """Return trailer + footer for blobs given as (chunk_id, stored_length, raw_length)."""
    body = b"".join(_ENTRY.pack(cid, stored, raw) for cid, stored, raw in entries)
    return body + _FOOTER.pack(len(entries), len(body), MAGIC)


def footer(tail: bytes) -> tuple[int, int]:
    """Given at least the last FOOTER_SIZE bytes of a pack, return (blob count, trailer
    length). Raise PackError if the pack's magic is not there."""
    if len(tail) < FOOTER_SIZE:
        raise PackError("too short to be a pack")
    count, length, magic = _FOOTER.unpack(tail[-FOOTER_SIZE:])
    if magic != MAGIC or length != count * ENTRY_SIZE:
        raise PackError("not a pack (no BAPACK01 footer, or a trailer of the wrong length)")
    return count, length


def parse_trailer(tail: bytes, pack_size: int) -> tuple[BlobEntry, ...]:
    """Given the end of a pack of `pack_size` bytes holding at least its trailer and footer,
    return its blobs in order. Raise PackError if the trailer does not describe a pack of
    that size exactly."""
    count, length = footer(tail)
    if len(tail) < length + FOOTER_SIZE:
        raise PackError("the tail read does not hold the whole trailer")
    start = len(tail) - FOOTER_SIZE - length
    blobs = []
    offset = 0
    for i in range(count):
        cid, stored, raw = _ENTRY.unpack_from(tail, start + i * ENTRY_SIZE)
        blobs.append(BlobEntry(cid, offset, stored, raw))
        offset += stored
    if offset + length + FOOTER_SIZE != pack_size:
        raise PackError(
            f"the trailer describes {offset + length + FOOTER_SIZE} bytes, the pack has {pack_size}"
        )
    return tuple(blobs)


def read_trailer(read_range: Callable[[int, int], bytes], pack_size: int) -> tuple[BlobEntry, ...]:
    """Return the blobs of a pack of `pack_size` bytes, reading its tail by
    `read_range(offset, length)` (one read for most packs, two for the largest trailers).
    Raise PackError if the tail is not a pack's."""
    first = min(pack_size, TAIL_READ)
    tail = read_range(pack_size - first, first)
    _, length = footer(tail)
    if length + FOOTER_SIZE > len(tail):
        if length + FOOTER_SIZE > pack_size:
            raise PackError("the trailer is longer than the pack")
        tail = read_range(pack_size - length - FOOTER_SIZE, length + FOOTER_SIZE)
    return parse_trailer(tail, pack_size)


def file_range_reader(path: Path) -> Callable[[int, int], bytes]:
    """A `read_range` for `read_trailer` over the local file `path`."""

    def read_range(offset: int, length: int) -> bytes:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    return read_range


def sha256_of(handle: io.BufferedReader) -> tuple[int, str]:
    """Return the size and sha256 hex of everything `handle` gives from where it stands."""
    digest = hashlib.file_digest(handle, "sha256")
    return handle.tell(), digest.hexdigest()


def verify_file(path: Path, pack_id: str) -> None:
    """Raise PackError unless the file at `path` hashes to `pack_id` (no key needed)."""
    with open(path, "rb") as handle:
        _, sha = sha256_of(handle)
    if sha != pack_id:
        raise PackError(f"{path}: sha256 {sha}, not the pack id {pack_id}")


class PackWriter:
    """Write one pack into `packs_dir` (`<2 hex>/<id>.pack` below it), through a temporary
    file in `temp_dir` (on the same filesystem), hashing as it writes.

    `fits(n)` says whether a blob of n bytes may still be added without passing the target
    size (the first blob always fits: a blob larger than the target gets a pack of its own).
    `close()` writes the trailer, fsyncs and renames the pack to its name; `abort()` removes
    the temporary file."""

    def __init__(self, packs_dir: Path, temp_dir: Path, target_size: int) -> None:
        self.packs_dir = packs_dir
        self.target_size = target_size
        temp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=temp_dir, prefix=".pack-", suffix=".tmp")
        self._tmp = Path(tmp)
        self._handle = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._entries: list[tuple[bytes, int, int]] = []
        self.size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, stored_length: int) -> bool:
        if not self._entries:
            return True
        return (
            self.size + stored_length + (len(self._entries) + 1) * ENTRY_SIZE + FOOTER_SIZE
            <= self.target_size
        )

    def add(self, chunk_id: bytes, blob: bytes, raw_length: int) -> int:
        """Append `blob` (holding `raw_length` bytes of chunk `chunk_id`); return its offset."""
        if len(chunk_id) != ids.ID_SIZE or len(blob) > _MAX_LENGTH or raw_length > _MAX_LENGTH:
            raise ValueError("a chunk id is 32 bytes; a blob and its chunk are under 4 GiB")
        offset = self.size
        self._handle.write(blob)
        self._hash.update(blob)
        self.size += len(blob)
        self._entries.append((chunk_id, len(blob), raw_length))
        return offset

    def close(self) -> PackInfo:
        """Finish the pack: trailer, fsync, rename to `<packs_dir>/<2 hex>/<id>.pack`."""
        tail = encode_trailer(self._entries)
        self._handle.write(tail)
        self._hash.update(tail)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        pack_id = self._hash.hexdigest()
        target = self.packs_dir / ids.pack_key(pack_id).split("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, target)
        fsync_dir(target.parent)
        size = self.size + len(tail)
        blobs = []
        offset = 0
        for cid, stored, raw in self._entries:
            blobs.append(BlobEntry(cid, offset, stored, raw))
            offset += stored
        return PackInfo(pack_id, size, tuple(blobs))

    def abort(self) -> None:
        self._handle.close()
        self._tmp.unlink(missing_ok=True)


def iter_blobs(handle: BinaryIO, blobs: tuple[BlobEntry, ...]) -> Iterator[tuple[BlobEntry, bytes]]:
    """Yield (entry, stored bytes) of every blob of a pack read front to back from `handle`."""
    for entry in blobs:
        data = handle.read(entry.stored_length)
        if len(data) != entry.stored_length:
            raise PackError("the pack ends inside a blob")
        yield entry, data
