"""Repacking: copy the live blobs of mostly dead packs into new packs, no key needed.

`Usage` is an on-disk map (SQLite) of what generations use: the chunk ids of each index (keyed
by the stored index's sha256, so an index is read once in its life, or told by the builder
that wrote it, which is how the packs of encrypted generations are repacked on a source that
holds only the recipients' public keys) and the trailer of each pack (keyed by the pack id).
Both are content-addressed, so one map serves every store of the agent and never goes stale;
what no store has listed for `FORGET_AFTER_DAYS` is dropped. Memory stays flat in the number
of chunks, packs and generations.

`copy_live_blobs` reads each pack to repack whole into a scratch file, checks its sha256
against its id (a damaged pack is left alone, and said so), and appends the blobs a generation
listing that pack needs to new packs (`PackWriter`), which go into the store verified. What
the manifests then list is `new_listing`; rewriting them and condemning the old packs is
`prune`'s part.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.chunks import ids, index, pack
from agent.chunks.pack import BlobEntry, PackInfo, PackWriter
from agent.core.manifest import Manifest
from agent.stores import StoreError

logger = logging.getLogger(__name__)

FORGET_AFTER_DAYS = 60
_TRAILERS_PER_TRANSACTION = 200
_SCHEMA = """
CREATE TABLE IF NOT EXISTS uses (index_sha TEXT, chunk BLOB, PRIMARY KEY (index_sha, chunk))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uses_read (index_sha TEXT PRIMARY KEY, seen REAL);
CREATE TABLE IF NOT EXISTS trailer (pack TEXT, offset INTEGER, chunk BLOB, stored INTEGER,
    raw INTEGER, PRIMARY KEY (pack, offset)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS trailer_chunk ON trailer (chunk);
CREATE TABLE IF NOT EXISTS trailer_read (pack TEXT PRIMARY KEY, size INTEGER, seen REAL);
CREATE TEMP TABLE listed (gen TEXT, index_sha TEXT, pack TEXT, PRIMARY KEY (gen, pack));
CREATE INDEX temp.listed_pack ON listed (pack);
CREATE TEMP TABLE repacked (pack TEXT PRIMARY KEY);
CREATE TEMP TABLE new_blobs (chunk BLOB PRIMARY KEY, pack TEXT);
"""


class Usage:
    """What generations use, on disk at `path` (a cache: removing the file costs one read of
    every index and trailer, and the repacking of encrypted generations until their builder
    tells them again). A file that is not a database is replaced."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._open(path)
        except sqlite3.DatabaseError as exc:
            logger.warning(
                "the garbage collection cache %s is unreadable (%s); starting it again", path, exc
            )
            path.unlink(missing_ok=True)
            self.db = self._open(path)
        self.unreadable: set[str] = set()

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path)
        # A cache: a transaction may be lost with the machine, never half applied.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    def close(self) -> None:
        self.db.close()

    def list_generation(self, gen: str, index_sha: str, packs: Iterable[str]) -> None:
        """Record that complete generation `gen`, whose index has `index_sha`, lists `packs`."""
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO listed VALUES (?, ?, ?)",
                ((gen, index_sha, p) for p in packs),
            )

    def knows_index(self, index_sha: str) -> bool:
        return self._has("uses_read", "index_sha", index_sha)

    def record_index(self, index_sha: str, chunk_ids: Iterable[bytes]) -> None:
        """Record the chunk ids an index uses, in one transaction: a run killed halfway
        leaves the index unknown, to be read again."""
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO uses VALUES (?, ?)", ((index_sha, c) for c in chunk_ids)
            )
            self.db.execute(
                "INSERT OR REPLACE INTO uses_read VALUES (?, ?)", (index_sha, time.time())
            )

    def mark_unreadable(self, gen: str) -> None:
        """The index of `gen` cannot be read here (encrypted, no identity): what its packs
        hold is unknown, so none of them is repacked."""
        self.unreadable.add(gen)

    def knows_trailer(self, pack_id: str) -> bool:
        return self._has("trailer_read", "pack", pack_id)

    def record_trailers(self, trailers: Iterable[tuple[str, int, Sequence[BlobEntry]]]) -> None:
        """Record the (pack id, size, blobs) given, in one transaction."""
        with self.db:
            for pack_id, size, blobs in trailers:
                self.db.executemany(
                    "INSERT OR IGNORE INTO trailer VALUES (?, ?, ?, ?, ?)",
                    ((pack_id, b.offset, b.chunk_id, b.stored_length, b.raw_length) for b in blobs),
                )
                self.db.execute(
                    "INSERT OR REPLACE INTO trailer_read VALUES (?, ?, ?)",
                    (pack_id, size, time.time()),
                )

    def _has(self, table: str, column: str, value: str) -> bool:
        row = self.db.execute(f"SELECT 1 FROM {table} WHERE {column} = ?", (value,)).fetchone()
        return row is not None

    def live_bytes(self) -> dict[str, int]:
        """Per listed pack whose trailer is known and whose every listing generation's index
        was read: the stored bytes of its blobs that a generation listing it uses."""
        rows = self.db.execute("""
            SELECT t.pack, SUM(CASE WHEN EXISTS (
                SELECT 1 FROM listed l JOIN uses u ON u.index_sha = l.index_sha
                WHERE l.pack = t.pack AND u.chunk = t.chunk) THEN t.stored ELSE 0 END)
            FROM trailer t WHERE t.pack IN (SELECT pack FROM listed) GROUP BY t.pack""")
        live = {p: int(b) for p, b in rows}
        for (p,) in self.db.execute(
            "SELECT pack FROM trailer_read WHERE pack IN "
            "(SELECT pack FROM listed) AND pack NOT IN "
            "(SELECT DISTINCT pack FROM trailer)"
        ):
            live[p] = 0  # a pack without blobs
        for gen in self.unreadable:
            for (p,) in self.db.execute("SELECT pack FROM listed WHERE gen = ?", (gen,)):
                live.pop(p, None)
        return live

    def needed(self, pack_id: str) -> set[bytes]:
        """The chunk ids of `pack_id` that a generation listing it uses."""
        return {
            c
            for (c,) in self.db.execute(
                """
            SELECT DISTINCT t.chunk FROM trailer t JOIN listed l ON l.pack = t.pack
            JOIN uses u ON u.index_sha = l.index_sha AND u.chunk = t.chunk
            WHERE t.pack = ?""",
                (pack_id,),
            )
        }

    def forget_unseen(self, index_shas: Iterable[str], packs: Iterable[str]) -> None:
        """Mark the indexes and packs given as seen now, and drop what was not seen for
        FORGET_AFTER_DAYS (by any store)."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "UPDATE uses_read SET seen = ? WHERE index_sha = ?", ((now, i) for i in index_shas)
            )
            self.db.executemany(
                "UPDATE trailer_read SET seen = ? WHERE pack = ?", ((now, p) for p in packs)
            )
            limit = now - FORGET_AFTER_DAYS * 86400
            self.db.execute(
                "DELETE FROM uses WHERE index_sha IN "
                "(SELECT index_sha FROM uses_read WHERE seen < ?)",
                (limit,),
            )
            self.db.execute("DELETE FROM uses_read WHERE seen < ?", (limit,))
            self.db.execute(
                "DELETE FROM trailer WHERE pack IN (SELECT pack FROM trailer_read WHERE seen < ?)",
                (limit,),
            )
            self.db.execute("DELETE FROM trailer_read WHERE seen < ?", (limit,))

    # -- after copying

    def record_copy(self, repacked: Iterable[str], new: Iterable[PackInfo]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO repacked VALUES (?)", ((p,) for p in repacked)
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO new_blobs VALUES (?, ?)",
                ((b.chunk_id, info.pack_id) for info in new for b in info.blobs),
            )

    def new_listing(self, gen: str) -> tuple[list[str], list[str]]:
        """For generation `gen`: (the repacked packs it lists, the new packs holding the
        chunks it used from them). Raise RepackError if one of those chunks is in no new
        pack (then its manifest must not change)."""
        old = [
            p
            for (p,) in self.db.execute(
                "SELECT pack FROM listed WHERE gen = ? AND pack IN (SELECT pack FROM repacked) "
                "ORDER BY pack",
                (gen,),
            )
        ]
        if not old:
            return [], []
        wanted = """FROM listed l JOIN trailer t ON t.pack = l.pack
            JOIN uses u ON u.index_sha = l.index_sha AND u.chunk = t.chunk
            LEFT JOIN new_blobs n ON n.chunk = t.chunk
            WHERE l.gen = ? AND l.pack IN (SELECT pack FROM repacked)"""
        lost = self.db.execute(f"SELECT COUNT(*) {wanted} AND n.pack IS NULL", (gen,)).fetchone()
        if lost[0]:
            raise RepackError(
                f"{lost[0]} chunk(s) generation {gen} needs from the repacked "
                "packs are in no new pack; its manifest stays as it is"
            )
        new = [
            p
            for (p,) in self.db.execute(f"SELECT DISTINCT n.pack {wanted} ORDER BY n.pack", (gen,))
        ]
        return old, new


class IndexSource(Protocol):
    """What the analysis reads of a store: generations' files and packs' tails."""

    @property
    def url(self) -> str: ...

    def chunks(self, kind: str, gen: str, name: str) -> Iterable[bytes | memoryview]: ...

    def read_range(self, name: str, offset: int, length: int) -> bytes: ...


class _Stream(io.RawIOBase):
    """A readable stream over an iterable of byte blocks, hashing what passes."""

    def __init__(self, blocks: Iterable[bytes | memoryview]) -> None:
        self._blocks = iter(blocks)
        self._pending = memoryview(b"")
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            block = next(self._blocks, None)
            if block is None:
                return 0
            self.digest.update(block)
            self._pending = memoryview(block)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def _index_chunks(store: IndexSource, m: Manifest, identities: tuple[Any, ...]) -> Iterator[bytes]:
    entry = m.files[0]
    raw = _Stream(store.chunks(m.kind, m.generation, entry.path))
    for item in index.iter_entries(index.plaintext_stream(raw, identities)):
        for chunk_hex, _, _ in item.chunks:
            yield bytes.fromhex(chunk_hex)
    if raw.digest.hexdigest() != entry.sha256:
        raise index.InvalidIndex(
            f"the index of {m.generation} does not hash to its manifest's sha256"
        )


def analyse(
    store: IndexSource,
    manifests: Mapping[str, Manifest],
    held: Mapping[str, int],
    usage: Usage,
    identities: tuple[Any, ...],
) -> dict[str, int]:
    """Bring `usage` up to date with the store's complete chunked generations and the packs
    they list (reading only indexes and trailers it does not know yet); return the live bytes
    per pack where they are known (see Usage.live_bytes)."""
    for gen, m in manifests.items():
        if not m.chunked:
            continue
        index_sha = m.files[0].sha256
        usage.list_generation(gen, index_sha, [p.id for p in m.packs])
        if usage.knows_index(index_sha):
            continue
        if m.encrypted and not identities:
            usage.mark_unreadable(gen)
            continue
        try:
            usage.record_index(index_sha, _index_chunks(store, m, identities))
        except (index.InvalidIndex, StoreError, OSError, ValueError) as exc:
            logger.warning("cannot read the index of %s (%s); its packs are not repacked", gen, exc)
            usage.mark_unreadable(gen)
    read: list[tuple[str, int, Sequence[BlobEntry]]] = []
    for pack_id in sorted({p.id for m in manifests.values() for p in m.packs}):
        if pack_id not in held or usage.knows_trailer(pack_id):
            continue
        try:
            blobs = pack.read_trailer(
                functools.partial(store.read_range, ids.pack_key(pack_id)), held[pack_id]
            )
        except (pack.PackError, StoreError, OSError) as exc:
            logger.warning(
                "cannot read the trailer of pack %s (%s); it is not repacked", pack_id, exc
            )
            continue
        read.append((pack_id, held[pack_id], blobs))
        if len(read) >= _TRAILERS_PER_TRANSACTION:
            usage.record_trailers(read)
            read = []
    usage.record_trailers(read)
    usage.forget_unseen({m.files[0].sha256 for m in manifests.values() if m.chunked}, held)
    if usage.unreadable:
        logger.info(
            "%d generation(s) of %s are encrypted and no DECRYPT_IDENTITY is set here: "
            "the packs they list are not repacked",
            len(usage.unreadable),
            store.url,
        )
    return usage.live_bytes()


class RepackError(Exception):
    """A repack cannot go on safely; what was written so far is unreferenced."""


@dataclass
class Copied:
    """What `copy_live_blobs` did: the packs it repacked, the new packs (in the store,
    verified), and the packs it left alone because they are damaged."""

    repacked: list[str] = field(default_factory=list)
    new: list[PackInfo] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)


def _download(read: Iterable[bytes | memoryview], target: Path) -> str:
    digest = hashlib.sha256()
    with open(target, "wb") as handle:
        for data in read:
            digest.update(data)
            handle.write(data)
    return digest.hexdigest()


def copy_live_blobs(
    candidates: Sequence[str],
    usage: Usage,
    read_pack: Callable[[str], Iterable[bytes | memoryview]],
    put_pack: Callable[[PackInfo, Path], None],
    scratch: Path,
    target_size: int,
) -> Copied:
    """Copy the blobs of `candidates` that a generation listing them needs (see
    Usage.needed) into new packs of about `target_size` bytes, each put into the store by
    `put_pack(info, local path)` (which verifies it) as soon as it is closed. A chunk held by
    two candidates is copied once. Return what was done (see Copied)."""
    scratch.mkdir(parents=True, exist_ok=True)
    done = Copied()
    copied: set[bytes] = set()
    writer: PackWriter | None = None

    def finish(current: PackWriter) -> None:
        info = current.close()
        put_pack(info, scratch / "packs" / ids.pack_key(info.pack_id).split("/", 1)[1])
        (scratch / "packs" / ids.pack_key(info.pack_id).split("/", 1)[1]).unlink()
        done.new.append(info)

    try:
        for pack_id in candidates:
            local = scratch / "old.pack"
            if _download(read_pack(pack_id), local) != pack_id:
                logger.error(
                    "pack %s does not hash to its id: left alone, not repacked (run "
                    "`backup-agent verify --all`)",
                    pack_id,
                )
                done.damaged.append(pack_id)
                continue
            needed = usage.needed(pack_id)
            blobs = pack.read_trailer(pack.file_range_reader(local), local.stat().st_size)
            with open(local, "rb") as handle:
                for entry, data in pack.iter_blobs(handle, blobs):
                    if entry.chunk_id not in needed or entry.chunk_id in copied:
                        continue
                    if writer is not None and not writer.fits(len(data)):
                        finish(writer)
                        writer = None
                    if writer is None:
                        writer = PackWriter(scratch / "packs", scratch / "tmp", target_size)
                    writer.add(entry.chunk_id, data, entry.raw_length)
                    copied.add(entry.chunk_id)
            done.repacked.append(pack_id)
        if writer is not None:
            current, writer = writer, None
            finish(current)
    finally:
        if writer is not None:
            writer.abort()
        (scratch / "old.pack").unlink(missing_ok=True)
    usage.record_copy(done.repacked, done.new)
    return done
