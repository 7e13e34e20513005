"""Reading a chunked generation back from a store (a local directory or S3).

    open: the manifest → the index file, its size and sha256 checked → decrypted with the
    identities when the generation is encrypted → its entries, streamed as often as needed;
    the chunk → (pack, offset, length) map from the listed packs' trailers, in SQLite on disk;
    blobs by ranged reads in order (`fetch_blobs`), or every pack streamed once front to back,
    its sha256 checked (`stream_packs`).

Everything a store gives is checked before it is used: a damaged or missing pack, an index
that is not the one the manifest names, a key that does not open the generation — each is one
`ReadFailed` line naming what is wrong. Memory stays flat: the index and the chunk map are on
disk, reads are bounded pieces with a bounded number in flight.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import shutil
import sqlite3
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.chunks import ids, index, pack
from agent.chunks.index import Entry
from agent.chunks.pack import BlobEntry, PackError
from agent.core import encryption
from agent.core.manifest import CHUNK_ID_KEY, Manifest, PackRef
from agent.stores import StoreError

logger = logging.getLogger(__name__)

# Reads in flight at once, and the most bytes one read asks for: about 16 MiB of buffers.
READERS = 4
PIECE = 4 << 20
# Blobs closer than this in one pack are read in one request, the gap thrown away.
_GAP = 256 << 10
_INSERT_BATCH = 2000


class ReadFailed(Exception):
    """The generation cannot be read as its manifest says: the message names what is wrong
    (a missing or damaged pack, an index that differs, a key that does not open it)."""


class NeedsKey(ReadFailed):
    """The generation is encrypted and no identity was given."""


class Objects(Protocol):
    """What reading a chunked generation needs of a store (LocalStore, S3Store)."""

    @property
    def url(self) -> str: ...

    def chunks(self, kind: str, gen: str, name: str) -> Iterable[bytes | memoryview]: ...

    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]: ...


@dataclass(frozen=True)
class Location:
    """Where a chunk's blob lies: pack, offset and stored length, and the chunk's length."""

    pack_id: str
    offset: int
    stored_length: int
    raw_length: int


class Generation:
    """An opened chunked generation: its manifest, its decrypted index on local disk (in
    `workdir`, a private temporary directory removed by `close`) and the identities to decode
    its blobs. Use as a context manager."""

    def __init__(self, store: Objects, manifest: Manifest, identities: Sequence[Any]) -> None:
        self.store = store
        self.manifest = manifest
        self.identities = tuple(identities) if manifest.encrypted else ()
        self.workdir = Path(tempfile.mkdtemp(prefix="backup-agent-read-"))
        self.index_path = self.workdir / "index.zst"

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def entries(self, containing: Sequence[bytes] = ()) -> Iterator[Entry]:
        """Yield the index's entries in index order (each call reads it again); with
        `containing`, only (at least) those whose lines hold one of these byte strings (see
        index.iter_entries). Raise ReadFailed if an entry is malformed or unsafe."""
        try:
            yield from index.read_entries(self.index_path, containing=containing)
        except index.InvalidIndex as exc:
            raise ReadFailed(f"the index of {self.manifest.generation} is invalid: {exc}") from None

    def chunk_key(self) -> bytes | None:
        """The key chunk ids were made with: None without encryption; with it, the
        generation's CHUNK-ID-KEY.age, its size and sha256 checked against the manifest,
        opened with the identities. Raise ReadFailed if it is missing, differs or does not
        open."""
        if not self.manifest.encrypted:
            return None
        gen = self.manifest.generation
        [entry] = [f for f in self.manifest.files if f.path == CHUNK_ID_KEY]
        try:
            stored = b"".join(self.store.chunks("data", gen, entry.path))
        except (FileNotFoundError, StoreError) as exc:
            raise ReadFailed(f"{entry.path} of {gen} cannot be read: {exc}") from None
        if (len(stored), hashlib.sha256(stored).hexdigest()) != (entry.size, entry.sha256):
            raise ReadFailed(f"{entry.path} of {gen} differs from its manifest")
        try:
            return ids.decrypt_key(stored, self.identities)
        except (encryption.DecryptionFailed, ValueError) as exc:
            raise ReadFailed(f"{entry.path} of {gen}: {exc}") from None


def open_generation(
    store: Objects, manifest: Manifest, identities: Sequence[Any] = ()
) -> Generation:
    """Fetch the index of the chunked generation `manifest` describes, check its size and
    sha256 against the manifest and decrypt it when encrypted. Return the opened generation
    (close it). Raise NeedsKey if it is encrypted and there are no `identities`, ReadFailed if
    the index is missing, differs from the manifest, or the identities do not open it (the
    message then says so: one line, naming DECRYPT_IDENTITY)."""
    if not manifest.chunked:
        raise ValueError(f"{manifest.generation} is not a chunked generation")
    if manifest.encrypted and not identities:
        raise NeedsKey(
            f"generation {manifest.generation} is encrypted; set "
            "DECRYPT_IDENTITY_FILE to the age identity or SSH private key of one of "
            "its recipients"
        )
    opened = Generation(store, manifest, identities)
    try:
        entry = manifest.files[0]
        stored = opened.workdir / entry.path
        digest = hashlib.sha256()
        size = 0
        try:
            with open(stored, "wb") as handle:
                for data in store.chunks("data", manifest.generation, entry.path):
                    digest.update(data)
                    size += len(data)
                    handle.write(data)
        except (FileNotFoundError, StoreError) as exc:
            raise ReadFailed(
                f"the index {entry.path} of {manifest.generation} cannot be read "
                f"from {store.url}: {exc}"
            ) from None
        if (size, digest.hexdigest()) != (entry.size, entry.sha256):
            raise ReadFailed(
                f"the index {entry.path} of {manifest.generation} in {store.url} "
                f"is damaged: {size} bytes with sha256 {digest.hexdigest()}; the "
                f"manifest says {entry.size} bytes, {entry.sha256}"
            )
        if opened.identities:
            try:
                with open(stored, "rb") as reading, open(opened.index_path, "wb") as writing:
                    encryption.decrypt(reading, writing, opened.identities)
            except encryption.DecryptionFailed as exc:
                raise ReadFailed(str(exc)) from None
            stored.unlink()
        else:
            stored.rename(opened.index_path)
    except BaseException:
        opened.close()
        raise
    return opened


# ---------------------------------------------------------------- packs and their trailers


def pack_name(pack_id: str) -> str:
    return ids.pack_key(pack_id)


def present_packs(store: Objects) -> dict[str, int]:
    """Return {pack id: size} of every pack the store holds (one listing of `packs/`)."""
    found: dict[str, int] = {}
    for name, size in store.list_objects(ids.PACKS_DIR + "/"):
        pack_id = ids.parse_pack_key(name)
        if pack_id is not None:
            found[pack_id] = size
    return found


def missing_packs(packs: Iterable[PackRef], present: dict[str, int]) -> list[str]:
    """Return a line for each of `packs` the store's listing `present` lacks or holds with
    another size."""
    problems = []
    for ref in packs:
        size = present.get(ref.id)
        if size is None:
            problems.append(f"pack {ref.id} is missing")
        elif size != ref.size:
            problems.append(f"pack {ref.id} holds {size} bytes, the manifest says {ref.size}")
    return problems


def _trailer(store: Objects, ref: PackRef) -> tuple[BlobEntry, ...]:
    name = pack_name(ref.id)
    try:
        return pack.read_trailer(
            lambda offset, length: store.read_range(name, offset, length), ref.size
        )
    except (FileNotFoundError, StoreError) as exc:
        raise ReadFailed(f"pack {ref.id} cannot be read from {store.url}: {exc}") from None
    except PackError as exc:
        raise ReadFailed(f"pack {ref.id} in {store.url} is damaged: {exc}") from None


def read_trailers(
    store: Objects, packs: Sequence[PackRef]
) -> Iterator[tuple[PackRef, tuple[BlobEntry, ...]]]:
    """Yield (pack, its blobs) of every pack, in order, reading READERS trailers at once.
    Raise ReadFailed if a pack is missing or its trailer is damaged."""
    yield from _ordered(packs, lambda ref: (ref, _trailer(store, ref)))


class ChunkMap:
    """chunk id → where its blob lies, in SQLite at `path` (the first pack listed wins when
    two hold the same chunk)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS blobs (chunk_id BLOB PRIMARY KEY, "
            "pack_id TEXT, offset INTEGER, stored INTEGER, raw INTEGER)"
        )

    def add(self, pack_id: str, blobs: Iterable[BlobEntry]) -> None:
        rows = ((b.chunk_id, pack_id, b.offset, b.stored_length, b.raw_length) for b in blobs)
        self.db.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?)", rows)

    def locate(self, chunk_id: bytes) -> Location | None:
        row = self.db.execute(
            "SELECT pack_id, offset, stored, raw FROM blobs WHERE chunk_id = ?", (chunk_id,)
        ).fetchone()
        return None if row is None else Location(*row)

    def close(self) -> None:
        self.db.close()


def chunk_map(opened: Generation) -> ChunkMap:
    """Build the chunk map of the opened generation from the trailers of its listed packs.
    Raise ReadFailed if a pack is missing or damaged."""
    mapped = ChunkMap(opened.workdir / "chunks.sqlite")
    for ref, blobs in read_trailers(opened.store, opened.manifest.packs):
        mapped.add(ref.id, blobs)
    mapped.db.commit()
    return mapped


# ---------------------------------------------------------------- reading blobs


def _ordered(
    items: Iterable[Any], work: Callable[[Any], Any], window: int = READERS
) -> Iterator[Any]:
    """Yield work(item) for every item in order, `window` of them running at once."""
    source = iter(items)
    with ThreadPoolExecutor(window) as pool:
        pending: deque[Future[Any]] = deque(
            pool.submit(work, item) for item in itertools.islice(source, window)
        )
        try:
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(source, 1):
                    pending.append(pool.submit(work, item))
                yield result
        finally:
            for future in pending:
                future.cancel()


def _groups(locations: Iterable[Location]) -> Iterator[list[Location]]:
    """Group consecutive locations that lie close together in one pack, up to PIECE bytes."""
    group: list[Location] = []
    for loc in locations:
        if group:
            first, last = group[0], group[-1]
            end = last.offset + last.stored_length
            if (
                loc.pack_id != first.pack_id
                or not end <= loc.offset <= end + _GAP
                or loc.offset + loc.stored_length - first.offset > PIECE
            ):
                yield group
                group = []
        group.append(loc)
    if group:
        yield group


def fetch_blobs(store: Objects, locations: Iterable[Location]) -> Iterator[tuple[Location, bytes]]:
    """Yield (location, stored blob) for every location in order, by ranged reads: blobs
    close together in a pack in one read, READERS reads in flight. Raise ReadFailed if a pack
    cannot be read or ends early."""

    def read(group: list[Location]) -> list[tuple[Location, bytes]]:
        start = group[0].offset
        end = group[-1].offset + group[-1].stored_length
        name = pack_name(group[0].pack_id)
        try:
            data = store.read_range(name, start, end - start)
        except (FileNotFoundError, StoreError) as exc:
            raise ReadFailed(
                f"pack {group[0].pack_id} cannot be read from {store.url}: {exc}"
            ) from None
        if len(data) != end - start:
            raise ReadFailed(f"pack {group[0].pack_id} in {store.url} ends early")
        view = memoryview(data)
        return [
            (loc, bytes(view[loc.offset - start : loc.offset - start + loc.stored_length]))
            for loc in group
        ]

    for found in _ordered(_groups(locations), read):
        yield from found


@dataclass(frozen=True)
class _Piece:
    ref: PackRef
    start: int
    end: int
    blobs: tuple[BlobEntry, ...]  # the whole blobs in [start, end)
    trailer: tuple[BlobEntry, ...] | None  # the last piece only: every blob of the pack


def _pieces(ref: PackRef, blobs: tuple[BlobEntry, ...]) -> Iterator[_Piece]:
    """Cut a pack into reads of about PIECE bytes that end on blob boundaries; the last holds
    the trailer."""
    start = 0
    group: list[BlobEntry] = []
    for entry in blobs:
        if group and entry.offset + entry.stored_length - start > PIECE:
            yield _Piece(ref, start, entry.offset, tuple(group), None)
            start, group = entry.offset, []
        group.append(entry)
    data_end = blobs[-1].offset + blobs[-1].stored_length if blobs else 0
    if group:
        yield _Piece(ref, start, data_end, tuple(group), None)
    yield _Piece(ref, data_end, ref.size, (), blobs)


def stream_packs(
    store: Objects, packs: Sequence[PackRef]
) -> Iterator[tuple[PackRef, BlobEntry, memoryview]]:
    """Read every pack once, front to back, READERS pieces in flight across packs; yield
    (pack, blob entry, stored blob) for every blob in pack order. After the last blob of a
    pack its sha256 is checked against its id, and its trailer against the one read first.
    Raise ReadFailed if a pack is missing, shorter, damaged or not what its name says — the
    blobs of that pack already yielded must then not be used."""

    def read(piece: _Piece) -> tuple[_Piece, bytes]:
        try:
            data = store.read_range(pack_name(piece.ref.id), piece.start, piece.end - piece.start)
        except (FileNotFoundError, StoreError) as exc:
            raise ReadFailed(
                f"pack {piece.ref.id} cannot be read from {store.url}: {exc}"
            ) from None
        return piece, data

    pieces = (piece for ref, blobs in read_trailers(store, packs) for piece in _pieces(ref, blobs))
    # The pack's sha256 is computed by a thread of its own, in order, beside the consumer.
    hasher = ThreadPoolExecutor(1, "pack-sha256")
    hashing: deque[Future[None]] = deque()
    digest = hashlib.sha256()
    try:
        for piece, data in _ordered(pieces, read):
            if len(data) != piece.end - piece.start:
                raise ReadFailed(
                    f"pack {piece.ref.id} in {store.url} is shorter than the "
                    f"{piece.ref.size} bytes the manifest says"
                )
            hashing.append(hasher.submit(digest.update, data))
            while len(hashing) > READERS:
                hashing.popleft().result()
            view = memoryview(data)
            for entry in piece.blobs:
                at = entry.offset - piece.start
                yield piece.ref, entry, view[at : at + entry.stored_length]
            if piece.trailer is not None:
                sha256 = hasher.submit(digest.hexdigest).result()  # after every update
                hashing.clear()
                expected = pack.encode_trailer(
                    [(b.chunk_id, b.stored_length, b.raw_length) for b in piece.trailer]
                )
                if sha256 != piece.ref.id or data != expected:
                    raise ReadFailed(
                        f"pack {piece.ref.id} in {store.url} is damaged: its sha256 is {sha256}"
                    )
                digest = hashlib.sha256()
    finally:
        hasher.shutdown(cancel_futures=True)
