"""MANIFEST.json: what a generation holds, written last so its presence means "complete".

Building and checking a manifest is pure; `write` and `read` are the only I/O, and `write`
is atomic (temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.core import generation

NAME = "MANIFEST.json"
FORMAT_VERSION = 1
# A chunked data generation (docs/chunks-format.md): agents that know only format 1 refuse it
# instead of taking its index for the data.
CHUNKS_FORMAT_VERSION = 2
# An encrypted chunked generation's chunk-id key, age-encrypted to its recipients: each such
# generation carries the key its chunk ids were made with (docs/chunks-format.md).
CHUNK_ID_KEY = "CHUNK-ID-KEY.age"
FORMATS = (FORMAT_VERSION, CHUNKS_FORMAT_VERSION)
DATA_FORMATS = ("archive", "chunks")
# What the sink reads of a manifest from the other side: about 100 000 files' entries.
MAX_SIZE = 16 << 20
# A file's entry is an object of about 100 bytes or more; JSON with many more objects and
# arrays than that would take many times its size in memory once parsed.
_BYTES_PER_CONTAINER = 16


class InvalidManifest(ValueError):
    pass


@dataclass(frozen=True)
class FileEntry:
    """One stored file. An encrypted file (`*.age`) also records the size and sha256 of its
    plaintext; the fields are left out of the JSON otherwise, so manifests of unencrypted
    generations read the same as before, and agents that do not know them ignore them."""

    path: str
    size: int
    sha256: str
    plaintext_size: int | None = None
    plaintext_sha256: str | None = None

    @property
    def encrypted(self) -> bool:
        return self.plaintext_sha256 is not None

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class PackRef:
    """A pack a chunked generation references: its id (sha256 hex) and size in bytes."""

    id: str
    size: int


@dataclass(frozen=True)
class Manifest:
    source_id: str
    kind: str
    generation: str
    created_at: str
    downtime_seconds: float
    agent_version: str
    files: tuple[FileEntry, ...]
    paths: tuple[str, ...] = ()
    format: int = FORMAT_VERSION
    extra: dict[str, object] = field(default_factory=dict)
    # A chunked generation (format 2) only: `files` then lists its index.
    data_format: str = "archive"
    encrypted: bool = False
    packs: tuple[PackRef, ...] = ()
    logical_size: int = 0
    added_size: int = 0
    chunk_count: int = 0

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def chunked(self) -> bool:
        return self.data_format == "chunks"

    def to_json(self) -> str:
        body = asdict(self)
        body["files"] = [f.as_dict() for f in self.files]
        body["paths"] = list(self.paths)
        if self.chunked:
            body["packs"] = [asdict(p) for p in self.packs]
        else:  # an archive generation's manifest reads as it always did
            for name in (
                "data_format",
                "encrypted",
                "packs",
                "logical_size",
                "added_size",
                "chunk_count",
            ):
                del body[name]
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def check_relative_path(path: str) -> str:
    """Return `path` if it is a safe relative POSIX path inside a generation.
    Raise InvalidManifest for absolute paths, `..`, empty components, NUL or the manifest itself."""
    parts = PurePosixPath(path).parts
    if (
        not path
        or "\0" in path
        or path.startswith("/")
        or "\\" in path
        or any(p in ("..", ".") for p in path.split("/"))
        or "//" in path
        or path.endswith("/")
        or path == NAME
        or not parts
    ):
        raise InvalidManifest(f"unsafe path in manifest: {path!r}")
    return path


def _check_sha256(value: object) -> str:
    if not (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    ):
        raise InvalidManifest(f"not a sha256 hex digest: {value!r}")
    return value


def _file_entry(body: dict[str, Any]) -> FileEntry:
    plain_size, plain_sha256 = body.get("plaintext_size"), body.get("plaintext_sha256")
    if (plain_size is None) != (plain_sha256 is None):
        raise InvalidManifest(
            f"{body['path']!r}: plaintext_size and plaintext_sha256 come together"
        )
    return FileEntry(
        check_relative_path(body["path"]),
        int(body["size"]),
        _check_sha256(body["sha256"]),
        None if plain_size is None else int(plain_size),
        None if plain_sha256 is None else _check_sha256(plain_sha256),
    )


def _packs(body: dict[str, Any]) -> tuple[PackRef, ...]:
    packs = tuple(PackRef(_check_sha256(p["id"]), int(p["size"])) for p in body["packs"])
    if len({p.id for p in packs}) != len(packs) or any(p.size <= 0 for p in packs):
        raise InvalidManifest("a pack is listed twice or with a size that is not positive")
    return packs


def _chunk_fields(body: dict[str, Any], files: tuple[FileEntry, ...]) -> dict[str, Any]:
    """The fields of a chunked generation's manifest (format 2), checked."""
    if body.get("data_format") != "chunks" or body.get("kind") != "data":
        raise InvalidManifest("a format 2 manifest is a chunked data generation's")
    encrypted = bool(body["encrypted"])
    listed = tuple(f.path for f in files)
    if listed != (("INDEX.zst.age", CHUNK_ID_KEY) if encrypted else ("INDEX.zst",)):
        raise InvalidManifest(
            "a chunked generation lists exactly its index file (and, encrypted, its "
            f"{CHUNK_ID_KEY})"
        )
    return {
        "data_format": "chunks",
        "encrypted": encrypted,
        "packs": _packs(body),
        "logical_size": int(body["logical_size"]),
        "added_size": int(body["added_size"]),
        "chunk_count": int(body["chunk_count"]),
    }


def from_json(text: str | bytes) -> Manifest:
    """Given a manifest's text (from any store), return it. Raise InvalidManifest if a field is
    missing or of the wrong type, a path is unsafe, the generation id is malformed, a chunked
    generation's pack list is malformed, or the JSON nests too deep or holds far more objects
    and arrays than a manifest does (a hostile one would take many times its size in
    memory)."""
    raw = text.encode() if isinstance(text, str) else text
    if raw.count(b"{") + raw.count(b"[") > len(raw) // _BYTES_PER_CONTAINER + 64:
        raise InvalidManifest(
            "malformed manifest: far more JSON objects and arrays than file entries"
        )
    try:
        body = json.loads(text)
        if body["format"] not in FORMATS:
            raise InvalidManifest(f"unknown manifest format {body['format']!r}")
        if body["kind"] not in generation.KINDS:
            raise InvalidManifest(f"unknown kind {body['kind']!r}")
        generation.parse(body["generation"])
        files = tuple(_file_entry(f) for f in body["files"])
        if len({f.path for f in files}) != len(files):
            raise InvalidManifest("a path is listed twice")
        chunks = _chunk_fields(body, files) if body["format"] == CHUNKS_FORMAT_VERSION else {}
        return Manifest(
            source_id=str(body["source_id"]),
            kind=body["kind"],
            generation=body["generation"],
            created_at=str(body["created_at"]),
            downtime_seconds=float(body["downtime_seconds"]),
            agent_version=str(body["agent_version"]),
            files=files,
            paths=tuple(str(p) for p in body.get("paths", ())),
            extra=dict(body.get("extra", {})),
            format=body["format"],
            **chunks,
        )
    except InvalidManifest:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidManifest(f"malformed manifest: {exc}") from exc


def _umask() -> int:
    """The process's umask, read without setting it: os.umask(0) would let files that other
    threads create meanwhile be writable by anyone."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # not Linux: the briefest, safest window
    os.umask(umask)
    return umask


def write(directory: Path, manifest: Manifest) -> Path:
    """Write `manifest` into `directory` atomically and durably; return its path."""
    target = directory / NAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as any other file: the SSH gateway's users read it
        with os.fdopen(fd, "w") as handle:
            handle.write(manifest.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return target


def read(directory: Path, limit: int | None = None) -> Manifest:
    """Read and check the manifest of the generation in `directory`, reading no more than
    `limit` bytes when given (a manifest from the other side). Raise FileNotFoundError if there
    is none, InvalidManifest if it is not valid, larger than `limit`, or not a regular file
    (a symbolic link is never followed)."""
    try:
        fd = os.open(directory / NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise InvalidManifest(f"{NAME} is a symbolic link") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidManifest(f"{NAME} is not a regular file")
        text = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(text) > limit:
        raise InvalidManifest(f"{NAME} is larger than {limit} bytes")
    return from_json(text)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
