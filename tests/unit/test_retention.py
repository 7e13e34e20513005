from datetime import UTC, datetime, timedelta

import pytest

from agent.core import generation
from agent.core.retention import Policy, abandoned, plan


def ids_every(hours: int, count: int, start: datetime) -> list[str]:
    return [generation.format_id(start + timedelta(hours=hours * i)) for i in range(count)]


def test_keep_last_keeps_the_newest_n():
    ids = ids_every(1, 5, datetime(2026, 1, 1, tzinfo=UTC))
    result = plan(ids, Policy(last=2))
    assert result.keep == ids[::-1][:2]
    assert result.remove == ids[::-1][2:]


def test_twelve_generations_over_weeks_keep_exactly_the_right_ones():
    # every 3 days from Mon 2026-01-05 02:00 for 12 generations: Jan 5 ... Feb 7
    ids = [
        generation.format_id(datetime(2026, 1, 5, 2, tzinfo=UTC) + timedelta(days=3 * i))
        for i in range(12)
    ]
    result = plan(ids, Policy(last=2, daily=3, weekly=3, monthly=2))
    expected = {
        "2026-02-07T02-00-00Z",
        "2026-02-04T02-00-00Z",  # last 2 (and newest 2 days)
        "2026-02-01T02-00-00Z",  # third day; also newest of ISO week 5
        # weekly: ISO week 6 -> Feb 7, week 5 (Jan 26 - Feb 1) -> Feb 1, week 4 -> Jan 23
        "2026-01-23T02-00-00Z",
        # monthly: Feb -> Feb 7, Jan -> Jan 29
        "2026-01-29T02-00-00Z",
    }
    assert set(result.keep) == expected
    assert set(result.remove) == set(ids) - expected
    assert result.keep == sorted(expected, reverse=True)


def test_the_newest_generation_is_always_kept_even_with_a_zero_policy():
    ids = ids_every(24, 3, datetime(2026, 1, 1, tzinfo=UTC))
    assert plan(ids, Policy(last=0)).keep == [ids[-1]]


def test_several_generations_a_day_keep_only_the_newest_of_the_day_for_daily():
    day = datetime(2026, 3, 1, tzinfo=UTC)
    ids = ids_every(6, 8, day)  # two days, four a day
    result = plan(ids, Policy(last=1, daily=2))
    assert result.keep == [ids[7], ids[3]]


def test_malformed_ids_are_refused():
    with pytest.raises(generation.InvalidGenerationId):
        plan(["../etc"], Policy(last=1))


def test_incomplete_generations_are_abandoned_only_once_a_newer_one_is_verified():
    assert abandoned(
        ["2026-01-01T00-00-00Z", "2026-01-03T00-00-00Z", "junk"], "2026-01-02T00-00-00Z"
    ) == ["2026-01-01T00-00-00Z"]
