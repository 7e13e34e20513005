"""Placing chunks into staged files, for unpack: the on-disk plan of which chunk goes where,
the writer that puts each decoded chunk at every offset that needs it (hashing each file whose
chunks arrive in order, so it need not be read back), and the two ways of getting the chunks —
every listed pack streamed once (a whole restore), or only the needed blobs by ranged reads
(`--path`). Blobs are decoded in a few threads, small ones in line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from agent.chunks import content
from agent.chunks.index import Entry
from agent.chunks.reader import (
    READERS,
    ChunkMap,
    Generation,
    Location,
    ReadFailed,
    fetch_blobs,
    read_trailers,
    stream_packs,
)

logger = logging.getLogger(__name__)

_OPEN_FILES = 64
_INLINE = 64 << 10
_BATCH = 2000


class Plan:
    """The on-disk tables of an unpack: the staged files and the chunks each one needs (its
    `seq`-th chunk at `offset`), and in memory one byte per file: whether its content was
    hashed and found right as its chunks were written (CHECKED), or must be read back
    (RECHECK)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.execute(
            "CREATE TABLE files (no INTEGER PRIMARY KEY, path BLOB, size INTEGER, "
            "sha256 TEXT, chunks INTEGER)"
        )
        db.execute("CREATE TABLE needs (chunk_id BLOB, no INTEGER, offset INTEGER, seq INTEGER)")
        self._needs: list[tuple[bytes, int, int, int]] = []
        self._files: list[tuple[int, bytes, int, str, int]] = []
        self._written: list[tuple[bytes]] = []
        self.count = 0
        self.status = bytearray(1)

    def add_file(self, path: bytes, entry: Entry) -> None:
        self.count += 1
        self.status.append(PENDING)
        self._files.append((self.count, path, entry.size, entry.sha256, len(entry.chunks)))
        self._needs.extend(
            (bytes.fromhex(cid), self.count, offset, seq)
            for seq, (cid, offset, _) in enumerate(entry.chunks)
        )
        if len(self._needs) >= _BATCH or len(self._files) >= _BATCH:
            self.flush()
        if not entry.chunks:  # empty, or holes only
            digest = hashlib.sha256()
            content.hash_zeros(digest, entry.size)
            compare(digest, entry.size, entry.sha256, path)
            self.status[self.count] = CHECKED

    def flush(self) -> None:
        self.db.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?)", self._files)
        self.db.executemany("INSERT INTO needs VALUES (?, ?, ?, ?)", self._needs)
        self._files.clear()
        self._needs.clear()

    def finish(self) -> None:
        self.flush()
        self.db.execute("CREATE INDEX needs_by_chunk ON needs (chunk_id)")
        self.db.commit()

    def targets(self, chunk_id: bytes) -> list[tuple[int, int, int, bytes, int, str, int]]:
        """(file, offset, seq, and the file's path, size, sha256 and chunk count) of every
        place that may still need the chunk, in file order."""
        return self.db.execute(
            "SELECT n.no, n.offset, n.seq, f.path, f.size, f.sha256, "
            "f.chunks FROM needs n JOIN files f ON f.no = n.no WHERE "
            "n.chunk_id = ? ORDER BY n.no, n.seq",
            (chunk_id,),
        ).fetchall()

    def written(self, chunk_id: bytes) -> None:
        """The chunk is written everywhere it was needed (forgotten in batches: one written
        again meanwhile is only written twice)."""
        self._written.append((chunk_id,))
        if len(self._written) >= _BATCH:
            self.forget()

    def forget(self) -> None:
        self.db.executemany("DELETE FROM needs WHERE chunk_id = ?", self._written)
        self._written.clear()

    def unmet(self) -> tuple[bytes, bytes] | None:
        """A chunk still needed after the contents were written, and the file needing it."""
        self.forget()
        row = self.db.execute(
            "SELECT n.chunk_id, f.path FROM needs n JOIN files f ON f.no = n.no LIMIT 1"
        ).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))


PENDING, CHECKED, RECHECK = 0, 1, 2
# Files hashed as their chunks arrive in order, at most; others are read back at the end.
_HASHING = 4096


def compare(digest: Any, size: int, sha256: str, path: bytes) -> None:
    if digest.hexdigest() != sha256:
        raise ReadFailed(
            f"the generation is damaged: {os.fsdecode(path)!r} restored with "
            f"sha256 {digest.hexdigest()}; the index says {sha256} ({size} bytes)"
        )


class _Hashing:
    """One file being hashed as its chunks are written in order."""

    __slots__ = ("chunks", "digest", "next", "path", "position", "sha256", "size")

    def __init__(self, path: bytes, size: int, sha256: str, chunks: int) -> None:
        self.path, self.size, self.sha256, self.chunks = path, size, sha256, chunks
        self.digest = hashlib.sha256()
        self.next = 0
        self.position = 0


def _feed(state: _Hashing, gap: int, data: bytes, tail: int | None) -> None:
    """Hash the next chunk of a file (after the hole before it); after its last (`tail`: the
    hole after it), compare the file's sha256 with the index."""
    content.hash_zeros(state.digest, gap)
    state.digest.update(data)
    if tail is not None:
        content.hash_zeros(state.digest, tail)
        compare(state.digest, state.size, state.sha256, state.path)


class _Writer:
    """Writes decoded chunks into the staged files, keeping a few of them open, and hashes
    each file whose chunks arrive in order (the usual case for a whole restore), in a thread
    of its own: those need not be read back. Call `finish` after the last chunk, `close`
    in any case."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._open: OrderedDict[int, int] = OrderedDict()
        self._hashing: dict[int, _Hashing] = {}
        self._hasher = ThreadPoolExecutor(1, "file-sha256")
        self._fed: deque[Future[None]] = deque()

    def write(self, chunk_id: bytes, data: bytes) -> bool:
        """Write the chunk wherever it is still needed; return whether it was."""
        targets = self._plan.targets(chunk_id)
        for no, offset, seq, path, size, sha256, chunks in targets:
            os.pwrite(self._fd(no, path), data, offset)
            self._hash(no, offset, seq, data, (path, size, sha256, chunks))
        self._plan.written(chunk_id)
        return bool(targets)

    def _hash(
        self, no: int, offset: int, seq: int, data: bytes, file: tuple[bytes, int, str, int]
    ) -> None:
        status = self._plan.status
        if status[no] != PENDING:
            return
        state = self._hashing.get(no)
        if state is None:
            if seq != 0 or len(self._hashing) >= _HASHING:
                status[no] = RECHECK
                return
            state = self._hashing[no] = _Hashing(*file)
        if seq != state.next:
            status[no] = RECHECK
            del self._hashing[no]
            return
        gap = offset - state.position
        state.next += 1
        state.position = offset + len(data)
        last = state.next == state.chunks
        tail = state.size - state.position if last else None
        self._fed.append(self._hasher.submit(_feed, state, gap, data, tail))
        while len(self._fed) > 4 * READERS:  # a mismatch is raised here, and memory bounded
            self._fed.popleft().result()
        if last:
            status[no] = CHECKED
            del self._hashing[no]

    def _fd(self, no: int, path: bytes) -> int:
        fd = self._open.get(no)
        if fd is not None:
            self._open.move_to_end(no)
            return fd
        if len(self._open) >= _OPEN_FILES:
            os.close(self._open.popitem(last=False)[1])
        fd = self._open[no] = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        return fd

    def finish(self) -> None:
        """Wait for the hashing; raise ReadFailed if a file's content differs."""
        while self._fed:
            self._fed.popleft().result()

    def close(self) -> None:
        self._hasher.shutdown(cancel_futures=True)
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def _decoded(
    items: Iterator[tuple[bytes, int, bytes | memoryview, str]], identities: Sequence[object]
) -> Iterator[tuple[bytes, bytes]]:
    """Decode (chunk id, raw length, stored blob, pack id) items in a few threads; yield
    (chunk id, chunk) in order. Raise ReadFailed naming the pack of a blob that does not
    decode."""

    def decode(item: tuple[bytes, int, bytes | memoryview, str]) -> tuple[bytes, bytes]:
        chunk_id, raw, data, pack_id = item
        return chunk_id, content.decode(data, raw, identities, f"a blob of pack {pack_id}")

    with ThreadPoolExecutor(2) as pool:
        pending: deque[Future[tuple[bytes, bytes]]] = deque()
        try:
            for item in items:
                if len(item[2]) < _INLINE:  # a thread costs more than decoding it here
                    done: Future[tuple[bytes, bytes]] = Future()
                    done.set_result(decode(item))
                    pending.append(done)
                else:
                    pending.append(pool.submit(decode, item))
                if len(pending) > READERS:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def fill_whole(opened: Generation, plan: Plan) -> tuple[int, int]:
    """Stream every listed pack once and write each needed blob where it is needed. Return
    (packs read, blobs written). Raise ReadFailed if a pack or blob is damaged or a file's
    content differs from the index."""
    packs = blobs = 0

    def needed() -> Iterator[tuple[bytes, int, bytes | memoryview, str]]:
        nonlocal packs
        seen = ""
        for ref, entry, data in stream_packs(opened.store, opened.manifest.packs):
            if ref.id != seen:
                seen = ref.id
                packs += 1
            if plan.targets(entry.chunk_id):
                yield entry.chunk_id, entry.raw_length, data, ref.id

    writer = _Writer(plan)
    try:
        for chunk_id, data in _decoded(needed(), opened.identities):
            # a chunk held twice (in two packs) and decoded twice is written once
            blobs += writer.write(chunk_id, data)
        writer.finish()
    finally:
        writer.close()
    return packs, blobs


def fill_part(opened: Generation, plan: Plan) -> tuple[int, int]:
    """Read only the blobs the staged files need, found through the packs' trailers, and
    write them. Return (packs read from, blobs written); raise as fill_whole."""
    mapped = ChunkMap(opened.workdir / "trailers.sqlite")
    try:
        for ref, blobs in read_trailers(opened.store, opened.manifest.packs):
            mapped.add(ref.id, blobs)
        mapped.db.commit()
        mapped.db.execute("ATTACH DATABASE ? AS plan", (str(opened.workdir / "plan.sqlite"),))
        rows = mapped.db.execute(
            "SELECT DISTINCT n.chunk_id, b.pack_id, b.offset, b.stored, "
            "b.raw FROM plan.needs n JOIN blobs b USING (chunk_id) "
            "ORDER BY b.pack_id, b.offset"
        ).fetchall()
    finally:
        mapped.close()
    locations = {bytes(r[0]): Location(r[1], r[2], r[3], r[4]) for r in rows}
    by_location = {(loc.pack_id, loc.offset): cid for cid, loc in locations.items()}
    writer = _Writer(plan)
    try:
        items = (
            (by_location[(loc.pack_id, loc.offset)], loc.raw_length, data, loc.pack_id)
            for loc, data in fetch_blobs(opened.store, locations.values())
        )
        for chunk_id, data in _decoded(items, opened.identities):
            writer.write(chunk_id, data)
        writer.finish()
    finally:
        writer.close()
    return len({loc.pack_id for loc in locations.values()}), len(locations)
