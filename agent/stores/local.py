"""A store in a local directory: `<root>/{data,logs}/<generation>/`.

Used as the source store (generations kept on the source after a verified transport) and,
with `<root>` = `<sink-store>/<source-id>`, as a pull-mode sink store.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.core import archive, generation, manifest
from agent.core.manifest import FileEntry, Manifest, fsync_dir
from agent.stores import StoreError, VerificationFailed

logger = logging.getLogger(__name__)


class NotRegular(StoreError):
    """A path of a generation is, or lies below, something other than a directory (a symbolic
    link above all), or is itself not a regular file."""


def open_regular(root: Path, name: str) -> io.BufferedReader:
    """Open the regular file `name` (a manifest path) below `root` for reading, following no
    symbolic link on the way, so a generation can never make the reader leave it.
    Raise FileNotFoundError if it is missing, NotRegular if it or a directory above it is a
    link or not what it should be."""
    parts = manifest.check_relative_path(name).split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                what = "/".join(parts[: depth + 1])
                kind = "a symbolic link" if os.path.islink(root / what) else "not a directory"
                raise NotRegular(f"{name}: not a regular file ({what} is {kind})") from None
            os.close(fd)
            fd = child
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(f"{name}: not a regular file")
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return handle


def file_problem(directory: Path, entry: FileEntry) -> str:
    """Re-hash the file of the manifest's `entry` below `directory`, following no symbolic
    link; return what is wrong with it (missing, not a regular file, other size or sha256),
    or ''."""
    path = directory / entry.path
    try:
        with open_regular(directory, entry.path) as handle:
            digest = archive.hash_handle(handle)
    except FileNotFoundError:
        return f"{path} is missing"
    except NotRegular as exc:
        return str(exc)
    if (digest.size, digest.sha256) != (entry.size, entry.sha256):
        return (
            f"{path}: {digest.size} bytes, sha256 {digest.sha256}; the manifest says "
            f"{entry.size} bytes, {entry.sha256}"
        )
    return ""


def verify_directory(directory: Path, m: Manifest) -> None:
    """Re-hash every file the manifest lists. Raise VerificationFailed naming the first that
    is missing, not a regular file or differs (see file_problem)."""
    for entry in m.files:
        problem = file_problem(directory, entry)
        if problem:
            raise VerificationFailed(problem)


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
        Raise FileNotFoundError if it is missing, NotRegular if it is not a regular file of
        the generation (see open_regular)."""
        with open_regular(self.path(kind, gen), name) as handle:
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
        """Copy `source` to `<root>/.incoming/`, verify it, rename it to `target`. Raise
        OSError (the copy failed) or VerificationFailed after removing the partial copy."""
        incoming = self.root / ".incoming" / target.name
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.parent.mkdir(parents=True, exist_ok=True)
        try:
            copy = subprocess.run(
                ["cp", "--archive", "--reflink=auto", str(source), str(incoming)],
                capture_output=True,
                text=True,
                check=False,
            )
            if copy.returncode != 0:
                raise OSError(
                    f"copy of {source} into {self.root} failed: "
                    f"{' '.join(copy.stderr.strip().splitlines()[-3:])}"
                )
            verify_directory(incoming, manifest.read(incoming))
            incoming.rename(target)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise

    def replace_manifest(self, kind: str, m: Manifest, verify: str = "checksum") -> None:
        """Replace the manifest of the generation `m` names, atomically (a rename): a reader
        sees the old manifest or the new one. `verify` is for the signature S3Store shares."""
        manifest.write(self.path(kind, m.generation), m)

    def delete_generation(self, kind: str, gen: str) -> None:
        """Remove a generation, its manifest first, so a half-removed one is never complete."""
        target = self.path(kind, gen)
        (target / manifest.NAME).unlink(missing_ok=True)
        shutil.rmtree(target)

    # -- objects by name below the root: packs, the garbage collection record

    def object_path(self, name: str) -> Path:
        """The path of `name` (a path below the root, e.g. `packs/ab/<id>.pack`)."""
        return self.root / manifest.check_relative_path(name)

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Yield (name below the root, size) of every regular file below the directory
        `prefix` (e.g. `packs/`), walking it without following symbolic links; names of
        temporary files (`.…`) are skipped."""
        top = self.root / prefix
        pending = [top] if top.is_dir() else []
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        name = Path(entry.path).relative_to(self.root).as_posix()
                        yield name, entry.stat(follow_symlinks=False).st_size

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """The `length` bytes of `name` from `offset`."""
        with open_regular(self.root, name) as handle:
            handle.seek(offset)
            return handle.read(length)

    def read_named(self, name: str) -> Iterator[bytes]:
        """Yield the content of `name` in chunks."""
        with open_regular(self.root, name) as handle:
            while data := handle.read(archive.CHUNK):
                yield data

    def get_bytes(self, name: str) -> bytes | None:
        """The content of the small file `name`, or None if there is none."""
        try:
            with open_regular(self.root, name) as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write `name` atomically and durably (temporary file, fsync, rename, fsync of the
        directory): a reader sees the old content or the new, never a part."""
        self._write_atomically(name, lambda handle: handle.write(data))

    def put_file(self, name: str, path: Path, verify: str = "checksum") -> None:
        """Copy the file at `path` in as `name`, atomically and durably (see put_bytes); the
        copy is read back and compared unless `verify` is `off`. Raise VerificationFailed if it
        differs."""

        def copy(handle: BinaryIO) -> None:
            with open(path, "rb") as source:
                while data := source.read(archive.CHUNK):
                    digest.update(data)
                    handle.write(data)

        def check(tmp: Path) -> None:
            if verify != "off":
                with open(tmp, "rb") as written:
                    if archive.hash_handle(written).sha256 != digest.hexdigest():
                        raise VerificationFailed(f"{tmp}: the copy differs from {path}")

        digest = hashlib.sha256()
        self._write_atomically(name, copy, check)

    def _write_atomically(
        self,
        name: str,
        fill: Callable[[BinaryIO], object],
        check: Callable[[Path], None] | None = None,
    ) -> None:
        """Write `name` by `fill` into a temporary file beside it, fsync it, `check` it, rename
        it into place and fsync the directory; on any failure the temporary file goes."""
        target = self.object_path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            if check is not None:
                check(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)

    def delete_object(self, name: str) -> None:
        """Remove `name`; one already gone is no error."""
        self.object_path(name).unlink(missing_ok=True)

    def remove_temporaries(self, prefix: str) -> int:
        """Remove the temporary files (`.….tmp`) below the directory `prefix` that a killed
        put_bytes or put_file left. Call only under the agent's lock (no write is under way).
        Return how many were removed."""
        removed = 0
        for path in (self.root / prefix).rglob(".*.tmp"):
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
        return removed

    def move_file(self, name: str, path: Path) -> None:
        """Move the file at `path` in as `name`: a rename on one filesystem (durable: the
        directory is synced), else a copy (see put_file) and the original removed."""
        target = self.object_path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self.put_file(name, path)
            path.unlink()
        fsync_dir(target.parent)
