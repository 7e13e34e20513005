"""The index of a chunked generation: one JSON line per filesystem object, zstd-compressed
(then age-encrypted when encryption is on), in a deterministic order: depth-first, each
directory's entries sorted by their name's bytes (`sort_key`). Walk and index share that
order, so the previous generation's index is read as a stream beside the walk.

Paths are relative to `/` (`srv/app/data/x`), as in the archive format, and kept as bytes: a
name that is not UTF-8 is written as `path_b64` (likewise `target_b64`, `link_b64`).
Entries from outside are validated (`from_json`): no absolute path, no `..`, no NUL, chunks
inside the file and in order.

Encoding and decoding entries is pure; `IndexWriter` and `read_entries` stream.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from agent.chunks import ids
from agent.core import archive, encryption

logger = logging.getLogger(__name__)

NAME = "INDEX.zst"
ENCRYPTED_NAME = NAME + encryption.SUFFIX
NAMES = (NAME, ENCRYPTED_NAME)
TYPES = ("dir", "file", "symlink", "hardlink", "fifo")
_MAX_LINE = 64 << 20
_READ = 1 << 20


class InvalidIndex(ValueError):
    """An index entry is malformed or unsafe."""


@dataclass
class Entry:
    """One filesystem object. `chunks` are (chunk id hex, offset in the file, length); the
    gaps between them are holes. `dev`, `ino`, `ctime_ns` serve change detection only."""

    path: bytes
    type: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    dev: int = 0
    ino: int = 0
    ctime_ns: int = 0
    size: int = 0
    sha256: str = ""
    chunks: list[tuple[str, int, int]] = field(default_factory=list)
    target: bytes | None = None
    link: bytes | None = None
    # The index line it was read from (from_json), which `IndexWriter.write` may be given
    # back for an entry that is the same again.
    line: bytes = field(default=b"", compare=False, repr=False)


def sort_key(path: bytes) -> tuple[bytes, ...]:
    """The index order: comparing these tuples is depth-first, siblings by name bytes."""
    return tuple(path.split(b"/"))


def check_path(path: bytes) -> bytes:
    """Return `path` if it is a safe relative path. Raise InvalidIndex otherwise."""
    parts = path.split(b"/")
    if (
        not path
        or b"\0" in path
        or path.startswith(b"/")
        or any(p in (b"", b".", b"..") for p in parts)
    ):
        raise InvalidIndex(f"unsafe path in the index: {path[:200]!r}")
    return path


def _put_bytes(body: dict[str, Any], name: str, value: bytes) -> None:
    try:
        body[name] = value.decode("utf-8")
    except UnicodeDecodeError:
        body[name + "_b64"] = base64.b64encode(value).decode()


def _get_bytes(body: dict[str, Any], name: str) -> bytes | None:
    if name in body:
        value = body[name]
        if not isinstance(value, str):
            raise InvalidIndex(f"{name} is not a string")
        return value.encode("utf-8")
    if name + "_b64" in body:
        try:
            return base64.b64decode(body[name + "_b64"], validate=True)
        except (ValueError, TypeError):
            raise InvalidIndex(f"{name}_b64 is not base64") from None
    return None


def to_json(entry: Entry) -> bytes:
    """Return the index line (with its newline) of `entry`."""
    body: dict[str, Any] = {}
    _put_bytes(body, "path", entry.path)
    body.update(
        type=entry.type,
        mode=entry.mode,
        uid=entry.uid,
        gid=entry.gid,
        mtime_ns=entry.mtime_ns,
        dev=entry.dev,
        ino=entry.ino,
        ctime_ns=entry.ctime_ns,
    )
    if entry.type == "file":
        body.update(size=entry.size, sha256=entry.sha256, chunks=[list(c) for c in entry.chunks])
    elif entry.type == "symlink":
        assert entry.target is not None
        _put_bytes(body, "target", entry.target)
    elif entry.type == "hardlink":
        assert entry.link is not None
        _put_bytes(body, "link", entry.link)
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _int(body: dict[str, Any], name: str, low: int = 0, high: int = 1 << 64) -> int:
    value = body.get(name, 0)
    if type(value) is not int or not low <= value < high:
        raise InvalidIndex(f"{name} is not an integer in range: {str(value)[:40]}")
    return value


def _chunks(body: dict[str, Any], size: int) -> list[tuple[str, int, int]]:
    raw = body.get("chunks")
    if not isinstance(raw, list):
        raise InvalidIndex("a file has no chunk list")
    chunks = []
    end = 0
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or type(item[1]) is not int
            or type(item[2]) is not int
        ):
            raise InvalidIndex("a chunk is not [id, offset, length]")
        cid, offset, length = ids.check_hex(item[0]), item[1], item[2]
        if offset < end or length <= 0 or offset + length > size:
            raise InvalidIndex("chunks overlap, are out of order or pass the file's size")
        end = offset + length
        chunks.append((cid, offset, length))
    return chunks


def from_json(line: bytes | str) -> Entry:
    """Return the entry of one index line. Raise InvalidIndex if it is malformed or unsafe
    (see check_path) or its chunks do not lie inside the file in order."""
    try:
        body = json.loads(line)
    except ValueError as exc:
        raise InvalidIndex(f"an index line is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidIndex("an index line is not an object")
    path = _get_bytes(body, "path")
    kind = body.get("type")
    if path is None or kind not in TYPES:
        raise InvalidIndex("an index entry lacks its path or has an unknown type")
    entry = Entry(
        check_path(path),
        str(kind),
        _int(body, "mode", high=1 << 16),
        _int(body, "uid", high=1 << 32),
        _int(body, "gid", high=1 << 32),
        _int(body, "mtime_ns", low=-(1 << 63), high=1 << 63),
        _int(body, "dev"),
        _int(body, "ino"),
        _int(body, "ctime_ns", low=-(1 << 63), high=1 << 63),
    )
    if isinstance(line, bytes):
        entry.line = line
    if kind == "file":
        entry.size = _int(body, "size")
        sha = body.get("sha256")
        if not isinstance(sha, str):
            raise InvalidIndex("a file has no sha256")
        entry.sha256 = ids.check_hex(sha)
        entry.chunks = _chunks(body, entry.size)
    elif kind == "symlink":
        entry.target = _get_bytes(body, "target")
        if not entry.target or b"\0" in entry.target:
            raise InvalidIndex("a symlink has no target")
    elif kind == "hardlink":
        link = _get_bytes(body, "link")
        entry.link = check_path(link or b"")
    return entry


class IndexWriter:
    """Stream entries into a zstd file at `path` (plaintext), hashing as it writes. The
    caller encrypts it for a store with `encrypt_to` (age has no streaming writer here)."""

    def __init__(self, path: Path, level: int) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close() or abort()
        self._zstd = zstandard.ZstdCompressor(level=level).stream_writer(self._file, closefd=False)
        self._lines: list[bytes] = []
        self._buffered = 0
        self.count = 0

    def write(self, entry: Entry, line: bytes = b"") -> None:
        """Write `entry`; `line`, when given, is its index line (see Entry.line)."""
        line = line or to_json(entry)
        self._lines.append(line)
        self._buffered += len(line)
        self.count += 1
        if self._buffered >= _READ:
            self._drain()

    def _drain(self) -> None:
        self._zstd.write(b"".join(self._lines))
        self._lines, self._buffered = [], 0

    def close(self) -> None:
        self._drain()
        self._zstd.flush(zstandard.FLUSH_FRAME)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def publish(plain: Path, target_dir: Path, recipients: Sequence[Any]) -> tuple[str, int, str]:
    """Write the index file of a generation into `target_dir` from the plaintext zstd index
    `plain`: encrypted to `recipients` (INDEX.zst.age) or a copy (INDEX.zst), durably.
    Return (name, size, sha256) of the written file."""
    name = ENCRYPTED_NAME if recipients else NAME
    with open(plain, "rb") as reading, open(target_dir / name, "wb") as handle:
        sink = archive.HashingWriter(handle)
        if recipients:
            encryption.encrypt(reading, sink, recipients)
        else:
            while block := reading.read(_READ):
                sink.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    digest = sink.digest()
    return name, digest.size, digest.sha256


def plaintext_stream(reader: Any, identities: Sequence[Any] = ()) -> Any:
    """Given a readable stream of a stored index (decrypted through `identities` when they
    are given), return a readable stream of its JSON lines (zstd decompressed)."""
    source: Any = encryption.Decrypting(reader, identities) if identities else reader
    return zstandard.ZstdDecompressor().stream_reader(source, read_size=_READ)


def json_text(value: bytes) -> bytes | None:
    """How `value` (a path) appears inside an index line, or None if it is not UTF-8 (its
    line then holds it as base64)."""
    try:
        return json.dumps(value.decode("utf-8"))[1:-1].encode()
    except UnicodeDecodeError:
        return None


def iter_entries(stream: Any, containing: Sequence[bytes] = ()) -> Iterator[Entry]:
    """Yield the entries of a readable stream of index lines (see plaintext_stream); with
    `containing`, only those of lines holding one of these byte strings or a base64 name
    (a cheap filter for a pass that wants a few entries: the others are not decoded). Raise
    InvalidIndex on a malformed or unsafe entry or a line longer than any entry."""
    buffered = io.BufferedReader(stream, _READ)
    while line := buffered.readline(_MAX_LINE):
        if not line.endswith(b"\n"):
            raise InvalidIndex("an index line is too long or the index ends inside a line")
        if containing and b'_b64"' not in line and not any(c in line for c in containing):
            continue
        yield from_json(line)


def read_entries(
    path: Path, identities: Sequence[Any] = (), containing: Sequence[bytes] = ()
) -> Iterator[Entry]:
    """Yield the entries of the index file at `path` (INDEX.zst, or INDEX.zst.age with
    `identities`), filtered by `containing` as iter_entries does."""
    with open(path, "rb") as handle:
        yield from iter_entries(plaintext_stream(handle, identities), containing)
