"""Step 2 in push mode: upload every complete generation waiting in the handover to the S3
sink store, oldest first, verify it, rotate the sink, then 2.c move it to the source store and
rotate that. Nothing is moved or rotated before the generation is verified."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field

from agent import manifest, stores
from agent.config import SourceConfig
from agent.handover import Handover
from agent.interrupts import InterruptGuard
from agent.manifest import Manifest
from agent.stores.local import LocalStore
from agent.stores import VerificationFailed
from agent.stores.s3 import S3Store
from agent.steps import Job, StepFailed
from agent.verification import Ledger

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
    for kind in ("data", "logs") if config.push_logs else ("data",):
        for m in handover.complete(kind):
            try:
                _push_generation(config, handover, store, source_store, m, job, guard)
            except StepFailed as failure:
                waiting = [w.generation for w in handover.complete(kind)]
                failure.kept = (f"the {kind} generations {', '.join(waiting)} stay in the "
                                f"handover, untouched; the next run pushes them, oldest first")
                raise
            result.pushed.append(f"{kind}/{m.generation}")
            result.bytes_uploaded += m.total_size
    logger.info("%s done: %d generation(s) pushed to %s (%d bytes), %.2f s", JOB,
                len(result.pushed), store.url, result.bytes_uploaded, job.elapsed)
    return result


def _push_generation(config: SourceConfig, handover: Handover, store: S3Store,
                     source_store: LocalStore, m: Manifest, job: Job,
                     guard: InterruptGuard) -> None:
    kind, gen = m.kind, m.generation
    directory = handover.generation_dir(kind, gen)
    with job.step(f"2.a upload {kind} generation {gen} to {store.url}"):
        uploaded = [store.upload_file(directory / f.path, store.key(kind, gen, f.path))
                    for f in m.files]
    with job.step(f"verify {kind} generation {gen} ({config.verify})"):
        for entry, copy in zip(m.files, uploaded, strict=True):
            if (copy.size, copy.sha256) != (entry.size, entry.sha256):
                raise VerificationFailed(
                    f"the handover's {entry.path} no longer matches its manifest ({copy.size} "
                    f"bytes, sha256 {copy.sha256}; expected {entry.size}, {entry.sha256})")
            store.verify(copy, config.verify)
        store.verify(store.put_manifest(kind, m), config.verify)
        if config.verify != "off":
            Ledger(handover.ledger_path).record(store.url, kind, gen)
    with job.step(f"rotate the sink store ({kind}: {config.sink_keep.describe()})"):
        stores.rotate(store, kind, config.sink_keep, newest_verified=gen)
    if kind == "data":
        with guard.shielded(), job.step(f"2.c move {gen} to the source store"):
            source_store.move_in(directory, kind, gen)
        with job.step(f"rotate the source store ({config.source_keep.describe()})"):
            stores.rotate(source_store, kind, config.source_keep, newest_verified=gen)
    else:
        with guard.shielded(), job.step(f"free the handover of logs generation {gen}"):
            (directory / manifest.NAME).unlink()
            shutil.rmtree(directory)
