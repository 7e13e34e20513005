"""Complete generations in a handover, as step 1 leaves them, crafted without Docker: files
first, MANIFEST.json last."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from agent.core import archive, manifest
from agent.core.manifest import FileEntry, Manifest

SOURCE = "test-source"


def seal(directory: Path, gen: str, kind: str, source: str = SOURCE) -> Path:
    """Write the manifest of the generation whose files are already in `directory`: every
    regular file below it but an earlier manifest, hashed now. Return the manifest's path."""
    entries = []
    for path in archive.walk_files(directory):
        if path.relative_to(directory).as_posix() == manifest.NAME:
            continue  # sealed again after a change
        digest = archive.hash_file(path)
        entries.append(
            FileEntry(path.relative_to(directory).as_posix(), digest.size, digest.sha256)
        )
    return manifest.write(
        directory,
        Manifest(
            source_id=source,
            kind=kind,
            generation=gen,
            created_at=gen,
            downtime_seconds=0.1,
            agent_version="test",
            files=tuple(entries),
        ),
    )


def write_generation(
    handover: Path, kind: str, gen: str, files: Mapping[str, bytes], source: str = SOURCE
) -> Path:
    """A complete generation `<handover>/<kind>/<gen>/` holding `files` (relative path →
    content). Return its directory."""
    directory = handover / kind / gen
    directory.mkdir(parents=True)
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)
    seal(directory, gen, kind, source)
    return directory


def make_generation(
    handover: Path, gen: str, size: int = 200_000, kind: str = "data", source: str = SOURCE
) -> bytes:
    """A complete generation of one file of `size` random bytes (`data.tar.zst` for data,
    `var/log/app.log` for logs); return that content."""
    content = os.urandom(size)
    name = archive.ARCHIVE_NAME if kind == "data" else "var/log/app.log"
    write_generation(handover, kind, gen, {name: content}, source)
    return content
