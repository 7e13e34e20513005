"""The sink's copy of a generation while it arrives, `<SINK_STORE_DIR>/.incoming/<source>/
<kind>/<generation>/`, as rsync leaves it — and how the next pull takes up whatever ended the
last one:

* a transfer stopped by SIGTERM: rsync itself moved its partial file to PARTIAL_DIR;
* a transfer killed outright (SIGKILL, the OOM killer): rsync's temporary file `.<name>.XXXXXX`
  becomes that partial file (take_up_temporaries), so only the rest travels;
* a copy that failed verification: its files become partial files too, the basis of a
  transfer that compares by content (set_aside), since a bad copy can have the right file's
  size and time and rsync would keep it.

Verification accepts only what the manifest lists, as regular files in real directories; a
symbolic link, a device or an unlisted file anywhere in the copy fails it.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import defaultdict
from pathlib import Path, PurePosixPath

from agent.core import manifest
from agent.core.manifest import Manifest
from agent.stores import VerificationFailed
from agent.stores.local import file_problem

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".rsync-partial"  # rsync --partial-dir: relative, so one in each directory
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9]{6}")
_SHOWN = 5


def take_up_temporaries(directory: Path, m: Manifest) -> None:
    """Make the temporary file a killed rsync left beside each listed file the partial file
    of the next transfer (keeping the longest of them and an earlier partial file); remove
    the other temporary files of that name."""
    take_up_temporaries_of(directory, [entry.path for entry in m.files])


def take_up_temporaries_of(directory: Path, paths: list[str]) -> None:
    """take_up_temporaries for the files `paths` (relative to `directory`)."""
    names: dict[str, set[str]] = defaultdict(set)
    for name in paths:
        path = PurePosixPath(name)
        names[str(path.parent)].add(path.name)
    for parent, listed in names.items():
        folder = directory / parent
        if not _real_directory(directory, parent):
            continue
        found: dict[str, list[Path]] = defaultdict(list)
        with os.scandir(folder) as entries:
            for item in entries:
                match = _TEMPORARY.fullmatch(item.name)
                if (
                    match
                    and match["name"] in listed
                    and item.name not in listed
                    and item.is_file(follow_symlinks=False)
                    and item.stat(follow_symlinks=False).st_nlink == 1
                ):
                    found[match["name"]].append(Path(item.path))
        for name, temporaries in found.items():
            partial = folder / PARTIAL_DIR / name
            candidates = temporaries + ([partial] if partial.is_file() else [])
            keep = max(candidates, key=lambda p: p.stat().st_size)
            for other in temporaries:
                if other != keep:
                    other.unlink()
            if keep != partial:
                partial.parent.mkdir(exist_ok=True)
                os.replace(keep, partial)
                logger.info(
                    "resuming %s from the %d bytes a killed transfer left",
                    name,
                    partial.stat().st_size,
                )


def drop_partials(directory: Path) -> None:
    """After a complete transfer: remove partial files rsync did not need."""
    for folder in [directory, *_directories(directory)]:
        partials = folder / PARTIAL_DIR
        if partials.is_dir() and not partials.is_symlink():
            for item in partials.iterdir():
                item.unlink()
            partials.rmdir()


def verify_or_set_aside(directory: Path, m: Manifest) -> None:
    """Check the copy in `directory` against its manifest `m`: every listed file there, a
    regular file reached through real directories, with the manifest's size and sha256, and
    nothing else but directories. Raise VerificationFailed naming the problems, after setting
    the copy aside for the next pull (set_aside)."""
    failed, problems = [], []
    for entry in m.files:
        problem = file_problem(directory, entry)
        if problem:
            failed.append(entry.path)
            problems.append(problem)
    unlisted = _unlisted(directory, m)
    if unlisted:
        problems.append(
            f"not in the manifest: {', '.join(unlisted[:_SHOWN])}"
            + (f" and {len(unlisted) - _SHOWN} more" if len(unlisted) > _SHOWN else "")
        )
    if problems:
        set_aside(directory, failed)
        raise VerificationFailed(
            "; ".join(problems[:_SHOWN])
            + (f"; and {len(problems) - _SHOWN} more problems" if len(problems) > _SHOWN else "")
        )


def set_aside(directory: Path, paths: list[str]) -> None:
    """Make each regular file of `paths` in the copy the partial file of the next transfer, and
    have that transfer compare by content. Whatever else is there is removed, and so is a file
    with other hard links (`--link-dest` links unchanged files to the stored generation): rsync
    writes into a partial file in place, which would change the stored copy."""
    for name in paths:
        path = directory / name
        if not _real_directory(directory, str(PurePosixPath(name).parent)):
            continue
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(found.st_mode) and found.st_nlink == 1:
            (path.parent / PARTIAL_DIR).mkdir(exist_ok=True)
            os.replace(path, path.parent / PARTIAL_DIR / path.name)
        elif not stat.S_ISDIR(found.st_mode):
            path.unlink()
    _failed_marker(directory).touch()


def compare_by_content(directory: Path) -> bool:
    """Whether the last copy in `directory` failed verification."""
    return _failed_marker(directory).exists()


def forget_failure(directory: Path) -> None:
    _failed_marker(directory).unlink(missing_ok=True)


def _failed_marker(directory: Path) -> Path:
    return directory.parent / f"{directory.name}.failed-verification"


def _unlisted(directory: Path, m: Manifest) -> list[str]:
    """Every entry below `directory` (never following a link) that is neither a directory nor
    a regular file the manifest lists, or the manifest itself."""
    listed = {entry.path for entry in m.files} | {manifest.NAME}
    found = []
    for folder in [directory, *_directories(directory)]:
        with os.scandir(folder) as entries:
            for item in sorted(entries, key=lambda e: e.name):
                name = Path(item.path).relative_to(directory).as_posix()
                if item.is_dir(follow_symlinks=False):
                    continue
                if item.is_symlink():
                    found.append(f"{name} (a symbolic link)")
                elif not item.is_file(follow_symlinks=False):
                    found.append(f"{name} (not a regular file)")
                elif name not in listed:
                    found.append(name)
    return found


def _directories(root: Path) -> list[Path]:
    """Every directory below `root`, not following links."""
    found, stack = [], [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            below = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
        found += below
        stack += below
    return found


def _real_directory(root: Path, relative: str) -> bool:
    """Whether `root/relative` is a directory reached without following a link."""
    path = root
    for part in PurePosixPath(relative).parts:
        path = path / part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        except FileNotFoundError:
            return False
    return True
