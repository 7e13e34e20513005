from datetime import UTC, datetime

from agent.core.manifest import Manifest
from agent.source.backup import stale

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def waiting(*gens: str, kind: str = "data") -> list[Manifest]:
    return [
        Manifest(
            source_id="s",
            kind=kind,
            generation=g,
            created_at=g,
            downtime_seconds=0,
            agent_version="0",
            files=(),
        )
        for g in gens
    ]


def test_with_no_limits_any_waiting_generation_is_stale():
    assert stale(waiting("2026-11-29T11-59-00Z"), NOW, 0, 0)
    assert not stale([], NOW, 0, 0)


def test_generations_younger_than_the_age_limit_are_not_stale():
    assert not stale(waiting("2026-11-29T02-00-00Z", "2026-11-29T08-00-00Z"), NOW, 26, 0)
    assert stale(waiting("2026-11-28T09-00-00Z"), NOW, 26, 0)


def test_too_many_waiting_generations_are_stale_whatever_their_age():
    young = waiting("2026-11-29T10-00-00Z", "2026-11-29T11-00-00Z", "2026-11-29T11-30-00Z")
    assert stale(young, NOW, 26, 2)
    assert not stale(young, NOW, 26, 3)


def test_the_count_limit_applies_to_each_kind_on_its_own():
    two = ("2026-11-29T10-00-00Z", "2026-11-29T11-00-00Z")
    assert not stale(waiting(*two) + waiting(*two, kind="logs"), NOW, 26, 2)
    assert stale(waiting(*two) + waiting(*two, "2026-11-29T11-30-00Z", kind="logs"), NOW, 26, 2)
