"""Moving a chunked generation's packs into a store, and the checks before its manifest.

Step 2.a puts into the S3 sink store the packs it lacks, then (the caller) the index, then —
after `check_present` found every listed pack there with its size — the manifest. Step 2.c
moves into the source store the packs it lacks, then the generation directory (index and
manifest in one rename). A pack comes from the handover, or — when the handover no longer
holds it (a run killed in 2.c, a cache that was stale) — from the site's other store; every
copy is checked against its pack id (the sha256 of its bytes) on the way, so a pack that
changed on disk never reaches a store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from agent.chunks import ids
from agent.chunks.handover import ObjectStore, packs_of
from agent.core.handover import Handover
from agent.core.manifest import Manifest, PackRef
from agent.stores import StoreError, VerificationFailed
from agent.stores.local import LocalStore
from agent.stores.s3 import S3Store

logger = logging.getLogger(__name__)


@dataclass
class Sent:
    """What `send_packs` did: packs put into the store and their bytes; `hashed` are the
    packs whose bytes were hashed against their id on the way."""

    packs: int = 0
    bytes: int = 0
    hashed: set[str] = field(default_factory=set)


def missing(store: ObjectStore, packs: Iterable[PackRef]) -> list[PackRef]:
    """The `packs` that `store` does not hold with their size (one listing of its packs)."""
    held = dict(packs_of(store))
    return [p for p in packs if held.get(p.id) != p.size]


def check_present(store: ObjectStore, m: Manifest) -> None:
    """Raise VerificationFailed unless `store` holds every pack `m` lists, with its size:
    the last check before the manifest is written there (invariant 9)."""
    lacking = missing(store, m.packs)
    if lacking:
        names = ", ".join(p.id[:12] for p in lacking[:5])
        raise VerificationFailed(
            f"{store.url} lacks {len(lacking)} pack(s) generation {m.generation} lists "
            f"({names}{', ...' if len(lacking) > 5 else ''}): its manifest is not written"
        )


def _upload(store: S3Store, pack_id: str, path: Path, verify: str, shape: UploadShape) -> int:
    key = store.object_key(ids.pack_key(pack_id))
    uploaded = store.upload_file(path, key, shape.part_size, shape.parts)
    try:
        if uploaded.sha256 != pack_id:
            raise VerificationFailed(
                f"{path}: sha256 {uploaded.sha256} is not its pack id "
                f"(the file changed on disk); it is not uploaded"
            )
        store.verify(uploaded, verify)
    except VerificationFailed:
        store.delete_object(ids.pack_key(pack_id))
        raise
    return uploaded.size


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fetch(source: ObjectStore, pack_id: str, scratch: Path) -> Path:
    """Copy pack `pack_id` of `source` into the file `scratch`, checking its sha256."""
    digest = hashlib.sha256()
    scratch.parent.mkdir(parents=True, exist_ok=True)
    with open(scratch, "wb") as handle:
        for block in source.read_named(ids.pack_key(pack_id)):
            digest.update(block)
            handle.write(block)
    if digest.hexdigest() != pack_id:
        scratch.unlink()
        raise VerificationFailed(f"pack {pack_id} read from {source.url} does not hash to its id")
    return scratch


# The smallest part S3 takes (but the last).
_MIN_PART = 5 << 20


@dataclass(frozen=True)
class UploadShape:
    """How a generation's packs go up: `at_once` packs at a time, each in parts of
    `part_size` with `parts` of them in flight."""

    at_once: int
    parts: int
    part_size: int


def upload_shape(store: S3Store) -> UploadShape:
    """Two packs at once, each with half the S3_CONCURRENCY parts in flight, of half the
    S3_PART_SIZE_MB (at least 5 MiB): the round trips of one pack (create, complete, verify)
    overlap the other's transfer, and the bytes in memory stay at S3_CONCURRENCY x
    S3_PART_SIZE_MB / 2 — what one 32 MiB pack took uploaded alone in 16 MiB parts."""
    settings = store.settings
    at_once = 2 if settings.concurrency >= 2 else 1
    return UploadShape(
        at_once,
        max(1, settings.concurrency // at_once),
        max(_MIN_PART, settings.part_size // at_once),
    )


def send_packs(
    target: S3Store | LocalStore,
    packs: Iterable[PackRef],
    handover: Handover,
    other: ObjectStore | None,
    verify: str = "checksum",
    hashed: Iterable[str] = (),
    keep: Iterable[str] = (),
) -> Sent:
    """Put into `target` every one of `packs` it lacks: uploaded to S3 (two at once, see
    upload_shape; multipart with per-part checksums, verified per `verify`), or moved into
    a local store (a rename where it can; the handover's copy then leaves, unless it is one
    of `keep`: copied). `hashed`: packs whose handover copy was already hashed against its
    id in this run. Raise VerificationFailed if a pack is in neither the handover nor
    `other`, or a copy does not hash to its id."""
    lacking = missing(target, packs)
    if isinstance(target, S3Store):
        return _upload_all(target, lacking, handover, other, verify)
    sent = Sent()
    already = set(hashed)
    kept = set(keep)
    for ref in lacking:
        path, fetched = _source_of(ref, handover, other, target)
        if fetched:
            already.add(ref.id)
        if ref.id not in already and _sha256(path) != ref.id:
            raise VerificationFailed(
                f"{path}: its sha256 is not its pack id (the file changed on disk); it "
                f"is not put into {target.url}"
            )
        if fetched or ref.id not in kept:
            target.move_file(ids.pack_key(ref.id), path)
        else:
            target.put_file(ids.pack_key(ref.id), path)
        sent.bytes += ref.size
        sent.packs += 1
    return sent


def _source_of(
    ref: PackRef, handover: Handover, other: ObjectStore | None, target: ObjectStore
) -> tuple[Path, bool]:
    """The file to send of pack `ref`, and whether it was fetched from `other` (a scratch
    copy of its own, which the caller removes) because the handover lacks it."""
    path = handover.root / ids.pack_key(ref.id)
    if path.is_file():
        return path, False
    if other is None:
        raise VerificationFailed(f"pack {ref.id} is not in the handover")
    try:
        return _fetch(other, ref.id, handover.root / ".staging" / "pack-copies" / ref.id), True
    except (FileNotFoundError, VerificationFailed, StoreError) as exc:
        raise VerificationFailed(
            f"pack {ref.id} is in neither the handover nor {other.url} ({exc}); "
            f"the generation cannot be completed in {target.url}"
        ) from None


def _upload_all(
    target: S3Store,
    lacking: Sequence[PackRef],
    handover: Handover,
    other: ObjectStore | None,
    verify: str,
) -> Sent:
    """Upload `lacking` into `target`, several at once; at the first failure the packs not
    yet started are not, and the failure is raised once the running ones end."""
    sent = Sent()
    shape = upload_shape(target)

    def one(ref: PackRef) -> PackRef:
        path, fetched = _source_of(ref, handover, other, target)
        try:
            _upload(target, ref.id, path, verify, shape)
        finally:
            if fetched:
                path.unlink(missing_ok=True)
        return ref

    with ThreadPoolExecutor(shape.at_once, "upload") as pool:
        futures = [pool.submit(one, ref) for ref in lacking]
        try:
            for future in as_completed(futures):
                ref = future.result()
                sent.bytes += ref.size
                sent.packs += 1
                sent.hashed.add(ref.id)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return sent
