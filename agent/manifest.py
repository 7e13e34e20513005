"""MANIFEST.json: what a generation holds, written last so its presence means "complete".

Building and checking a manifest is pure; `write` and `read` are the only I/O, and `write`
is atomic (temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent import generation

NAME = "MANIFEST.json"
FORMAT_VERSION = 1


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

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        body = asdict(self)
        body["files"] = [f.as_dict() for f in self.files]
        body["paths"] = list(self.paths)
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def check_relative_path(path: str) -> str:
    """Return `path` if it is a safe relative POSIX path inside a generation.
    Raise InvalidManifest for absolute paths, `..`, empty components, NUL or the manifest itself."""
    parts = PurePosixPath(path).parts
    if (not path or "\0" in path or path.startswith("/") or "\\" in path
            or any(p in ("..", ".") for p in path.split("/")) or "//" in path
            or path.endswith("/") or path == NAME or not parts):
        raise InvalidManifest(f"unsafe path in manifest: {path!r}")
    return path


def _check_sha256(value: object) -> str:
    if not (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value)):
        raise InvalidManifest(f"not a sha256 hex digest: {value!r}")
    return value


def _file_entry(body: dict[str, Any]) -> FileEntry:
    plain_size, plain_sha256 = body.get("plaintext_size"), body.get("plaintext_sha256")
    if (plain_size is None) != (plain_sha256 is None):
        raise InvalidManifest(f"{body['path']!r}: plaintext_size and plaintext_sha256 come "
                              "together")
    return FileEntry(check_relative_path(body["path"]), int(body["size"]),
                     _check_sha256(body["sha256"]),
                     None if plain_size is None else int(plain_size),
                     None if plain_sha256 is None else _check_sha256(plain_sha256))


def from_json(text: str) -> Manifest:
    """Given a manifest's text (from any store), return it. Raise InvalidManifest if a field is
    missing or of the wrong type, a path is unsafe or the generation id is malformed."""
    try:
        body = json.loads(text)
        if body["format"] != FORMAT_VERSION:
            raise InvalidManifest(f"unknown manifest format {body['format']!r}")
        if body["kind"] not in generation.KINDS:
            raise InvalidManifest(f"unknown kind {body['kind']!r}")
        generation.parse(body["generation"])
        files = tuple(_file_entry(f) for f in body["files"])
        if len({f.path for f in files}) != len(files):
            raise InvalidManifest("a path is listed twice")
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
        )
    except InvalidManifest:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidManifest(f"malformed manifest: {exc}") from exc


def write(directory: Path, manifest: Manifest) -> Path:
    """Write `manifest` into `directory` atomically and durably; return its path."""
    target = directory / NAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest-", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as any other file: the SSH gateway's users read it
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


def read(directory: Path) -> Manifest:
    """Read and check the manifest of the generation in `directory`.
    Raise FileNotFoundError if there is none, InvalidManifest if it is not valid."""
    return from_json((directory / NAME).read_text())


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
