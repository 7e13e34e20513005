"""Unpacking a chunked generation into directories: the restore's "fetch, verify and unpack"
for the `chunks` format, while the application runs.

    1. the index, in order: every entry checked (MemberPolicy: inside the generation's data
       paths, never below a symbolic link, hard links only to earlier files); the selected
       ones created — directories, empty files of their size (holes stay holes), symbolic
       links, hard links, FIFOs — and each file's chunks noted (SQLite, on disk)
    2. the contents: whole — every listed pack streamed once, its sha256 checked, each needed
       blob decoded once and written at every offset that needs it; a part (`--path`) — only
       the needed blobs, by ranged reads found through the packs' trailers
    3. every file's sha256 checked against the index, then modes, numeric owners (as root)
       and nanosecond times set, children before the time of their directory matters

Nothing here touches the application: the caller swaps the directories in once this returned.
On any failure the destinations may hold a partial tree: the caller removes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.chunks import index, placing
from agent.chunks.index import Entry
from agent.chunks.reader import (
    Generation,
    ReadFailed,
)
from agent.core.members import MemberPolicy, UnsafeMember

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destination:
    """Entries equal to or below `member` (a data path as member name, `srv/app`, or a path
    below one) are written to `directory / <entry path>`."""

    directory: Path
    member: bytes

    def holds(self, path: bytes) -> bool:
        return path == self.member or path.startswith(self.member + b"/")


@dataclass
class Unpacked:
    """What an unpack wrote: entries, files, their bytes, and packs or blobs read."""

    entries: int = 0
    files: int = 0
    size: int = 0
    packs: int = 0
    blobs: int = 0
    read_back: int = 0  # files whose chunks did not arrive in order, hashed after writing
    # hard-link groups whose first file lies outside the selection: that file's entry, and
    # the staged name of the group's first selected link, which holds the content
    adopted: dict[bytes, Entry] = field(default_factory=dict)
    adopted_at: dict[bytes, bytes] = field(default_factory=dict)
    last_parent: bytes = b""


def _selecting(destinations: Sequence[Destination]) -> tuple[bytes, ...]:
    """The filter (see Generation.entries) passing at least the index lines of entries the
    destinations select: their members as they appear in a line; none (every line) if one
    is not UTF-8."""
    texts = tuple(index.json_text(d.member) for d in destinations)
    return () if None in texts else tuple(t for t in texts if t is not None)


def _staged(destinations: Sequence[Destination], path: bytes) -> bytes | None:
    for destination in destinations:
        if destination.holds(path):
            return os.fsencode(destination.directory) + b"/" + path
    return None


def _kind_and_link(entry: Entry) -> tuple[str, str]:
    if entry.type == "symlink":
        return "symlink", os.fsdecode(entry.target or b"")
    if entry.type == "hardlink":
        return "hardlink", os.fsdecode(entry.link or b"")
    return entry.type, ""


def _links_from_outside(opened: Generation, destinations: Sequence[Destination]) -> set[bytes]:
    """The first files of hard-link groups that selected hard links point to from outside
    the selection: restored as a file of their own, at the first selected link."""
    wanted = set()
    for entry in opened.entries(containing=(b'"type":"hardlink"',)):
        if (
            entry.type == "hardlink"
            and entry.link is not None
            and _staged(destinations, entry.path) is not None
            and _staged(destinations, entry.link) is None
        ):
            wanted.add(entry.link)
    return wanted


def _create(
    entry: Entry,
    staged: bytes,
    plan: placing.Plan,
    result: Unpacked,
    destinations: Sequence[Destination],
) -> None:
    parent = os.path.dirname(staged)
    if parent != result.last_parent:  # siblings follow each other in the index
        os.makedirs(parent, mode=0o700, exist_ok=True)
        result.last_parent = parent
    if entry.type == "dir":
        os.makedirs(staged, mode=0o700, exist_ok=True)
    elif entry.type == "file":
        _create_file(entry, staged, plan, result)
    elif entry.type == "symlink":
        assert entry.target is not None
        os.symlink(entry.target, staged)
    elif entry.type == "fifo":
        os.mkfifo(staged, 0o600)
    elif entry.type == "hardlink":
        assert entry.link is not None
        first = _staged(destinations, entry.link)
        if first is not None:
            os.link(first, staged, follow_symlinks=False)
            return
        holder = result.adopted_at.get(entry.link)
        if holder is None:  # the first selected name of the group holds the content
            _create_file(result.adopted[entry.link], staged, plan, result)
            result.adopted_at[entry.link] = staged
        else:
            os.link(holder, staged, follow_symlinks=False)


def _create_file(entry: Entry, staged: bytes, plan: placing.Plan, result: Unpacked) -> None:
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, entry.size)
    finally:
        os.close(fd)
    plan.add_file(staged, entry)
    result.files += 1
    result.size += entry.size


def _check_contents(
    opened: Generation, destinations: Sequence[Destination], result: Unpacked, status: bytearray
) -> None:
    """Hash every staged file not checked as it was written (a few at once) against its
    sha256 in the index. Raise ReadFailed naming the first that differs."""

    def check(path: bytes, entry: Entry) -> str:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256")
            size = handle.tell()
        if (size, digest.hexdigest()) != (entry.size, entry.sha256):
            return (
                f"{os.fsdecode(entry.path)!r} restored with {size} bytes, sha256 "
                f"{digest.hexdigest()}; the index says {entry.size} bytes, {entry.sha256}"
            )
        return ""

    def files() -> Iterator[tuple[bytes, Entry]]:
        no = 0  # the files in the order they were created
        for entry in opened.entries(_selecting(destinations)):
            staged = _staged(destinations, entry.path)
            if staged is None:
                continue
            if entry.type == "file":
                no += 1
                if status[no] != placing.CHECKED:
                    result.read_back += 1
                    yield staged, entry
            elif (
                entry.type == "hardlink"
                and entry.link is not None
                and result.adopted_at.get(entry.link) == staged
            ):
                no += 1
                if status[no] != placing.CHECKED:
                    result.read_back += 1
                    yield staged, result.adopted[entry.link]

    with ThreadPoolExecutor(2) as pool:
        pending: deque[Future[str]] = deque()
        for path, entry in files():
            pending.append(pool.submit(check, path, entry))
            while len(pending) > 8 or (pending and pending[0].done()):
                if problem := pending.popleft().result():
                    raise ReadFailed(f"the generation is damaged: {problem}")
        for future in pending:
            if problem := future.result():
                raise ReadFailed(f"the generation is damaged: {problem}")


def _set_metadata(opened: Generation, destinations: Sequence[Destination]) -> None:
    as_root = os.geteuid() == 0
    for entry in opened.entries(_selecting(destinations)):
        staged = _staged(destinations, entry.path)
        if staged is None or entry.type == "hardlink":
            continue
        if as_root:
            os.lchown(staged, entry.uid, entry.gid)
        if entry.type != "symlink":
            os.chmod(staged, entry.mode & 0o7777)
        os.utime(staged, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def unpack(
    opened: Generation,
    destinations: Sequence[Destination],
    roots: Sequence[str],
    whole: bool = True,
) -> Unpacked:
    """Write the entries of the opened generation that the destinations select below them,
    checked, and return what was written. `roots` are the generation's data paths as member
    names; every entry must lie inside one. `whole`: stream every listed pack (a whole
    restore); else read only the needed blobs. Raise ReadFailed if the generation is damaged
    (a pack, a blob, a file's content), UnsafeMember for an entry that must not be written,
    WrongKey if the identities do not open a blob."""
    policy = MemberPolicy(list(roots))
    result = Unpacked()
    adopt = _links_from_outside(opened, destinations) if not whole else set()
    db = sqlite3.connect(opened.workdir / "plan.sqlite")
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        plan = placing.Plan(db)
        for entry in opened.entries():
            kind, link = _kind_and_link(entry)
            policy.check(os.fsdecode(entry.path), kind, link)
            staged = _staged(destinations, entry.path)
            if staged is None:
                if entry.type == "file" and entry.path in adopt:
                    result.adopted[entry.path] = entry
                continue
            result.entries += 1
            _create(entry, staged, plan, result, destinations)
        plan.finish()
        fill = placing.fill_whole if whole else placing.fill_part
        result.packs, result.blobs = fill(opened, plan)
        if (unmet := plan.unmet()) is not None:
            raise ReadFailed(
                f"chunk {unmet[0].hex()} of {os.fsdecode(unmet[1])!r} is in none "
                "of the packs the manifest lists"
            )
        status = plan.status
    finally:
        db.close()
    if any(s != placing.CHECKED for s in memoryview(status)[1:]):
        _check_contents(opened, destinations, result, status)
    _set_metadata(opened, destinations)
    logger.info(
        "unpacked %d entries (%d files, %d bytes) from %d packs, %d blobs; %d files "
        "read back to check them",
        result.entries,
        result.files,
        result.size,
        result.packs,
        result.blobs,
        result.read_back,
    )
    return result


__all__ = ["Destination", "Unpacked", "UnsafeMember", "unpack"]
