"""`verify` of a chunked generation, beyond the index file its manifest lists.

    without a key: every listed pack present with its size (one listing of `packs/` per
    store) → every listed pack (or a random N % of them, `--read-data-subset`) read whole,
    its sha256 compared with its id and its trailer checked
    with DECRYPT_IDENTITY as well: the index decrypted and every entry checked → every file's
    content read from its blobs in order, each chunk decoded and its id checked, the file's
    sha256 compared with the index — the end-to-end proof; with a subset, every blob of the
    chosen packs is decoded and its chunk id checked instead

Packs are shared by generations: each is read once per run (`PackChecks`), whatever the
number of generations verified.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.chunks import content
from agent.chunks.reader import (
    Generation,
    Objects,
    ReadFailed,
    chunk_map,
    fetch_blobs,
    missing_packs,
    open_generation,
    present_packs,
    stream_packs,
)
from agent.core import encryption
from agent.core.manifest import Manifest, PackRef
from agent.stores import StoreError, VerificationFailed

logger = logging.getLogger(__name__)


@dataclass
class PackChecks:
    """One verify run's memory of a store's packs: its listing, which packs were read (each
    is read once), and which were drawn for a `--read-data-subset` of `percent`."""

    percent: float = 100.0
    seed: int | None = None
    listing: dict[str, int] | None = None
    read: set[str] = field(default_factory=set)
    drawn: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    @property
    def whole(self) -> bool:
        return self.percent >= 100

    def chosen(self, pack_id: str) -> bool:
        if self.whole:
            return True
        if pack_id not in self.drawn:
            self.drawn[pack_id] = self._random.random() * 100 < self.percent
        return self.drawn[pack_id]


@dataclass
class Checked:
    packs_read: int = 0
    bytes_read: int = 0
    files: int = 0
    chunks: int = 0


def verify_chunked(
    store: Objects, m: Manifest, identities: Sequence[Any], checks: PackChecks
) -> Checked:
    """Check the chunked generation `m` in `store` as the module says. Return what was
    checked. Raise VerificationFailed naming every missing pack, or the first pack, blob or
    file that differs, or a key that does not open the generation."""
    result = Checked()
    try:
        if checks.listing is None:
            checks.listing = present_packs(store)
        problems = missing_packs(m.packs, checks.listing)
        if problems:
            raise VerificationFailed(
                f"{len(problems)} of {len(m.packs)} packs: " + "; ".join(problems)
            )
        keyed = bool(identities) or not m.encrypted
        decode_blobs = keyed and not checks.whole
        todo = [ref for ref in m.packs if ref.id not in checks.read and checks.chosen(ref.id)]
        opened = open_generation(store, m, identities) if keyed else None
        try:
            key = opened.chunk_key() if opened is not None else None
            _read_packs(store, todo, opened if decode_blobs else None, key, result)
            checks.read.update(ref.id for ref in todo)
            if opened is not None and checks.whole:
                _check_files(opened, key, result)
        finally:
            if opened is not None:
                opened.close()
    except (ReadFailed, StoreError, encryption.DecryptionFailed) as exc:
        raise VerificationFailed(str(exc)) from None
    logger.info(
        "%s: %d of %d packs read (%d bytes)%s",
        m.generation,
        result.packs_read,
        len(m.packs),
        result.bytes_read,
        f", {result.files} files and {result.chunks} chunks decoded and checked"
        if result.files or result.chunks
        else "",
    )
    return result


def _read_packs(
    store: Objects,
    packs: Sequence[PackRef],
    opened: Generation | None,
    key: bytes | None,
    result: Checked,
) -> None:
    """Stream the packs, each sha256 checked; with `opened`, also decode every blob with its
    identities and check its chunk id (made with `key`)."""
    decode = opened is not None
    seen = ""
    for ref, entry, data in stream_packs(store, packs):
        if ref.id != seen:
            seen = ref.id
            result.packs_read += 1
            result.bytes_read += ref.size
        if decode:
            assert opened is not None
            content.decode(
                data,
                entry.raw_length,
                opened.identities,
                f"a blob of pack {ref.id}",
                entry.chunk_id,
                key,
            )
            result.chunks += 1


def _check_files(opened: Generation, key: bytes | None, result: Checked) -> None:
    """Read every file's chunks in order, decode them and check their ids, and compare each
    file's sha256 with the index."""
    mapped = chunk_map(opened)
    try:
        blobs = fetch_blobs(opened.store, content.locations(mapped, opened.entries()))
        for entry in opened.entries():
            if entry.type != "file":
                continue
            for _ in content.file_content(entry, blobs, opened.identities, True, key):
                pass
            result.files += 1
            result.chunks += len(entry.chunks)
    finally:
        mapped.close()
