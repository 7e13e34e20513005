"""The dedup cache of one store, on the source: which blobs the store holds, in which pack.

SQLite under the role's `.state/` (bounded memory whatever the store's size):
`packs(pack_id PRIMARY KEY, size)`, `blobs(chunk_id PRIMARY KEY, pack_id)`. It is never
trusted alone: `sync` brings it up to date from a listing of the store's packs at the start
of every build (a pack that is gone is dropped with its blobs, a pack it does not know has its
trailer read), condemned packs are left out, and before a manifest is written to a store every
pack it lists is checked there again. A cache that is deleted is rebuilt by the next `sync`;
a stale one costs an upload, never a broken generation.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from agent.chunks import pack
from agent.chunks.pack import BlobEntry

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (pack_id TEXT PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (chunk_id BLOB PRIMARY KEY, pack_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pack_id);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_BATCH = 1000


def path_for(state_dir: Path, url: str) -> Path:
    """The cache file of the store at `url`, below `state_dir`."""
    return state_dir / f"cache-{hashlib.sha256(url.encode()).hexdigest()[:16]}.sqlite"


class DedupCache:
    """The dedup cache of the store at `url`, in the SQLite file `path` (made when missing;
    a damaged file is replaced by an empty one, which the next `sync` fills again)."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.url = url
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            logger.warning(
                "the dedup cache %s of %s is damaged (%s); rebuilding it from the store",
                path,
                url,
                exc,
            )
            path.unlink(missing_ok=True)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE name = 'url'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('url', ?)", (self.url,))
        return db

    def close(self) -> None:
        self._db.close()

    # -- questions

    def pack_of(self, chunk_id: bytes) -> str | None:
        row = self._db.execute(
            "SELECT pack_id FROM blobs WHERE chunk_id = ?", (chunk_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def packs_of(self, chunk_ids: Sequence[bytes]) -> dict[bytes, str]:
        """The pack of each of `chunk_ids` the store holds (those it lacks are left out), in
        one query per _BATCH ids."""
        found: dict[bytes, str] = {}
        for start in range(0, len(chunk_ids), _BATCH):
            batch = chunk_ids[start : start + _BATCH]
            marks = ",".join("?" * len(batch))
            found.update(
                (bytes(cid), str(pack_id))
                for cid, pack_id in self._db.execute(
                    f"SELECT chunk_id, pack_id FROM blobs WHERE chunk_id IN ({marks})", batch
                )
            )
        return found

    def pack_size(self, pack_id: str) -> int | None:
        row = self._db.execute("SELECT size FROM packs WHERE pack_id = ?", (pack_id,)).fetchone()
        return None if row is None else int(row[0])

    def pack_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM packs").fetchone()[0])

    def total_size(self) -> int:
        return int(self._db.execute("SELECT coalesce(sum(size), 0) FROM packs").fetchone()[0])

    # -- changes

    def add_pack(self, pack_id: str, size: int, blobs: Iterable[BlobEntry]) -> None:
        """Record that the store holds pack `pack_id` of `size` bytes with `blobs`. A chunk
        already recorded in another pack keeps that one."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO packs VALUES (?, ?)", (pack_id, size))
            self._db.executemany(
                "INSERT OR IGNORE INTO blobs VALUES (?, ?)", ((b.chunk_id, pack_id) for b in blobs)
            )

    def drop_pack(self, pack_id: str) -> None:
        """Forget pack `pack_id` and its blobs (gone from the store, or condemned)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM packs WHERE pack_id = ?", (pack_id,))
            self._db.execute("DELETE FROM blobs WHERE pack_id = ?", (pack_id,))

    def sync(
        self,
        listing: Iterable[tuple[str, int]],
        read_trailer: Callable[[str, int], tuple[BlobEntry, ...]],
        condemned: Iterable[str] = (),
    ) -> tuple[int, int]:
        """Bring the cache up to date with `listing`, the store's (pack id, size) pairs:
        forget the packs that are gone, changed size or are `condemned`; add the others it
        does not know by `read_trailer(pack id, size)`. A pack whose trailer does not read is
        logged and left out (it will not be deduplicated against). Return (packs added, packs
        dropped)."""
        db = self._db
        db.execute("DROP TABLE IF EXISTS temp.listed")
        db.execute("CREATE TEMP TABLE listed (pack_id TEXT PRIMARY KEY, size INTEGER)")
        batch: list[tuple[str, int]] = []
        for item in listing:
            batch.append(item)
            if len(batch) >= _BATCH:
                db.executemany("INSERT OR REPLACE INTO temp.listed VALUES (?, ?)", batch)
                batch = []
        db.executemany("INSERT OR REPLACE INTO temp.listed VALUES (?, ?)", batch)
        db.executemany("DELETE FROM temp.listed WHERE pack_id = ?", ((c,) for c in condemned))
        gone = [
            row[0]
            for row in db.execute(
                "SELECT p.pack_id FROM packs p LEFT JOIN temp.listed l ON l.pack_id = p.pack_id "
                "WHERE l.pack_id IS NULL OR l.size != p.size"
            )
        ]
        for pack_id in gone:
            self.drop_pack(pack_id)
        new = db.execute(
            "SELECT l.pack_id, l.size FROM temp.listed l LEFT JOIN packs p "
            "ON p.pack_id = l.pack_id WHERE p.pack_id IS NULL"
        ).fetchall()
        added = 0
        for pack_id, size in new:
            try:
                blobs = read_trailer(pack_id, size)
            except (pack.PackError, OSError) as exc:
                logger.warning(
                    "pack %s in %s does not read (%s); not deduplicating against it",
                    pack_id,
                    self.url,
                    exc,
                )
                continue
            self.add_pack(pack_id, size, blobs)
            added += 1
        db.execute("DROP TABLE temp.listed")
        if added or gone:
            logger.info(
                "dedup cache of %s: %d pack(s) read from the store, %d forgotten",
                self.url,
                added,
                len(gone),
            )
        return added, len(gone)
