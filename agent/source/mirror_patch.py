"""Large files of the mirror brought up to date in place by a same-offset block compare.

A local copy gains nothing from rsync's delta algorithm (rolling checksums over both copies of
every changed file); a database's files change in place at fixed offsets. So a large file whose
size or nanosecond mtime differs from its mirror copy is read in blocks beside that copy, and
only the pages that differ are written, at the same offsets: the pass reads both copies once
(from the page cache, as a rule: the application and the last pass just touched them) and
writes what the application changed. When a file's last pass found most of it changed, the
final pass copies it whole instead, which reads one copy, not two.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LARGE_FILE = 4 << 20  # regular files from this size on are patched here; smaller ones by rsync
BLOCK = 1 << 20
SPAN = 32 * BLOCK
PAGE = 4096
COPY_WHOLE_ABOVE = 0.5  # changed fraction in the last pass above which the final pass copies
RECENT_NS = 1_000_000_000  # an mtime this close to the read may hide a same-tick later write
_ZEROS = bytes(BLOCK)


@dataclass(frozen=True)
class Patch:
    """One large file to bring up to date: source and mirror copy, as they were when decided."""

    source: Path
    target: Path
    source_stat: os.stat_result
    target_size: int
    copy_whole: bool


@dataclass(frozen=True)
class Patched:
    target: Path
    size: int
    changed: int
    copied_whole: bool
    unread: int = 0  # of `changed`: copied without comparing, its mirror copy not in memory


def is_large(st: os.stat_result) -> bool:
    """Whether a file is one this module keeps up to date (not hardlinked: patching one name
    in place would change the others)."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size >= LARGE_FILE


Found = dict[Path, tuple[int, int]]  # large file (relative to its source path) → (dev, inode)


def large_files(
    root: Path,
    directories: set[Path] | None = None,
    skip: Callable[[Path, bool], bool] | None = None,
) -> Found:
    """The large files below `root` (a source path), relative to it, with their identity: all
    of them, or only those directly in `directories` (relative to `root`). `skip(relative path,
    is a directory)` leaves out what is excluded: such a directory is not entered."""
    found: Found = {}
    if directories is None:
        walked = _walk(root, skip)
    else:
        walked = ((root / d, _file_names(root / d)) for d in directories)
    for directory, files in walked:
        for name in files:
            path = directory / name
            try:
                st = path.lstat()
            except OSError:
                continue  # vanished meanwhile: rsync deals with it
            if is_large(st) and (skip is None or not skip(path.relative_to(root), False)):
                found[path.relative_to(root)] = (st.st_dev, st.st_ino)
    return found


def _walk(
    root: Path, skip: Callable[[Path, bool], bool] | None
) -> Iterator[tuple[Path, list[str]]]:
    for d, dirs, files in os.walk(root):
        here = Path(d)
        if skip is not None:
            dirs[:] = [n for n in dirs if not skip((here / n).relative_to(root), True)]
        yield here, files


def _file_names(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [e.name for e in entries if e.is_file(follow_symlinks=False)]
    except OSError:
        return []


def renames(before: Found, now: Found, root: Path) -> dict[Path, Path]:
    """Large files renamed in the source since `before` (new name → old name): the same inode
    under a new name, its old name gone. A database recycles files this way (PostgreSQL's WAL
    segments); the mirror copy renamed too is then compared, not copied again."""
    by_identity = {identity: rel for rel, identity in before.items()}
    found = {}
    for rel, identity in now.items():
        old = by_identity.get(identity)
        if old is not None and old != rel and old not in now and not (root / old).exists():
            found[rel] = old
    return found


def decide(source: Path, target: Path, last_fraction: float | None, final: bool) -> Patch | None:
    """Return the patch that brings `target` up to date with `source`, or None when it is up
    to date by size and nanosecond mtime or is not a pair of large single-link regular files
    (rsync handles those). The final pass copies whole a file whose last pass changed more
    than COPY_WHOLE_ABOVE of it."""
    try:
        src, dst = source.lstat(), target.lstat()
    except OSError:
        return None
    if not is_large(src) or not (stat.S_ISREG(dst.st_mode) and dst.st_nlink == 1):
        return None
    if src.st_size == dst.st_size and src.st_mtime_ns == dst.st_mtime_ns:
        return None
    copy_whole = final and last_fraction is not None and last_fraction > COPY_WHOLE_ABOVE
    return Patch(source, target, src, dst.st_size, copy_whole)


def spans(patch: Patch) -> list[tuple[int, int]]:
    """The byte ranges of a patch that can be copied side by side, SPAN bytes each: the
    compare is bound by memory bandwidth and os.preadv lets go of the GIL, so two threads on
    one large file take half the time of one."""
    size = patch.source_stat.st_size
    return [(start, min(start + SPAN, size)) for start in range(0, size, SPAN)] or [(0, 0)]


def copy_span(patch: Patch, start: int, end: int, final: bool) -> tuple[int, int]:
    """Bring bytes [start, end) of the mirror copy up to date; return the bytes written and,
    of those, the bytes copied without comparing: in the final pass a block whose mirror copy
    is not in the page cache is written rather than read from disk to be compared (a copy
    reads once what a compare reads twice). Raise OSError if a copy cannot be read or
    written."""
    source_fd = os.open(patch.source, os.O_RDONLY)
    try:
        target_fd = os.open(patch.target, os.O_RDWR)
        try:
            return _copy_blocks(
                source_fd, target_fd, start, end, patch.target_size, patch.copy_whole, final
            )
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


def finish(patch: Patch, written: int, unread: int, final: bool) -> Patched:
    """After every span was copied: the size the source had when decided, its owner, mode and
    nanosecond mtime. Outside the final pass a file modified less than RECENT_NS before it was
    read is given an mtime 1 ns off its source's, so the next pass compares it again (a write
    in the same clock tick would not move the mtime). Raise OSError on failure."""
    st = patch.source_stat
    target_fd = os.open(patch.target, os.O_RDWR)
    try:
        if patch.target_size != st.st_size:
            os.ftruncate(target_fd, st.st_size)
        _copy_owner_and_mode(target_fd, st)
    finally:
        os.close(target_fd)
    mtime = st.st_mtime_ns
    if not final and time.time_ns() - mtime < RECENT_NS:
        mtime -= 1
    os.utime(patch.target, ns=(st.st_atime_ns, mtime), follow_symlinks=False)
    return Patched(patch.target, st.st_size, written, patch.copy_whole, unread)


def _copy_blocks(
    source_fd: int,
    target_fd: int,
    start: int,
    end: int,
    target_size: int,
    copy_whole: bool,
    only_in_memory: bool,
) -> tuple[int, int]:
    """Write into the target the pages of the source's bytes [start, end) that differ (all of
    them with `copy_whole`); zero blocks past the target's end stay holes. With
    `only_in_memory`, blocks of the target that are not in the page cache are written, not
    read. Return the bytes written and, of those, the ones written unread."""
    ours, theirs = bytearray(BLOCK), bytearray(BLOCK)
    view = memoryview(ours)
    written = unread = 0
    for offset in range(start, end, BLOCK):
        length = os.preadv(source_fd, [ours], offset)
        length = min(length, end - offset)
        if length <= 0:
            break  # the source shrank meanwhile; the next pass sees its new size
        if offset >= target_size:
            if not _equal(ours, _ZEROS, length):
                os.pwrite(target_fd, view[:length], offset)
                written += length
            continue
        if copy_whole:
            os.pwrite(target_fd, view[:length], offset)
            written += length
            continue
        have = _read(target_fd, theirs, offset, min(BLOCK, target_size - offset), only_in_memory)
        if have < 0:
            os.pwrite(target_fd, view[:length], offset)
            written += length
            unread += length
            continue
        if have >= length and _equal(ours, theirs, length):
            continue
        for first, last in _differing_pages(ours, theirs, length, have):
            os.pwrite(target_fd, view[first:last], offset + first)
            written += last - first
    return written, unread


def _read(fd: int, buffer: bytearray, offset: int, expected: int, only_in_memory: bool) -> int:
    """Read a block of the target at `offset` (`expected` bytes are there); return its length,
    or -1 when `only_in_memory` and not all of it is in the page cache (RWF_NOWAIT)."""
    if only_in_memory:
        try:
            have = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
            return have if have >= expected else -1
        except BlockingIOError:
            return -1
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
    return os.preadv(fd, [buffer], offset)


def _equal(ours: bytearray, theirs: bytes | bytearray, length: int) -> bool:
    """Whether the first `length` bytes are equal. Whole blocks are compared as they are (one
    memcmp); slicing would copy both, and comparing memoryviews goes byte by byte."""
    if length == BLOCK:
        return ours == theirs
    return ours[:length] == theirs[:length]


def _differing_pages(
    ours: bytearray, theirs: bytearray, length: int, have: int
) -> list[tuple[int, int]]:
    """The runs of PAGE-sized pages of the first `length` bytes where `ours` differs from the
    first `have` bytes of `theirs`, as (start, end) offsets, adjacent pages merged."""
    runs: list[tuple[int, int]] = []
    for start in range(0, length, PAGE):
        end = min(start + PAGE, length)
        if end <= have and ours[start:end] == theirs[start:end]:
            continue
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def _copy_owner_and_mode(target_fd: int, st: os.stat_result) -> None:
    have = os.fstat(target_fd)
    if (have.st_uid, have.st_gid) != (st.st_uid, st.st_gid):
        with contextlib.suppress(PermissionError):  # not root: as rsync does, copies are ours
            os.fchown(target_fd, st.st_uid, st.st_gid)
    if stat.S_IMODE(have.st_mode) != stat.S_IMODE(st.st_mode):
        os.fchmod(target_fd, stat.S_IMODE(st.st_mode))
