"""Step 2 in pull mode and step 3: the sink fetches the complete generations of every source
over SSH + rsync, verifies every file against the manifest, moves them into the sink store,
rotates, and only then acknowledges, so the source frees its handover.

    for each source:  list → 2.a/3.a fetch into .incoming (the manifest first, bounded and
                      checked, then the files) → verify → 2.b/3.b move into the sink store →
                      rotate the sink → acknowledge (2.c on the source)

A chunked data generation brings first the packs the sink store lacks (sink.packs), then its
index; before its manifest goes in, every pack it lists is checked present; after the
rotation the sink store's garbage is collected (two phases, one run id per job), and the
acknowledgement tells the source what the sink condemned and deleted (chunks.pulled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from agent import stores
from agent.chunks import prune, pulled, transport
from agent.config import SinkConfig, SourceEndpoint
from agent.core import manifest
from agent.core.ledger import Ledger
from agent.runtime.steps import Job, StepFailed
from agent.sink import housekeeping, incoming, packs
from agent.sink.ssh import Gateway
from agent.stores import StoreError, VerificationFailed
from agent.stores.local import LocalStore

logger = logging.getLogger(__name__)

JOBS = {"data": "sink pull-data", "logs": "sink pull-logs"}


STEPS = {"data": ("2.a", "2.b"), "logs": ("3.a", "3.b")}


@dataclass
class PullResult:
    pulled: list[str] = field(default_factory=list)
    bytes_received: int = 0


def pull_source(
    config: SinkConfig,
    source: SourceEndpoint,
    kind: str,
    job: Job,
    result: PullResult,
    run: str,
) -> None:
    """Pull `kind` from `source` (agent.sink.fanout runs it for every source), adding to
    `result`; `run` is the job's garbage-collection run id (a pack it condemns is deleted by a
    later job). Raise StepFailed naming the step, and what stays kept."""
    fetch_step, move_step = STEPS[kind]
    gateway = Gateway(config, source, config.data_user if kind == "data" else config.log_user)
    store = LocalStore(config.store_dir / source.id)
    collector = _Collector(config, store, source.id)
    kept = (
        f"every generation stays in {source.id}'s handover until the sink has a verified "
        "copy; the next pull takes it up again"
    )
    try:
        with job.step(f"list the {kind} generations waiting on {source.id}"):
            offered = gateway.list()
        for gen in offered:
            complete = store.generations(kind)[0]
            chunked = False
            if gen not in complete:
                directory = config.store_dir / ".incoming" / source.id / kind / gen
                basis = store.path(kind, complete[-1]) if complete else None
                with job.step(f"{fetch_step} fetch {kind} generation {gen} from {source.id}"):
                    m = _fetch(gateway, directory, basis, (source.id, kind, gen), result, store)
                chunked = m.chunked
                with job.step(f"verify {kind} generation {gen} of {source.id}"):
                    incoming.verify_or_set_aside(directory, m)
                    if chunked:
                        transport.check_present(store, m)
                with job.step(f"{move_step} move {gen} into the sink store"):
                    store.move_in(directory, kind, gen)
                    incoming.forget_failure(directory)
                    Ledger(config.ledger_path).record(store.url, kind, gen)
                with job.step(f"rotate the sink store of {source.id} ({kind})"):
                    stores.rotate(store, "sink store", kind, config.sink_keep, newest_verified=gen)
                if kind == "data" and (chunked or (store.root / "packs").is_dir()):
                    with job.step(f"collect the garbage of the sink store of {source.id}"):
                        collector.collect(run)
                result.pulled.append(f"{source.id}/{kind}/{gen}")
            else:
                chunked = kind == "data" and store.read_manifest(kind, gen).chunked
            with job.step(f"acknowledge {kind} generation {gen} to {source.id}"):
                report = collector.report() if chunked else None
                logger.info("%s: %s", source.id, gateway.ack(gen, report))
    except StepFailed as failure:
        failure.kept = kept
        raise


@dataclass
class _Collector:
    """Garbage collection of one source's sink store during a pull job, and the report the
    acknowledgements carry (chunks.pulled.SinkReport)."""

    config: SinkConfig
    store: LocalStore
    source_id: str
    deleted: set[str] = field(default_factory=set)

    def collect(self, run_id: str) -> None:
        """Collect the garbage; what cannot be collected now is logged (the next pull goes
        on), never a failure of the pull."""
        try:
            outcome = prune.collect(
                housekeeping.target(self.config, self.source_id), housekeeping.SETTINGS, run_id
            )
        except (StoreError, OSError) as exc:
            logger.warning(
                "garbage collection of the sink store %s did not finish (%s); what it did is "
                "safe, the next pull goes on",
                self.store.url,
                exc,
            )
            return
        self.deleted.update(outcome.plan.delete)

    def report(self) -> bytes:
        condemned = tuple(sorted(prune.read_record(self.store)))
        return pulled.SinkReport(condemned, tuple(sorted(self.deleted))).encode()


def _fetch(
    gateway: Gateway,
    directory: Path,
    basis: Path | None,
    expected: tuple[str, str, str],
    result: PullResult,
    store: LocalStore,
) -> manifest.Manifest:
    """Fetch the manifest of the generation `expected` = (source id, kind, generation) into
    `directory`, check that it is that generation's, take up what an earlier try left there,
    then fetch the rest — for a chunked generation first the packs `store` lacks, straight
    into it once checked. Return the manifest. Raise VerificationFailed for a manifest of
    another generation (before its files travel) or a pack that is not what it should be."""
    source_id, kind, gen = expected
    m, stats = gateway.fetch_manifest(gen, directory)
    if (m.source_id, m.kind, m.generation) != expected:
        raise VerificationFailed(
            f"the manifest says {m.source_id}/{m.kind}/{m.generation}, "
            f"expected {source_id}/{kind}/{gen}"
        )
    if m.chunked:
        if kind != "data":
            raise VerificationFailed(f"logs generation {gen} of {source_id} claims to be chunked")
        arrived = packs.fetch_lacking(gateway, store, m, directory.parent.parent / "packs")
        stats += arrived.stats
        basis = None
    incoming.take_up_temporaries(directory, m)
    stats += gateway.fetch(
        gen, directory, basis, links=kind == "data", checksum=incoming.compare_by_content(directory)
    )
    incoming.drop_partials(directory)
    result.bytes_received += stats.bytes_received
    return m
