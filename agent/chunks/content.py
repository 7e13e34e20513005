"""A file's content from its blobs, as `export` and `verify` read it: the file's chunks in
order, found through the chunk map and read ahead by `reader.fetch_blobs`, each decoded (its
id checked when asked), the holes between them as zeros, and the whole compared with the
file's sha256 in the index. Also the zeros of holes and decoding one blob, for unpack.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from agent.chunks import blob, ids
from agent.chunks.index import Entry
from agent.chunks.reader import Location, ReadFailed
from agent.core import encryption

logger = logging.getLogger(__name__)

_ZEROS = memoryview(bytes(1 << 20))


class Locating(Protocol):
    def locate(self, chunk_id: bytes) -> Location | None: ...


def zeros(count: int) -> Iterator[memoryview]:
    """Yield `count` zero bytes in pieces of at most 1 MiB: a hole as it reads."""
    while count > 0:
        step = min(count, len(_ZEROS))
        yield _ZEROS[:step]
        count -= step


def hash_zeros(digest: Any, count: int) -> None:
    for piece in zeros(count):
        digest.update(piece)


def decode(
    stored: bytes | memoryview,
    raw_length: int,
    identities: Sequence[Any],
    what: str,
    chunk_id: bytes | None = None,
    key: bytes | None = None,
) -> bytes:
    """Return the chunk in the blob `stored` (`what` names it in errors); given `chunk_id`,
    check that the chunk has that id under `key`. Raise WrongKey if the identities do not
    open it, ReadFailed if it is damaged or holds another chunk."""
    try:
        chunk = blob.decode(stored, raw_length, identities)
    except encryption.WrongKey:
        raise
    except (blob.BlobError, encryption.DecryptionFailed) as exc:
        raise ReadFailed(f"{what} is damaged: {exc}") from None
    if chunk_id is not None and ids.chunk_id(chunk, key) != chunk_id:
        raise ReadFailed(f"{what} does not hold chunk {chunk_id.hex()}: its content differs")
    return chunk


def locations(mapped: Locating, entries: Iterator[Entry]) -> Iterator[Location]:
    """The locations of every chunk of every file of `entries`, in order. Raise ReadFailed
    for a chunk no listed pack holds."""
    for entry in entries:
        if entry.type != "file":
            continue
        for cid, _, _ in entry.chunks:
            location = mapped.locate(bytes.fromhex(cid))
            if location is None:
                raise ReadFailed(
                    f"chunk {cid} of {os.fsdecode(entry.path)!r} is in none of the packs the "
                    "manifest lists"
                )
            yield location


def file_content(
    entry: Entry,
    blobs: Iterator[tuple[Location, bytes | memoryview]],
    identities: Sequence[Any],
    check_ids: bool = False,
    key: bytes | None = None,
) -> Iterator[bytes | memoryview]:
    """Yield the content of the file `entry`, taking its blobs from `blobs` (a stream of all
    files' chunks in index order, standing at this file's first): chunks decoded, holes as
    zeros. With `check_ids`, each chunk's id is checked (made with `key`). After the last
    piece the content's sha256 is compared with the index. Raise ReadFailed if a blob is
    damaged, a chunk is not the length the index says or the content differs."""
    digest = hashlib.sha256()
    position = 0
    name = os.fsdecode(entry.path)
    for cid, offset, length in entry.chunks:
        location, stored = next(blobs)
        chunk = decode(
            stored,
            location.raw_length,
            identities,
            f"chunk {cid} of {name!r} (pack {location.pack_id})",
            bytes.fromhex(cid) if check_ids else None,
            key,
        )
        if len(chunk) != length:
            raise ReadFailed(
                f"chunk {cid} of {name!r} holds {len(chunk)} bytes, the index says {length}"
            )
        for piece in zeros(offset - position):
            digest.update(piece)
            yield piece
        digest.update(chunk)
        yield chunk
        position = offset + length
    for piece in zeros(entry.size - position):
        digest.update(piece)
        yield piece
    if digest.hexdigest() != entry.sha256:
        raise ReadFailed(
            f"the generation is damaged: {name!r} reads back with sha256 {digest.hexdigest()}; "
            f"the index says {entry.sha256}"
        )
