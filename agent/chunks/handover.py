"""The chunked data generation in the handover, and the source's state for building it.

```
<handover>/packs/<2 hex>/<id>.pack      packs of generations still waiting (immutable)
<handover>/data/<gen>/INDEX.zst[.age]   the index (encrypted: and CHUNK-ID-KEY.age), then
                                        MANIFEST.json (staged, renamed in)
<handover>/.state/chunks/               the chunk-id key, the dedup caches (one per store),
                                        the previous generation's index in plaintext
```

The previous index is kept in plaintext in `.state` because the source holds only the
recipients' public keys: it could not read its own encrypted index back. It is tied to the
blob domain (not encrypted, or encrypted to one set of recipients), as is the chunk-id key:
when ENCRYPT_RECIPIENTS changes, a new key is made, so no generation ever references a blob
its recipients cannot open.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.chunks import builder, ids, index, pack
from agent.chunks.builder import BuildResult, BuildSettings, Dedup
from agent.chunks.cache import DedupCache, path_for
from agent.chunks.index import Entry
from agent.chunks.pack import BlobEntry
from agent.core import manifest
from agent.core.handover import Handover
from agent.core.manifest import FileEntry, Manifest, PackRef
from agent.stores import StoreError
from agent.stores.local import LocalStore

logger = logging.getLogger(__name__)

STATE = "chunks"
PARENT_INDEX = "parent-index.zst"
PARENT_INFO = "parent.json"
KEY_INFO = "chunk-id.key.json"
_BUILDING = "index.zst.tmp"


class ObjectStore(Protocol):
    """What the chunked format needs of a store (LocalStore and S3Store have it)."""

    @property
    def url(self) -> str: ...

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]: ...

    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def read_named(self, name: str) -> Iterable[bytes | memoryview]: ...

    def delete_object(self, name: str) -> None: ...


def state_dir(handover: Handover) -> Path:
    return handover.state / STATE


def packs_of(store: ObjectStore) -> Iterator[tuple[str, int]]:
    """Yield (pack id, size) of every pack of `store`; other names below `packs/` are
    ignored."""
    for name, size in store.list_objects(ids.PACKS_DIR + "/"):
        pack_id = ids.parse_pack_key(name)
        if pack_id is not None:
            yield pack_id, size


def trailer_reader(store: ObjectStore) -> Callable[[str, int], tuple[BlobEntry, ...]]:
    """A `read_trailer(pack id, size)` over `store`, by ranged reads of the pack's tail."""

    def read(pack_id: str, size: int) -> tuple[BlobEntry, ...]:
        name = ids.pack_key(pack_id)
        return pack.read_trailer(
            lambda offset, length: store.read_range(name, offset, length), size
        )

    return read


def open_cache(handover: Handover, store: ObjectStore, condemned: Iterable[str] = ()) -> DedupCache:
    """Return the dedup cache of `store`, brought up to date with the store's packs. A store
    that cannot be listed now (an S3 outage) leaves the cache as it was, with a warning: the
    generation is still built, and every pack a manifest lists is checked in the store before
    that manifest is written there."""
    cache = DedupCache(path_for(state_dir(handover), store.url), store.url)
    try:
        cache.sync(packs_of(store), trailer_reader(store), condemned)
    except StoreError as exc:
        logger.warning(
            "the packs of %s cannot be listed now (%s); deduplicating against what its cache says",
            store.url,
            exc,
        )
    return cache


def _domain_path(handover: Handover, name: str) -> Path:
    return state_dir(handover) / name


def chunk_id_key(handover: Handover, domain: str) -> bytes | None:
    """The chunk-id key for blobs of `domain` ('' when not encrypted: no key), made when
    there is none or the recipients changed."""
    if not domain:
        return None
    state = state_dir(handover)
    info = _domain_path(handover, KEY_INFO)
    try:
        current = json.loads(info.read_text()).get("domain")
    except (OSError, ValueError):
        current = None
    if current != domain:
        (state / ids.KEY_FILE).unlink(missing_ok=True)
        if current is not None:
            logger.info(
                "ENCRYPT_RECIPIENTS changed: a new chunk-id key; this run stores "
                "its data once more, encrypted to the new recipients"
            )
    key = ids.load_or_create_key(state)
    if current != domain:
        _write_json(info, {"domain": domain})
    return key


def _write_json(path: Path, body: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body) + "\n")
    os.replace(tmp, path)


def parent_entries(handover: Handover, domain: str) -> Iterator[Entry] | None:
    """The entries of the previous generation's index for the merge, or None if there is
    none or it was made for another blob domain."""
    path = _domain_path(handover, PARENT_INDEX)
    try:
        info = json.loads(_domain_path(handover, PARENT_INFO).read_text())
    except (OSError, ValueError):
        return None
    if info.get("domain") != domain or not path.is_file():
        return None
    return index.read_entries(path)


@dataclass
class Built:
    """A chunked generation built into a staging directory: its index file, its encrypted
    chunk-id key (encrypted generations only) and figures."""

    index: FileEntry
    key: FileEntry | None
    result: BuildResult
    plain_index: Path


def build(
    handover: Handover,
    stores: Sequence[ObjectStore],
    staging: Path,
    members: Sequence[str],
    settings: BuildSettings,
    domain: str,
    condemned: dict[str, Iterable[str]] | None = None,
    skip: builder.Skip | None = None,
) -> Built:
    """Build the chunked data generation of `members` (paths relative to the data mirror)
    into `staging` (the index; the caller writes the manifest), its new packs into the
    handover's `packs/`. Deduplicate against what every one of `stores` holds (their packs
    `condemned` by garbage collection left out, per store url) and the handover's packs.
    `skip` leaves out what is excluded (see `builder.walk`). Raise OSError if the mirror
    cannot be read."""
    state = state_dir(handover)
    state.mkdir(parents=True, exist_ok=True)
    caches = [open_cache(handover, s, (condemned or {}).get(s.url, ())) for s in stores]
    own = open_cache(handover, LocalStore(handover.root))
    plain = state / _BUILDING
    try:
        result = builder.build(
            handover.mirror("data"),
            members,
            parent_entries(handover, domain),
            settings,
            Dedup(own, caches),
            handover.root / ids.PACKS_DIR,
            handover.root / ".staging" / "packs",
            plain,
            skip,
        )
        name, size, sha256 = index.publish(plain, staging, settings.recipients)
        key = publish_key(staging, settings) if settings.recipients else None
    except BaseException:
        plain.unlink(missing_ok=True)
        raise
    finally:
        for cache in (*caches, own):
            cache.close()
    return Built(FileEntry(name, size, sha256), key, result, plain)


def publish_key(target_dir: Path, settings: BuildSettings) -> FileEntry:
    """Write the chunk-id key of `settings`, age-encrypted to its recipients, into
    `target_dir` as the generation's CHUNK-ID-KEY.age, durably. Return its entry."""
    if settings.key is None:
        raise ValueError("an encrypted build without a chunk-id key")
    data = ids.encrypt_key(settings.key, settings.recipients)
    with open(target_dir / manifest.CHUNK_ID_KEY, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return FileEntry(manifest.CHUNK_ID_KEY, len(data), hashlib.sha256(data).hexdigest())


def keep_parent(handover: Handover, built: Built, domain: str) -> None:
    """After the generation was published: its plaintext index becomes the parent of the
    next build."""
    os.replace(built.plain_index, _domain_path(handover, PARENT_INDEX))
    _write_json(_domain_path(handover, PARENT_INFO), {"domain": domain})


def chunked_manifest(
    stamp: dict[str, Any], paths: Sequence[str], built: Built, encrypted: bool
) -> Manifest:
    """The manifest of a built chunked generation; `stamp` holds source_id, generation,
    created_at, downtime_seconds and agent_version."""
    result = built.result
    return Manifest(
        kind="data",
        files=(built.index,) if built.key is None else (built.index, built.key),
        paths=tuple(paths),
        format=manifest.CHUNKS_FORMAT_VERSION,
        data_format="chunks",
        encrypted=encrypted,
        packs=tuple(PackRef(p, s) for p, s in sorted(result.packs.items())),
        logical_size=result.logical_size,
        added_size=result.added_size,
        chunk_count=result.chunk_count,
        **stamp,
    )


def waiting_packs(handover: Handover, besides: str = "") -> set[str]:
    """The packs listed by the chunked generations waiting in the handover (but `besides`)."""
    return {
        p.id
        for m in handover.complete("data")
        if m.chunked and m.generation != besides
        for p in m.packs
    }


def free_packs(handover: Handover) -> int:
    """Remove the handover's packs that no generation waiting there lists (the stores hold
    those of the generations that left; the others are left by a build that failed). Return
    how many were removed. Call only under the agent's lock, outside a build."""
    keep = waiting_packs(handover)
    removed = 0
    for pack_id, _ in list(packs_of(LocalStore(handover.root))):
        if pack_id not in keep:
            (handover.root / ids.pack_key(pack_id)).unlink(missing_ok=True)
            removed += 1
    shutil.rmtree(handover.root / ".staging" / "packs", ignore_errors=True)
    return removed
