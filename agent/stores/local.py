"""A store in a local directory: `<root>/{data,logs}/<generation>/`.

Used as the source store (generations kept on the source after a verified transport) and,
with `<root>` = `<sink-store>/<source-id>`, as a pull-mode sink store.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent import archive, generation, manifest
from agent.manifest import Manifest, fsync_dir
from agent.stores import VerificationFailed

logger = logging.getLogger(__name__)


def verify_directory(directory: Path, m: Manifest) -> None:
    """Re-hash every file the manifest lists. Raise VerificationFailed naming the first file
    that is missing or differs."""
    for entry in m.files:
        path = directory / entry.path
        try:
            digest = archive.hash_file(path)
        except FileNotFoundError:
            raise VerificationFailed(f"{path} is missing") from None
        if (digest.size, digest.sha256) != (entry.size, entry.sha256):
            raise VerificationFailed(f"{path}: {digest.size} bytes, sha256 {digest.sha256}; "
                                     f"the manifest says {entry.size} bytes, {entry.sha256}")


@dataclass(frozen=True)
class LocalStore:
    root: Path

    @property
    def url(self) -> str:
        return str(self.root)

    def path(self, kind: str, gen: str) -> Path:
        generation.parse(gen)
        return self.root / kind / gen

    def read_manifest(self, kind: str, gen: str) -> Manifest:
        return manifest.read(self.path(kind, gen))

    def chunks(self, kind: str, gen: str, name: str) -> Iterator[bytes]:
        """Yield the content of the generation's file `name` (a manifest path) in chunks.
        Raise FileNotFoundError if it is missing."""
        with open(self.path(kind, gen) / manifest.check_relative_path(name), "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while data := handle.read(archive.CHUNK):
                yield data

    def all_ids(self) -> list[str]:
        return [g for kind in generation.KINDS for ids in self.generations(kind) for g in ids]

    def generations(self, kind: str) -> tuple[list[str], list[str]]:
        """Return (complete, incomplete) generation ids of `kind`, oldest first."""
        directory = self.root / kind
        if not directory.is_dir():
            return [], []
        ids = sorted(e.name for e in directory.iterdir() if generation.is_valid(e.name))
        complete = [g for g in ids if (directory / g / manifest.NAME).is_file()]
        return complete, [g for g in ids if g not in complete]

    def move_in(self, source: Path, kind: str, gen: str) -> Path:
        """Move the complete generation at `source` into the store: a rename on one
        filesystem; otherwise copy, verify against the manifest, then delete the source.
        A generation the store already holds completely is not copied again."""
        target = self.path(kind, gen)
        target.parent.mkdir(parents=True, exist_ok=True)
        if (target / manifest.NAME).is_file():
            logger.warning("%s is already in the store; removing the handover's copy", gen)
            shutil.rmtree(source)
            return target
        try:
            source.rename(target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._copy_in(source, target)
            shutil.rmtree(source)
        fsync_dir(target.parent)
        return target

    def _copy_in(self, source: Path, target: Path) -> None:
        incoming = self.root / ".incoming" / target.name
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "--archive", "--reflink=auto", str(source), str(incoming)],
                       check=True, capture_output=True)
        verify_directory(incoming, manifest.read(incoming))
        incoming.rename(target)

    def delete_generation(self, kind: str, gen: str) -> None:
        """Remove a generation, its manifest first, so a half-removed one is never complete."""
        target = self.path(kind, gen)
        (target / manifest.NAME).unlink(missing_ok=True)
        shutil.rmtree(target)
