"""Garbage collection of a store's packs: the decisions, as a pure function. No I/O.

A store keeps each blob once across its generations, in packs several generations share, so
removing a generation (rotation) frees no pack by itself. After rotation, `decide` says what to
do with every pack, by two-phase rules that keep invariant 9 even against a run that began
before the rotation and still counts on a pack:

- live = the packs listed by every complete manifest of the store, and by every generation
  still waiting to arrive there (push: complete generations in the handover);
- a pack neither live nor condemned is condemned (recorded with this run's id), not deleted;
- a condemned pack that is live again is un-condemned;
- a condemned pack still unreferenced in a LATER run (its run id sorts before this run's) is
  deleted, then removed from the record; one condemned by this run's id (a retried run) waits;
- a live pack that no waiting generation lists, and of which less than `repack_below` of the
  bytes are live, is repacked: its live blobs are copied into new packs, the manifests that
  list it are rewritten, and it is then unreferenced (condemned, deleted a run later).

Run ids are opaque strings that sort in the order runs happen (`run_id`: a UTC timestamp with
microseconds). A clock stepped back only delays deletions: a pack is never deleted by a run
whose id does not sort after the one that condemned it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

logger = logging.getLogger(__name__)

RUN_ID_FORMAT = "%Y-%m-%dT%H-%M-%S.%fZ"


def run_id(now: datetime) -> str:
    """The id of a garbage collection run at `now`: sortable as text in time order."""
    return now.astimezone(UTC).strftime(RUN_ID_FORMAT)


@dataclass(frozen=True)
class Inputs:
    """What a store looks like after rotation.

    `packs`: every pack the store holds, id → size in bytes. `complete`: every complete
    generation of the store → the packs its manifest lists. `waiting`: every generation still
    waiting to arrive in the store → the packs it lists. `condemned`: the phase-1 record, pack
    id → the run id that condemned it. `live_bytes`: per pack, the bytes of its blobs that a
    generation listing it needs, for the packs where that is known (none when the indexes
    cannot be read, e.g. encrypted without an identity: then nothing is repacked).
    `repack_below`: the live fraction (0..1) under which a pack is repacked."""

    packs: Mapping[str, int]
    complete: Mapping[str, Collection[str]]
    waiting: Mapping[str, Collection[str]] = field(default_factory=dict)
    condemned: Mapping[str, str] = field(default_factory=dict)
    run_id: str = ""
    live_bytes: Mapping[str, int] = field(default_factory=dict)
    repack_below: float = 0.5


@dataclass(frozen=True)
class Plan:
    """What one run does, every list sorted. `condemn`: packs to record as condemned by
    `run_id`. `uncondemn`: packs live again, dropped from the record. `delete`: packs to delete
    now, then drop from the record. `forget`: record entries of packs already gone and
    unreferenced (a run killed between a delete and the record's update). `waiting_deletion`:
    condemned packs that stay condemned (condemned by this run's id, or by a run that does not
    sort before it). `repack`: live packs whose live blobs move to new packs. `missing`: packs a
    complete generation lists that the store does not hold (`verify` tells which; nothing here
    repairs it)."""

    run_id: str
    condemn: tuple[str, ...] = ()
    uncondemn: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    forget: tuple[str, ...] = ()
    waiting_deletion: tuple[str, ...] = ()
    repack: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    def condemned_after_phase_one(self, record: Mapping[str, str]) -> dict[str, str]:
        """The record once this run's condemnations are written: what may be deleted now
        stays in it until it is gone, so a run killed in between deletes it next time."""
        after = {
            p: r for p, r in record.items() if p not in self.uncondemn and p not in self.forget
        }
        after.update((p, self.run_id) for p in self.condemn)
        return after

    def condemned_after_deletion(self, record: Mapping[str, str]) -> dict[str, str]:
        """The record once this run's deletions are done."""
        deleted = set(self.delete)
        return {p: r for p, r in self.condemned_after_phase_one(record).items() if p not in deleted}

    @property
    def changes_anything(self) -> bool:
        return bool(self.condemn or self.uncondemn or self.delete or self.forget or self.repack)


def live_packs(
    complete: Mapping[str, Collection[str]], waiting: Mapping[str, Collection[str]]
) -> set[str]:
    """The packs some complete or waiting generation lists."""
    live: set[str] = set()
    for listed in (*complete.values(), *waiting.values()):
        live.update(listed)
    return live


def decide(inputs: Inputs) -> Plan:
    """Given a store after rotation (see Inputs), return the plan of this run (see Plan).
    Raise ValueError if `run_id` is empty or `repack_below` is outside 0..1."""
    if not inputs.run_id:
        raise ValueError("a garbage collection run needs a run id")
    if not 0 <= inputs.repack_below <= 1:
        raise ValueError(f"repack_below must be within 0..1, not {inputs.repack_below}")
    live = live_packs(inputs.complete, inputs.waiting)
    held = inputs.packs
    condemned = inputs.condemned
    listed_by_waiting = live_packs({}, inputs.waiting)
    condemn = sorted(p for p in held if p not in live and p not in condemned)
    uncondemn = sorted(p for p in condemned if p in live)
    unreferenced = [p for p in condemned if p not in live]
    delete = sorted(p for p in unreferenced if p in held and condemned[p] < inputs.run_id)
    forget = sorted(p for p in unreferenced if p not in held)
    waiting_deletion = sorted(
        p for p in unreferenced if p in held and condemned[p] >= inputs.run_id
    )
    repack = sorted(
        p
        for p in held
        if p in live
        and p not in listed_by_waiting
        and p in inputs.live_bytes
        and inputs.live_bytes[p] < inputs.repack_below * held[p]
    )
    missing = sorted(p for p in live_packs(inputs.complete, {}) if p not in held)
    return Plan(
        inputs.run_id,
        tuple(condemn),
        tuple(uncondemn),
        tuple(delete),
        tuple(forget),
        tuple(waiting_deletion),
        tuple(repack),
        tuple(missing),
    )


def _some(packs: tuple[str, ...], shown: int = 10) -> str:
    more = f" and {len(packs) - shown} more" if len(packs) > shown else ""
    return ", ".join(packs[:shown]) + more


def describe(plan: Plan, sizes: Mapping[str, int], dry_run: bool) -> list[str]:
    """The lines `prune` prints: per action, how many packs and bytes, and which."""
    would = "would " if dry_run else ""
    lines = []
    for verb, packs in (
        (f"{would}condemn", plan.condemn),
        (f"{would}un-condemn", plan.uncondemn),
        (f"{would}delete", plan.delete),
        (f"{would}repack", plan.repack),
    ):
        if packs:
            size = sum(sizes.get(p, 0) for p in packs)
            lines.append(f"{verb} {len(packs)} pack(s), {size} bytes: {_some(packs)}")
    if plan.waiting_deletion:
        lines.append(
            f"{len(plan.waiting_deletion)} condemned pack(s) wait for a later run before deletion"
        )
    if plan.missing:
        lines.append(
            f"MISSING {len(plan.missing)} pack(s) that complete generations list: "
            f"{_some(plan.missing)} (run `backup-agent verify --all`)"
        )
    if not lines:
        lines.append("nothing to collect")
    return lines
