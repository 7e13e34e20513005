"""The pure parts of the cron entrypoint: ticks, missed ticks, health, and its settings."""

from datetime import UTC, datetime

import pytest

from agent import config
from agent.config import ConfigError
from agent.runtime.cron import assess, missed, next_tick

T0 = datetime(2026, 11, 29, 1, 59, 30, tzinfo=UTC)


def at(hour: int, minute: int, second: int = 0, day: int = 29) -> datetime:
    return datetime(2026, 11, day, hour, minute, second, tzinfo=UTC)


def test_next_tick_is_strictly_after_and_in_utc():
    assert next_tick("0 2 * * *", T0) == at(2, 0)
    assert next_tick("0 2 * * *", at(2, 0)) == at(2, 0, day=30)
    assert next_tick("* * * * * */10", at(2, 0, 1)) == at(2, 0, 10)


def test_ticks_that_pass_during_a_run_are_listed():
    assert missed("*/15 * * * *", at(2, 0), at(2, 50)) == [at(2, 15), at(2, 30), at(2, 45)]
    assert missed("*/15 * * * *", at(2, 0), at(2, 14)) == []


def status(jobs: dict, started: datetime = at(0, 0), heartbeat: datetime = at(3, 0)) -> dict:
    return {"started": started.isoformat(), "heartbeat": heartbeat.isoformat(), "jobs": jobs}


def test_healthy_when_the_last_run_succeeded_in_time():
    jobs = {"run": {"exit": 0, "started": "x", "last_success": "2026-11-29T02:10:00Z"}}
    assert assess(status(jobs), [("run", "0 * * * *")], at(3, 0, 30)) == []


def test_a_failed_last_run_is_unhealthy():
    jobs = {
        "run": {
            "exit": 1,
            "started": "2026-11-29T03:00:00Z",
            "last_success": "2026-11-29T02:10:00Z",
        }
    }
    [problem] = assess(status(jobs), [("run", "0 * * * *")], at(3, 0, 30))
    assert "failed with exit code 1" in problem


def test_a_run_skipped_for_the_lock_or_interrupted_by_sigterm_is_not_a_failure():
    for code in (3, 143):
        jobs = {"run": {"exit": code, "started": "x", "last_success": "2026-11-29T02:10:00Z"}}
        assert assess(status(jobs), [("run", "0 * * * *")], at(3, 0, 30)) == []


def test_no_success_for_two_ticks_is_unhealthy_and_a_fresh_start_is_not():
    old = {"run": {"exit": 0, "started": "x", "last_success": "2026-11-29T00:10:00Z"}}
    [problem] = assess(status(old), [("run", "0 * * * *")], at(3, 0, 30))
    assert "no successful run since 2026-11-29 02:00" in problem
    assert assess(status({}, started=at(2, 30)), [("run", "0 * * * *")], at(3, 0, 30)) == []


def test_a_job_longer_than_its_interval_is_healthy_right_after_a_success():
    """A per-second schedule and a 3 s backup: ticks pass while it runs, and `health` a few
    seconds after the last success must not call the agent unhealthy (a CI run saw that)."""
    jobs = {
        "backup": {
            "exit": 0,
            "started": "2026-11-29T02:59:53Z",
            "ended": "2026-11-29T02:59:56Z",
            "last_success": "2026-11-29T02:59:56Z",
        }
    }
    assert assess(status(jobs), [("backup", "* * * * * *")], at(3, 0, 0)) == []
    late = at(3, 1, 30)
    [problem] = assess(status(jobs, heartbeat=late), [("backup", "* * * * * *")], late)
    assert "backup: no successful run since" in problem


def test_a_job_may_wait_for_the_other_jobs_before_it_is_late():
    jobs = {
        "pull-data": {
            "exit": 0,
            "started": "2026-11-29T01:00:00Z",
            "ended": "2026-11-29T02:30:00Z",
            "last_success": "2026-11-29T02:30:00Z",
        },
        "pull-logs": {
            "exit": 0,
            "started": "2026-11-29T00:45:00Z",
            "ended": "2026-11-29T00:45:05Z",
            "last_success": "2026-11-29T00:45:05Z",
        },
    }
    schedules = [("pull-data", "0 1 * * *"), ("pull-logs", "*/15 * * * *")]
    assert assess(status(jobs), schedules, at(2, 31)) == []


def test_a_silent_scheduler_is_unhealthy():
    [problem] = assess(status({}, started=at(2, 59), heartbeat=at(1, 0)), [], at(3, 0))
    assert "has not reported" in problem


def test_cron_settings_are_checked_together():
    with pytest.raises(ConfigError) as caught:
        config.parse_cron({"CRON_RUN": "61 * * * *", "CRON_AT_START": "pull-data"}, "source")
    assert [p.split(":")[0] for p in caught.value.problems] == ["CRON_RUN", "CRON_AT_START"]
    with pytest.raises(ConfigError, match="no job is scheduled"):
        config.parse_cron({}, "sink")
    sink = config.parse_cron(
        {
            "CRON_PULL_LOGS": "*/15 * * * *",
            "CRON_VERIFY": "0 5 * * 0",
            "CRON_AT_START": "pull-logs",
        },
        "sink",
    )
    assert sink.schedules == (("pull-logs", "*/15 * * * *"), ("verify", "0 5 * * 0"))
    assert sink.at_start == ("pull-logs",)
