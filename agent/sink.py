"""Step 2 in pull mode and step 3: the sink fetches the complete generations of every source
over SSH + rsync, verifies every file against the manifest, moves them into the sink store,
rotates, and only then acknowledges, so the source frees its handover.

    for each source:  list → 2.a/3.a fetch into .incoming → verify → 2.b/3.b move into the
                      sink store → rotate the sink → acknowledge (2.c on the source)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from agent import alerts, archive, manifest, stores
from agent.config import SinkConfig, SourceEndpoint
from agent.interrupts import Interrupted
from agent.stores import VerificationFailed
from agent.stores.local import LocalStore, verify_directory
from agent.ssh import Gateway
from agent.steps import Job, StepFailed
from agent.verification import Ledger

logger = logging.getLogger(__name__)

JOBS = {"data": "sink pull-data", "logs": "sink pull-logs"}


def state_dir(config: SinkConfig) -> Path:
    """The sink agent's own files: its lock and its ledger of verifications."""
    return config.store_dir / ".state"


def ledger_path(config: SinkConfig) -> Path:
    return state_dir(config) / "verified.json"
STEPS = {"data": ("2.a", "2.b"), "logs": ("3.a", "3.b")}


@dataclass
class PullResult:
    pulled: list[str] = field(default_factory=list)
    bytes_received: int = 0


def pull(config: SinkConfig, kind: str) -> PullResult:
    """Pull `kind` from every configured source, one after another. A source that fails is
    alerted and the others still run. Raise StepFailed at the end if any source failed."""
    job = Job(JOBS[kind])
    result = PullResult()
    failed = []
    for source in config.sources:
        try:
            _pull_source(config, source, kind, job, result)
        except StepFailed as failure:
            if isinstance(failure.__cause__, Interrupted):
                raise  # SIGTERM/SIGINT ends the job (exit 128+N), not only this source
            failed.append(source.id)
            alerts.send(config.mail, alerts.Alert(source.id, JOBS[kind], failure.step,
                                                  failure.error, failure.kept))
    logger.info("%s done: %d generation(s) pulled, %d bytes received, %.2f s", JOBS[kind],
                len(result.pulled), result.bytes_received, job.elapsed)
    if failed:
        failure = StepFailed(f"pull from {', '.join(failed)}", "see the alert of each source",
                             kept="the other sources were pulled")
        failure.alerted = True
        raise failure
    return result


def _pull_source(config: SinkConfig, source: SourceEndpoint, kind: str, job: Job,
                 result: PullResult) -> None:
    fetch_step, move_step = STEPS[kind]
    gateway = Gateway(config, source, config.data_user if kind == "data" else config.log_user)
    store = LocalStore(config.store_dir / source.id)
    kept = (f"every generation stays in {source.id}'s handover until the sink has a verified "
            "copy; the next pull takes it up again")
    try:
        with job.step(f"list the {kind} generations waiting on {source.id}"):
            offered = gateway.list()
        for gen in offered:
            complete = store.generations(kind)[0]
            if gen not in complete:
                incoming = config.store_dir / ".incoming" / source.id / kind / gen
                basis = store.path(kind, complete[-1]) if complete else None
                with job.step(f"{fetch_step} fetch {kind} generation {gen} from {source.id}"):
                    stats = gateway.fetch(gen, incoming, basis)
                    result.bytes_received += stats.bytes_received
                with job.step(f"verify {kind} generation {gen} of {source.id}"):
                    _verify(incoming, source.id, kind, gen)
                with job.step(f"{move_step} move {gen} into the sink store"):
                    store.move_in(incoming, kind, gen)
                    Ledger(ledger_path(config)).record(store.url, kind, gen)
                with job.step(f"rotate the sink store of {source.id} ({kind})"):
                    stores.rotate(store, kind, config.sink_keep, newest_verified=gen)
                result.pulled.append(f"{source.id}/{kind}/{gen}")
            with job.step(f"acknowledge {kind} generation {gen} to {source.id}"):
                gateway.ack(gen)
    except StepFailed as failure:
        failure.kept = kept
        raise


def _verify(directory: Path, source_id: str, kind: str, gen: str) -> None:
    """Check the fetched generation: its manifest names this source, kind and generation, and
    every file has the manifest's size and sha256, with nothing else beside them.
    Raise VerificationFailed otherwise (the copy stays in .incoming for the next try)."""
    m = manifest.read(directory)
    if (m.source_id, m.kind, m.generation) != (source_id, kind, gen):
        raise VerificationFailed(f"the manifest says {m.source_id}/{m.kind}/{m.generation}, "
                                 f"expected {source_id}/{kind}/{gen}")
    verify_directory(directory, m)
    listed = {entry.path for entry in m.files} | {manifest.NAME}
    extra = [str(p.relative_to(directory)) for p in archive.walk_files(directory)
             if str(p.relative_to(directory)) not in listed]
    if extra:
        raise VerificationFailed(f"files not in the manifest: {', '.join(extra[:5])}")
