"""Retention: which generations a store keeps. Pure logic, used by every store.

Like restic's `forget --keep-*`: keep the newest `last` generations, plus the newest
generation of each of the newest `daily` days, `weekly` ISO weeks and `monthly` months that
have one. The newest generation is always kept. Only complete generations are given here;
incomplete ones are handled by `abandoned`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from agent.core import generation


@dataclass(frozen=True)
class Policy:
    last: int
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def describe(self) -> str:
        return f"last {self.last}, daily {self.daily}, weekly {self.weekly}, monthly {self.monthly}"


@dataclass(frozen=True)
class Plan:
    keep: list[str]
    remove: list[str]


def _bucket_keep(
    ordered: list[tuple[str, datetime]], count: int, bucket: Callable[[datetime], object]
) -> set[str]:
    kept: set[str] = set()
    seen: set[object] = set()
    for gen, moment in ordered:
        if len(seen) >= count:
            break
        key = bucket(moment)
        if key not in seen:
            seen.add(key)
            kept.add(gen)
    return kept


def plan(complete: Iterable[str], policy: Policy, protect: str | None = None) -> Plan:
    """Given the ids of a store's complete generations, return which to keep and which to
    remove (both newest first); `protect` (the generation just verified) is always kept.
    Raise InvalidGenerationId for a malformed id."""
    ordered = sorted(
        ((g, generation.parse(g)) for g in set(complete)), key=lambda x: x[1], reverse=True
    )
    keep = {g for g, _ in ordered[: max(policy.last, 1)]}
    if protect is not None:
        keep.add(protect)
    keep |= _bucket_keep(ordered, policy.daily, lambda m: m.date())
    keep |= _bucket_keep(ordered, policy.weekly, lambda m: m.isocalendar()[:2])
    keep |= _bucket_keep(ordered, policy.monthly, lambda m: (m.year, m.month))
    return Plan(
        keep=[g for g, _ in ordered if g in keep], remove=[g for g, _ in ordered if g not in keep]
    )


def abandoned(incomplete: Iterable[str], newest_verified: str) -> list[str]:
    """Return the incomplete generations (no manifest) that are older than the newest verified
    one: a later run has completed since, so nobody is still writing them."""
    limit = generation.parse(newest_verified)
    return sorted(g for g in incomplete if generation.is_valid(g) and generation.parse(g) < limit)
