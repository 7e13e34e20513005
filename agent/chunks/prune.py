"""Garbage collection of one store, after rotation: read what the store holds and lists,
decide (`gc.decide`), then apply the plan in an order a crash at any point cannot hurt:

1. the condemned record `gc/condemned.json` with this run's condemnations (one atomic write);
2. the packs condemned by an earlier run and still unreferenced are deleted, then the record
   is written without them (a run killed in between deletes them next time: deleting a pack
   that is gone is no error);
3. repack: live blobs of mostly dead packs are copied into new packs, which go into the store
   verified (and leave the record, should they be in it); then each manifest that listed an
   old pack is rewritten (one atomic write each) to list the new ones instead; last, the old
   packs are condemned (deleted a run later). Until a manifest is rewritten, it lists the old
   packs, which are all still there; after, the new ones, which are already there.

So every complete generation keeps every pack it lists, whenever the run stops (invariant 9).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from agent import stores
from agent.chunks import gc, ids, index
from agent.chunks.pack import PackInfo
from agent.chunks.repack import Copied, RepackError, Usage, analyse, copy_live_blobs
from agent.config import SourceConfig
from agent.core import manifest, retention
from agent.core.handover import Handover
from agent.core.manifest import Manifest, PackRef
from agent.runtime.interrupts import Interrupted
from agent.runtime.jobs import EXIT_FAILED, EXIT_OK
from agent.stores import StoreError

logger = logging.getLogger(__name__)

RECORD = "gc/condemned.json"
RECORD_FORMAT = 1
KIND = "data"


class PackStore(Protocol):
    """What garbage collection needs of a store (LocalStore and S3Store have it)."""

    @property
    def url(self) -> str: ...

    def generations(self, kind: str) -> tuple[list[str], list[str]]: ...

    def read_manifest(self, kind: str, gen: str) -> Manifest: ...

    def delete_generation(self, kind: str, gen: str) -> None: ...

    def replace_manifest(self, kind: str, m: Manifest, verify: str) -> None: ...

    def chunks(self, kind: str, gen: str, name: str) -> Iterable[bytes | memoryview]: ...

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]: ...

    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def read_named(self, name: str) -> Iterable[bytes | memoryview]: ...

    def get_bytes(self, name: str) -> bytes | None: ...

    def put_bytes(self, name: str, data: bytes) -> None: ...

    def put_file(self, name: str, path: Path, verify: str) -> None: ...

    def delete_object(self, name: str) -> None: ...

    def remove_temporaries(self, prefix: str) -> int: ...


class GarbageCollectionRefused(StoreError):
    """The store cannot be collected safely now (a manifest it holds cannot be read); nothing
    was deleted."""


@dataclass(frozen=True)
class Settings:
    """`repack_below`: live fraction (0..1) under which a pack is repacked; `pack_size`: the
    target size of new packs; `verify`: how new packs and manifests are verified (VERIFY);
    `identities`: to read encrypted indexes (without them encrypted generations' packs are
    not repacked)."""

    repack_below: float = 0.5
    pack_size: int = 32 << 20
    verify: str = "checksum"
    identities: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Target:
    """One store to collect: `name` for the log (sink store, source store); `waiting`: the
    generations still waiting to arrive there → the packs they list; `cache`: the store's
    usage cache file (SQLite); `scratch`: a directory for repacking."""

    store: PackStore
    name: str
    waiting: Mapping[str, Collection[str]]
    cache: Path
    scratch: Path


@dataclass
class Outcome:
    plan: gc.Plan
    sizes: dict[str, int]
    lines: list[str] = field(default_factory=list)
    copied: Copied | None = None
    rewritten: list[str] = field(default_factory=list)


def waiting_packs(manifests: Iterable[Manifest]) -> dict[str, list[str]]:
    """Generation → packs listed, of the chunked data generations among `manifests`."""
    return {m.generation: [p.id for p in m.packs] for m in manifests if m.chunked}


def usage_path(handover: Handover) -> Path:
    """The usage cache of every store of the source agent (see repack.Usage)."""
    return handover.state / "gc" / "usage.sqlite"


def target_for(store: PackStore, name: str, handover: Handover) -> Target:
    """The target of a source agent's store: the generations waiting in `handover` are the
    ones still to arrive there (push mode); the usage cache and the scratch directory live
    in the handover's `.state/gc/`."""
    return Target(
        store,
        name,
        waiting_packs(handover.complete(KIND)),
        usage_path(handover),
        handover.state / "gc" / "scratch",
    )


def remember_index(handover: Handover, index_sha: str, plain_index: Path) -> None:
    """Tell garbage collection which chunks the generation whose stored index has
    `index_sha` uses, from its plaintext index file `plain_index` (zstd): the builder calls
    this once it has published an index, so the packs of encrypted generations can be
    repacked on a source that cannot decrypt their indexes. Raise InvalidIndex or OSError if
    the file does not read."""
    usage = Usage(usage_path(handover))
    try:
        if not usage.knows_index(index_sha):
            usage.record_index(
                index_sha,
                (bytes.fromhex(c) for e in index.read_entries(plain_index) for c, _, _ in e.chunks),
            )
    finally:
        usage.close()


# -- the record


def settings_for(config: SourceConfig) -> Settings:
    """The garbage collection settings of a source's configuration."""
    return Settings(
        repack_below=config.repack_below / 100,
        pack_size=config.pack_size,
        verify=config.verify,
        identities=config.decrypt_identities,
    )


def read_record(store: PackStore) -> dict[str, str]:
    """The condemned record of `store`: pack id → run id. A record that is not one is logged
    and taken as empty: the packs it named are condemned again, so deletion only waits."""
    data = store.get_bytes(RECORD)
    if data is None:
        return {}
    try:
        body = json.loads(data)
        record = body["condemned"]
        if body["format"] != RECORD_FORMAT or not isinstance(record, dict):
            raise ValueError("not a condemned record")
        return {ids.check_hex(p): str(r) for p, r in record.items()}
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("%s/%s is unreadable (%s); taking it as empty", store.url, RECORD, exc)
        return {}


def write_record(store: PackStore, record: Mapping[str, str]) -> None:
    body = {"format": RECORD_FORMAT, "condemned": dict(sorted(record.items()))}
    store.put_bytes(RECORD, (json.dumps(body, indent=1) + "\n").encode())


# -- reading the store


def store_packs(store: PackStore) -> dict[str, int]:
    """Pack id → size, of every pack in the store (other names below packs/ are ignored)."""
    found = {}
    for name, size in store.list_objects(ids.PACKS_DIR + "/"):
        pack_id = ids.parse_pack_key(name)
        if pack_id is not None:
            found[pack_id] = size
    return found


def complete_manifests(store: PackStore, skip: Collection[str] = ()) -> dict[str, Manifest]:
    """Generation → manifest of every complete data generation (but `skip`). Raise
    GarbageCollectionRefused if one cannot be read: its packs would be unknown."""
    found = {}
    for gen in store.generations(KIND)[0]:
        if gen in skip:
            continue
        try:
            found[gen] = store.read_manifest(KIND, gen)
        except (manifest.InvalidManifest, StoreError, OSError) as exc:
            raise GarbageCollectionRefused(
                f"garbage collection of {store.url} skipped, nothing deleted: the manifest of "
                f"{gen} cannot be read ({exc}); run `backup-agent verify --all`"
            ) from None
    return found


# -- one run


def rotate_and_collect(
    target: Target,
    policy: retention.Policy,
    settings: Settings,
    dry_run: bool = False,
    run_id: str | None = None,
) -> list[str]:
    """Rotate the data generations of `target` by `policy` (the newest complete one is
    kept), then collect its garbage (see collect); with `dry_run` change nothing and say
    what would go. Return the lines saying what went (or would). Raise as collect does."""
    store = target.store
    complete, incomplete = store.generations(KIND)
    lines: list[str] = []
    removed: list[str] = []
    if complete and dry_run:
        planned = retention.plan(complete, policy, protect=complete[-1])
        abandoned = retention.abandoned(incomplete, complete[-1])
        removed = planned.remove
        lines.append(
            "would apply "
            + stores.retention_line(target.name, store.url, KIND, policy, planned, abandoned)
        )
    elif complete:
        lines.append(stores.rotate(store, target.name, KIND, policy, newest_verified=complete[-1]))
    return lines + collect(target, settings, run_id, dry_run, removed).lines


def prune_targets(
    targets: Iterable[tuple[Target, retention.Policy, Settings]], dry_run: bool
) -> int:
    """The `prune` command over `targets`, one after another: each one's lines on stdout; a
    store that fails is one line on stderr and exit 1, and the others go on; an interruption
    ends it at once with 128+N (what was done is safe)."""
    code = EXIT_OK
    for target, policy, settings in targets:
        try:
            lines = rotate_and_collect(target, policy, settings, dry_run=dry_run)
        except Interrupted as exc:
            print(
                f"backup-agent: prune interrupted ({exc}); what it did is safe, the next "
                "prune goes on",
                file=sys.stderr,
            )
            return 128 + exc.signum
        except StoreError as exc:
            print(f"backup-agent: {exc}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        print("\n".join(lines))
    return code


def after_rotation(
    store: PackStore, name: str, handover: Handover, settings: Settings, run_id: str
) -> list[str]:
    """Collect the garbage of `store` (called `name`) right after a push rotated it: what
    waits in `handover` is still to arrive there. `run_id` is the push job's (gc.run_id of
    its start), the same for every generation it pushes, so a pack condemned by this job is
    deleted only by a later job. Housekeeping never fails the push: a store that cannot be
    collected now is logged as a warning, and the next run collects it. Return the lines
    saying what went."""
    try:
        return collect(target_for(store, name, handover), settings, run_id).lines
    except (StoreError, OSError) as exc:
        logger.warning(
            "garbage collection of the %s %s did not finish (%s); what it did is "
            "safe, the next run goes on",
            name,
            store.url,
            exc,
        )
        return []


def collect(
    target: Target,
    settings: Settings,
    run_id: str | None = None,
    dry_run: bool = False,
    removed: Collection[str] = (),
) -> Outcome:
    """Collect the garbage of `target` (see the module's docstring), as run `run_id` (default:
    now); with `dry_run`, only say what would be done, as if the generations `removed` were
    gone already (what the rotation would remove). Return the plan and the lines saying what
    went. Raise GarbageCollectionRefused if a manifest cannot be read (nothing is deleted),
    StoreError if the store fails midway (what is done is safe; the next run goes on)."""
    store = target.store
    run = run_id or gc.run_id(datetime.now(UTC))
    if not dry_run:
        for prefix in (ids.PACKS_DIR, "gc"):
            if removed_temporaries := store.remove_temporaries(prefix):
                logger.info(
                    "removed %d temporary file(s) a killed run left below %s/%s",
                    removed_temporaries,
                    store.url,
                    prefix,
                )
    held = store_packs(store)
    manifests = complete_manifests(store, skip=removed)
    record = read_record(store)
    usage = Usage(target.cache)
    try:
        live_bytes = (
            analyse(store, manifests, held, usage, settings.identities)
            if settings.repack_below > 0
            else {}
        )
        plan = gc.decide(
            gc.Inputs(
                packs=held,
                complete={g: [p.id for p in m.packs] for g, m in manifests.items()},
                waiting=target.waiting,
                condemned=record,
                run_id=run,
                live_bytes=live_bytes,
                repack_below=settings.repack_below,
            )
        )
        outcome = Outcome(plan, dict(held))
        if not dry_run:
            _Run(target, settings, plan, manifests, usage, outcome).apply(record)
    finally:
        usage.close()
    outcome.lines = [
        f"garbage collection of the {target.name} {store.url}: {line}"
        for line in gc.describe(plan, held, dry_run)
    ] + outcome.lines
    for line in outcome.lines:
        logger.info("%s", line)
    return outcome


@dataclass
class _Run:
    """One run's application of its plan to the store (see the module's docstring)."""

    target: Target
    settings: Settings
    plan: gc.Plan
    manifests: Mapping[str, Manifest]
    usage: Usage
    outcome: Outcome

    def apply(self, record: dict[str, str]) -> None:
        store, plan = self.target.store, self.plan
        if plan.condemn or plan.uncondemn or plan.forget:
            write_record(store, plan.condemned_after_phase_one(record))
        for pack_id in plan.delete:
            store.delete_object(ids.pack_key(pack_id))
        current = plan.condemned_after_deletion(record)
        if plan.delete:
            write_record(store, current)
        if plan.repack:
            self.repack(current)

    def repack(self, record: dict[str, str]) -> None:
        store, settings, target = self.target.store, self.settings, self.target

        def put(info: PackInfo, path: Path) -> None:
            store.put_file(ids.pack_key(info.pack_id), path, settings.verify)

        shutil.rmtree(target.scratch, ignore_errors=True)
        try:
            copied = copy_live_blobs(
                self.plan.repack,
                self.usage,
                lambda p: store.read_named(ids.pack_key(p)),
                put,
                target.scratch,
                settings.pack_size,
            )
        finally:
            shutil.rmtree(target.scratch, ignore_errors=True)
        self.outcome.copied = copied
        sizes = {info.pack_id: info.size for info in copied.new}
        if any(p in record for p in sizes):
            record = {p: r for p, r in record.items() if p not in sizes}
            write_record(store, record)
        still_listed = self.rewrite_manifests(sizes)
        gone = [p for p in copied.repacked if p not in still_listed]
        if gone:
            write_record(store, {**record, **{p: self.plan.run_id for p in gone}})
        self.outcome.lines.append(
            f"repacked {len(copied.repacked)} pack(s) into {len(copied.new)} new one(s) "
            f"({sum(sizes.values())} bytes); {len(self.outcome.rewritten)} manifest(s) "
            f"rewritten; {len(gone)} old pack(s) condemned"
        )

    def rewrite_manifests(self, sizes: Mapping[str, int]) -> set[str]:
        """Rewrite each manifest that lists a repacked pack to list the new packs instead;
        return the packs every manifest lists afterwards."""
        still_listed: set[str] = set()
        for gen, m in self.manifests.items():
            listed = list(m.packs)
            try:
                old, new = self.usage.new_listing(gen)
            except RepackError as exc:
                logger.error("%s", exc)
                old, new = [], []
            if old:
                listed = [p for p in m.packs if p.id not in old]
                listed += [PackRef(p, sizes[p]) for p in new if p not in {k.id for k in listed}]
                self.target.store.replace_manifest(
                    KIND, dataclasses.replace(m, packs=tuple(listed)), self.settings.verify
                )
                self.outcome.rewritten.append(gen)
            still_listed.update(p.id for p in listed)
        return still_listed
