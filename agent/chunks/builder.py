"""Building a chunked data generation from the mirror, after the application runs again.

The mirror is walked streaming in the index order (depth-first, siblings by name bytes)
beside the previous generation's index, read as a stream too (a merge by path): a file
whose size, mtime_ns, inode and ctime_ns equal its previous entry, and whose chunks the
stores still hold, reuses that entry's sha256 and chunks unread. Every other file is read
once: FastCDC → chunk id → skipped when a store already holds it → zstd → age → appended
to a pack in the handover. Chunk ids and blobs are made by worker threads (hashing and zstd
release the GIL) in a bounded window, so memory stays flat in file count and data size;
the index is written in order as entries complete.

Deduplication is against the blobs every store of the site holds in the same pack (push:
the S3 sink store and the source store, by their dedup caches), or that the handover holds
(packs of generations still waiting), so no store ever lacks a pack of a generation it
receives: a blob only one store holds is written again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.chunks import blob, chunker, ids, index
from agent.chunks.cache import DedupCache
from agent.chunks.index import Entry
from agent.chunks.pack import PackInfo, PackWriter

logger = logging.getLogger(__name__)

_ZEROS = bytes(1 << 20)
# Chunks smaller than this are hashed and compressed in the walking thread.
_INLINE = 64 << 10
# Entries of the previous index read (and their chunks looked up) at a time.
_AHEAD = 512
# Entries waiting behind an unfinished one before the window is drained.
_MAX_WAITING_ENTRIES = 10_000


@dataclass(frozen=True)
class BuildSettings:
    """How blobs are made: zstd `level`, age `recipients` (none: not encrypted), the
    chunk-id `key` (with encryption), the target `pack_size` and the worker `threads`."""

    level: int
    recipients: tuple[Any, ...]
    key: bytes | None
    pack_size: int
    threads: int


@dataclass
class BuildResult:
    """What `build` wrote and what the generation references. `packs`: every pack holding a
    chunk of the index, id → size; `new_packs`: those this build wrote into the handover
    (without their blob lists, which the handover's dedup cache holds: memory stays flat in
    the number of files)."""

    entries: int = 0
    logical_size: int = 0
    chunk_count: int = 0
    packs: dict[str, int] = field(default_factory=dict)
    new_packs: list[PackInfo] = field(default_factory=list)
    files_read: int = 0
    bytes_read: int = 0
    files_reused: int = 0
    skipped: int = 0

    @property
    def added_size(self) -> int:
        return sum(p.size for p in self.new_packs)


class Dedup:
    """Where a chunk is held for every store of the site: in a pack of the handover, or in
    one pack that all `stores` hold. Pack presence is remembered for the run."""

    def __init__(self, handover: DedupCache, stores: Sequence[DedupCache]) -> None:
        self.handover = handover
        self.stores = tuple(stores)
        self._sizes: dict[tuple[int, str], int | None] = {}
        self._known: dict[bytes, tuple[str, int]] = {}

    def prefetch(self, chunk_ids: Sequence[bytes]) -> None:
        """Look up `chunk_ids` (the chunks of the next previous entries) in one query per
        cache, replacing what an earlier call found: the unchanged files among them are
        then reused without a query per chunk. A chunk not found here is asked again."""
        self._known = {}
        own = self.handover.packs_of(chunk_ids)
        held = [cache.packs_of(chunk_ids) for cache in self.stores]
        for cid in chunk_ids:
            found = self._decide(own.get(cid), [h.get(cid) for h in held])
            if found is not None:
                self._known[cid] = found

    def _size(self, which: int, cache: DedupCache, pack_id: str) -> int | None:
        key = (which, pack_id)
        if key not in self._sizes:
            self._sizes[key] = cache.pack_size(pack_id)
        return self._sizes[key]

    def pack_for(self, chunk_id: bytes) -> tuple[str, int] | None:
        """Return (pack id, size) of a pack every store has or will receive holding
        `chunk_id`, or None if the chunk must be stored again."""
        known = self._known.get(chunk_id)
        if known is not None:
            return known
        own = self.handover.pack_of(chunk_id)
        if own is not None and self._size(-1, self.handover, own) is not None:
            return self._decide(own, [])
        # A store whose cache lacks the chunk holds no pack with it: one query decides a miss.
        candidates: list[str | None] = []
        for cache in self.stores:
            candidates.append(cache.pack_of(chunk_id))
            if candidates[-1] is None:
                return None
        return self._decide(None, candidates)

    def _decide(self, own: str | None, candidates: Sequence[str | None]) -> tuple[str, int] | None:
        """Given the pack of the handover (`own`) and of each store (`candidates`) holding
        a chunk, the one to reference, or None."""
        if own is not None:
            size = self._size(-1, self.handover, own)
            if size is not None:
                return own, size
        if not candidates or any(c is None for c in candidates):
            return None
        for pack_id in dict.fromkeys(c for c in candidates if c is not None):
            sizes = [self._size(j, other, pack_id) for j, other in enumerate(self.stores)]
            if all(s is not None for s in sizes):
                return pack_id, int(sizes[0] or 0)
        return None


Skip = Callable[[bytes, os.stat_result], bool]


def walk(
    root: Path, members: Sequence[str], skip: Skip | None = None
) -> Iterator[tuple[bytes, os.stat_result]]:
    """Yield (path relative to `root` as bytes, lstat) of every object at and below the
    `members` (paths relative to `root`), in the index order, with an explicit stack (any
    depth); an object below a member for which `skip(path, lstat)` is true (an exclude) is
    left out, and so is all below it. A member inside another member is walked once. Raise
    FileNotFoundError if a member is missing."""
    base = os.fsencode(root)
    done: list[bytes] = []
    for member in sorted((os.fsencode(m) for m in members), key=index.sort_key):
        if any(member.startswith(d + b"/") for d in done):
            continue
        done.append(member)
        st = os.lstat(base + b"/" + member)
        yield member, st
        if not stat.S_ISDIR(st.st_mode):
            continue
        stack = [iter(_sorted_names(base + b"/" + member))]
        prefixes = [member]
        while stack:
            name = next(stack[-1], None)
            if name is None:
                stack.pop()
                prefixes.pop()
                continue
            path = prefixes[-1] + b"/" + name
            st = os.lstat(base + b"/" + path)
            if skip is not None and skip(path, st):
                continue
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(iter(_sorted_names(base + b"/" + path)))
                prefixes.append(path)


def _sorted_names(directory: bytes) -> list[bytes]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries)


class _Parent:
    """The previous generation's index, read as a stream beside the walk, `_AHEAD` entries
    at a time: `prefetch` is given the chunk ids of each batch."""

    def __init__(
        self,
        entries: Iterator[Entry] | None,
        prefetch: Callable[[Sequence[bytes]], None] = lambda ids: None,
    ) -> None:
        self._entries = entries
        self._prefetch = prefetch
        self._ahead: deque[Entry] = deque()
        self._next: Entry | None = None
        self._advance()

    def _read_ahead(self) -> None:
        assert self._entries is not None
        try:
            while len(self._ahead) < _AHEAD:
                entry = next(self._entries, None)
                if entry is None:
                    self._entries = None
                    break
                self._ahead.append(entry)
        except (index.InvalidIndex, OSError, ValueError) as exc:
            logger.warning(
                "the previous index does not read further (%s); the files after "
                "this point are read again",
                exc,
            )
            self._entries = None
        self._prefetch(
            [bytes.fromhex(c[0]) for e in self._ahead if e.type == "file" for c in e.chunks]
        )

    def _advance(self) -> None:
        if not self._ahead and self._entries is not None:
            self._read_ahead()
        self._next = self._ahead.popleft() if self._ahead else None

    def find(self, path: bytes) -> Entry | None:
        key = index.sort_key(path)
        while self._next is not None and index.sort_key(self._next.path) < key:
            self._advance()
        if self._next is not None and self._next.path == path:
            found = self._next
            self._advance()
            return found
        return None


class _Done:
    """The result of work done at once, read as a Future's."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def result(self) -> bytes:
        return self._value


_Result = Future[bytes] | _Done


class _Waiting:
    """An index entry waiting for the ids of its chunks."""

    __slots__ = ("entry", "line", "read", "waiting")

    def __init__(self, entry: Entry, read: bool, line: bytes = b"") -> None:
        self.entry = entry
        self.waiting = 0
        self.read = read
        self.line = line  # the index line of `entry`, when known


def _entry(path: bytes, st: os.stat_result, kind: str) -> Entry:
    """The entry of `path`: `mode` holds the permission bits with setuid, setgid and sticky
    (the type is `kind`)."""
    return Entry(
        path,
        kind,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns,
        st.st_dev,
        st.st_ino,
        st.st_ctime_ns,
    )


def _unchanged(previous: Entry | None, st: os.stat_result) -> bool:
    return (
        previous is not None
        and previous.type == "file"
        and (previous.size, previous.mtime_ns, previous.ino, previous.ctime_ns)
        == (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    )


class Builder:
    """One build: chunks, blobs and packs into `packs_dir` (temporary files in `temp_dir`),
    the index into `index_path` (plaintext zstd). Use `build`."""

    def __init__(
        self,
        settings: BuildSettings,
        dedup: Dedup,
        packs_dir: Path,
        temp_dir: Path,
        index_path: Path,
    ) -> None:
        self.settings = settings
        self.dedup = dedup
        self.packs_dir = packs_dir
        self.temp_dir = temp_dir
        self.result = BuildResult()
        self._pool = ThreadPoolExecutor(max(1, settings.threads), "chunks")
        self._window = max(2, 2 * settings.threads + 2)
        self._ids: deque[tuple[_Waiting, int, int, bytes, _Result]] = deque()
        self._blobs: deque[tuple[bytes, int, _Result]] = deque()
        self._out: deque[_Waiting] = deque()
        self._stored: set[bytes] = set()  # chunk ids being written, not yet in a closed pack
        self._pack: PackWriter | None = None
        self._pack_ids: list[bytes] = []
        self._index = index.IndexWriter(index_path, settings.level)
        self._links: dict[tuple[int, int], bytes] = {}

    # -- the walk

    def run(
        self,
        root: Path,
        members: Sequence[str],
        parent: Iterator[Entry] | None,
        skip: Skip | None = None,
    ) -> None:
        previous = _Parent(parent, self.dedup.prefetch)
        base = os.fsencode(root)
        for path, st in walk(root, members, skip):
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                self._emit(_Waiting(_entry(path, st, "dir"), True))
            elif stat.S_ISLNK(mode):
                entry = _entry(path, st, "symlink")
                entry.target = os.readlink(base + b"/" + path)
                self._emit(_Waiting(entry, True))
            elif stat.S_ISFIFO(mode):
                self._emit(_Waiting(_entry(path, st, "fifo"), True))
            elif stat.S_ISREG(mode):
                self._file(base, path, st, previous.find(path))
            else:
                logger.warning(
                    "skipping %s: a device node or socket is not backed up", os.fsdecode(path)
                )
                self.result.skipped += 1

    def _file(self, base: bytes, path: bytes, st: os.stat_result, previous: Entry | None) -> None:
        if st.st_nlink > 1:
            first = self._links.setdefault((st.st_dev, st.st_ino), path)
            if first != path:
                entry = _entry(path, st, "hardlink")
                entry.link = first
                self._emit(_Waiting(entry, True))
                return
        entry = _entry(path, st, "file")
        entry.size = st.st_size
        self.result.logical_size += st.st_size
        if previous is not None and _unchanged(previous, st) and self._reuse(previous):
            entry.sha256, entry.chunks = previous.sha256, previous.chunks
            self.result.chunk_count += len(entry.chunks)
            self.result.files_reused += 1
            # The same entry again (the usual case): its previous line, not encoded anew.
            self._emit(_Waiting(entry, True, previous.line if entry == previous else b""))
            return
        waiting = _Waiting(entry, False)
        self._emit(waiting)
        self._read(base + b"/" + path, waiting, st.st_blocks * 512 >= st.st_size)

    def _reuse(self, previous: Entry) -> bool:
        """Whether every chunk of `previous` is held where this generation goes; records
        their packs if so."""
        found = []
        for cid, _, _ in previous.chunks:
            held = self.dedup.pack_for(bytes.fromhex(cid))
            if held is None:
                return False
            found.append(held)
        self.result.packs.update(found)
        return True

    def _read(self, path: bytes, waiting: _Waiting, dense: bool) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            size = waiting.entry.size
            digest = hashlib.sha256()
            position = 0
            for offset, data in chunker.chunks(fd, size, dense):
                _hash_zeros(digest, offset - position)
                digest.update(data)
                position = offset + len(data)
                self.result.bytes_read += len(data)
                waiting.waiting += 1
                self._ids.append(
                    (
                        waiting,
                        offset,
                        len(data),
                        data,
                        self._work(ids.chunk_id, data, self.settings.key),
                    )
                )
                while len(self._ids) > self._window:
                    self._settle_id()
            _hash_zeros(digest, size - position)
        finally:
            os.close(fd)
        waiting.entry.sha256 = digest.hexdigest()
        waiting.read = True
        self.result.files_read += 1
        self._flush()

    # -- the pipeline: ids, then blobs, then packs; entries out in order

    def _work(self, function: Callable[..., bytes], data: bytes, *args: Any) -> _Result:
        """Run `function(data, *args)` in a worker thread, or at once for a small chunk (a
        thread's hand-off would cost more than the work)."""
        if len(data) < _INLINE:
            return _Done(function(data, *args))
        return self._pool.submit(function, data, *args)

    def _emit(self, waiting: _Waiting) -> None:
        self._out.append(waiting)
        if len(self._out) > _MAX_WAITING_ENTRIES:
            while self._ids:
                self._settle_id()
        self._flush()

    def _settle_id(self) -> None:
        waiting, offset, length, data, future = self._ids.popleft()
        cid = future.result()
        waiting.entry.chunks.append((cid.hex(), offset, length))
        self.result.chunk_count += 1
        if cid not in self._stored:
            held = self.dedup.pack_for(cid)
            if held is not None:
                self.result.packs[held[0]] = held[1]
            else:
                self._stored.add(cid)
                self._blobs.append(
                    (
                        cid,
                        length,
                        self._work(
                            blob.encode, data, self.settings.level, self.settings.recipients
                        ),
                    )
                )
                while len(self._blobs) > self._window:
                    self._settle_blob()
        waiting.waiting -= 1
        self._flush()

    def _settle_blob(self) -> None:
        cid, raw_length, future = self._blobs.popleft()
        data = future.result()
        if self._pack is not None and not self._pack.fits(len(data)):
            self._close_pack()
        if self._pack is None:
            self._pack = PackWriter(self.packs_dir, self.temp_dir, self.settings.pack_size)
        self._pack.add(cid, data, raw_length)

    def _close_pack(self) -> None:
        assert self._pack is not None
        info = self._pack.close()
        self._pack = None
        self.dedup.handover.add_pack(info.pack_id, info.size, info.blobs)
        # From now on the handover's cache knows them: memory stays at one pack's blobs.
        self._stored.difference_update(b.chunk_id for b in info.blobs)
        self.result.new_packs.append(dataclasses.replace(info, blobs=()))
        self.result.packs[info.pack_id] = info.size
        logger.debug("pack %s: %d blobs, %d bytes", info.pack_id, len(info.blobs), info.size)

    def _flush(self) -> None:
        while self._out and self._out[0].read and self._out[0].waiting == 0:
            done = self._out.popleft()
            self._index.write(done.entry, done.line)
            self.result.entries += 1

    def finish(self) -> BuildResult:
        """Settle everything in flight, close the last pack and the index."""
        while self._ids:
            self._settle_id()
        while self._blobs:
            self._settle_blob()
        if self._pack is not None and len(self._pack):
            self._close_pack()
        self._flush()
        assert not self._out
        self._index.close()
        self._pool.shutdown()
        return self.result

    def abort(self) -> None:
        """Stop after a failure: pending work is dropped, the open pack and the index file
        removed (closed packs stay in the handover, unreferenced)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._pack is not None:
            self._pack.abort()
        self._index.abort()


def _hash_zeros(digest: Any, count: int) -> None:
    """A hole reads as zeros: hash `count` of them."""
    zeros = memoryview(_ZEROS)
    while count > 0:
        step = min(count, len(zeros))
        digest.update(zeros[:step])
        count -= step


def build(
    root: Path,
    members: Sequence[str],
    parent: Iterator[Entry] | None,
    settings: BuildSettings,
    dedup: Dedup,
    packs_dir: Path,
    temp_dir: Path,
    index_path: Path,
    skip: Skip | None = None,
) -> BuildResult:
    """Build the chunked generation of `members` (paths relative to the mirror `root`),
    leaving out what `skip` excludes (see `walk`):
    new packs into `packs_dir`, the plaintext index into `index_path`. `parent` is the
    previous generation's index (its entries), or None. Return what was written and what
    the generation references. Raise OSError if the mirror cannot be read (what this build
    wrote but the closed packs is removed)."""
    builder = Builder(settings, dedup, packs_dir, temp_dir, index_path)
    try:
        builder.run(root, members, parent, skip)
        return builder.finish()
    except BaseException:
        builder.abort()
        raise
