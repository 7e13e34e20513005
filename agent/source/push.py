"""Step 2 in push mode: upload every complete generation waiting in the handover to the S3
sink store, oldest first, verify it, rotate the sink, then 2.c move it to the source store and
rotate that. Nothing is moved or rotated before the generation is verified."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent import stores
from agent.chunks import gc, prune, transport
from agent.chunks import handover as chunked
from agent.config import SourceConfig
from agent.core import manifest
from agent.core.handover import Handover
from agent.core.ledger import Ledger
from agent.core.manifest import Manifest
from agent.runtime import diskspace
from agent.runtime.interrupts import InterruptGuard
from agent.runtime.steps import Job, StepFailed
from agent.stores import StoreError, VerificationFailed
from agent.stores.local import LocalStore
from agent.stores.s3 import S3Store

logger = logging.getLogger(__name__)

JOB = "source push"


@dataclass
class PushResult:
    pushed: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0


def push(config: SourceConfig, store: S3Store, guard: InterruptGuard) -> PushResult:
    """Push what waits in the handover. Return what was pushed. Raise StepFailed at the first
    generation that cannot be uploaded or verified; it and every newer one stay in the
    handover for the next run."""
    handover = Handover(config.handover_dir)
    source_store = LocalStore(config.source_store_dir)
    job = Job(JOB)
    result = PushResult()
    kinds = ("data", "logs") if config.push_logs else ("data",)
    collect = _garbage_collector(config, handover, job)
    # Listed before this run uploads anything: every upload found is an earlier run's.
    earlier = (
        _uploads_of_earlier_runs(store) if any(handover.complete(kind) for kind in kinds) else []
    )
    for kind in kinds:
        for m in handover.complete(kind):
            try:
                _push_generation(
                    config, handover, store, source_store, m, job, guard, result, collect
                )
            except StepFailed as failure:
                waiting = [w.generation for w in handover.complete(kind)]
                failure.kept = (
                    f"the {kind} generations {', '.join(waiting)} stay in the "
                    f"handover, untouched; the next run pushes them, oldest first"
                )
                failure.free_space = diskspace.of_source(config)
                raise
            result.pushed.append(f"{kind}/{m.generation}")
            result.bytes_uploaded += m.total_size
            if earlier:
                _abort_uploads(store, earlier, job)
                earlier = []
    logger.info(
        "%s done: %d generation(s) pushed to %s (%d bytes), %.2f s",
        JOB,
        len(result.pushed),
        store.url,
        result.bytes_uploaded,
        job.elapsed,
    )
    return result


def _uploads_of_earlier_runs(store: S3Store) -> list[tuple[str, str]]:
    """The multipart uploads in progress below this source's prefix. A store that cannot be
    asked is logged, not a failure: the next run asks again."""
    try:
        return store.uploads_in_progress()
    except StoreError as exc:
        logger.warning(
            "cannot list incomplete multipart uploads (%s); those of earlier runs "
            "stay until a later run or the bucket's lifecycle rule removes them",
            exc,
        )
        return []


def _abort_uploads(store: S3Store, uploads: list[tuple[str, str]], job: Job) -> None:
    """Abort multipart uploads earlier runs could not (a kill, an S3 outage); they hold space
    but never a generation. Called only after a generation of this run was verified."""
    with job.step(f"abort {len(uploads)} incomplete multipart upload(s) of earlier runs"):
        for key, upload_id in uploads:
            try:
                store.abort_upload(key, upload_id)
            except StoreError as exc:
                logger.warning("could not abort the multipart upload of %s: %s", key, exc)


def _garbage_collector(
    config: SourceConfig, handover: Handover, job: Job
) -> Callable[[prune.PackStore, str], None]:
    """Garbage collection of a store right after a rotation, with one run id for the whole
    push job: a pack this job condemns is deleted only by a later one (two phases)."""
    run = gc.run_id(datetime.now(UTC))
    settings = prune.settings_for(config)

    def collect(store: prune.PackStore, name: str) -> None:
        with job.step(f"collect the garbage of the {name}"):
            prune.after_rotation(store, name, handover, settings, run)  # it logs what went

    return collect


def _push_generation(
    config: SourceConfig,
    handover: Handover,
    store: S3Store,
    source_store: LocalStore,
    m: Manifest,
    job: Job,
    guard: InterruptGuard,
    pushed: PushResult,
    collect: Callable[[prune.PackStore, str], None],
) -> None:
    kind, gen = m.kind, m.generation
    directory = handover.generation_dir(kind, gen)
    sent = transport.Sent()
    if m.chunked:
        with job.step(f"2.a upload the packs {store.url} lacks of data generation {gen}"):
            sent = transport.send_packs(store, m.packs, handover, source_store, config.verify)
    with job.step(f"2.a upload {kind} generation {gen} to {store.url}"):
        uploaded = [
            store.upload_file(directory / f.path, store.key(kind, gen, f.path)) for f in m.files
        ]
    with job.step(f"verify {kind} generation {gen} ({config.verify})"):
        for entry, copy in zip(m.files, uploaded, strict=True):
            if (copy.size, copy.sha256) != (entry.size, entry.sha256):
                raise VerificationFailed(
                    f"the handover's {entry.path} no longer matches its manifest ({copy.size} "
                    f"bytes, sha256 {copy.sha256}; expected {entry.size}, {entry.sha256})"
                )
            store.verify(copy, config.verify)
    if m.chunked:
        with job.step(f"2.a check that {store.url} holds every pack of {gen}"):
            transport.check_present(store, m)
    with job.step(f"2.a write the manifest of {kind} generation {gen} ({config.verify})"):
        store.verify(store.put_manifest(kind, m), config.verify)
        ledger = Ledger(handover.ledger_path)
        if config.verify != "off":
            ledger.record(store.url, kind, gen)
    pushed.bytes_uploaded += sent.bytes
    with job.step(f"rotate the sink store ({kind}: {config.sink_keep.describe()})"):
        stores.rotate(store, "sink store", kind, config.sink_keep, newest_verified=gen)
    if kind == "data":
        collect(store, "sink store")
        with guard.shielded(), job.step(f"2.c move {gen} to the source store"):
            if m.chunked:
                others = chunked.waiting_packs(handover, besides=gen)
                transport.send_packs(
                    source_store, m.packs, handover, store, hashed=sent.hashed, keep=others
                )
                transport.check_present(source_store, m)
            source_store.move_in(directory, kind, gen)
            # The upload's one read hashed these very files against the manifest (a move
            # across filesystems verifies its copy again): the source store's copy is verified.
            ledger.record(source_store.url, kind, gen)
        with job.step(f"rotate the source store ({config.source_keep.describe()})"):
            stores.rotate(
                source_store, "source store", kind, config.source_keep, newest_verified=gen
            )
        collect(source_store, "source store")
        if m.chunked:
            with job.step("free the handover of packs no waiting generation lists"):
                chunked.free_packs(handover)
    else:
        with guard.shielded(), job.step(f"free the handover of logs generation {gen}"):
            (directory / manifest.NAME).unlink()
            shutil.rmtree(directory)
