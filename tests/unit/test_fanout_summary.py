"""The sink's round of pulls, its pure parts: SINK_CONCURRENCY, how per-source results add up,
and the summary line that says how many sources were pulled and which failed."""

from __future__ import annotations

import signal

import pytest

from agent import config
from agent.config import ConfigError
from agent.runtime.interrupts import Interrupted
from agent.runtime.steps import StepFailed
from agent.sink.fanout import Outcome, merged, summary
from agent.sink.pull import PullResult

SOURCES = "a=host-a,b=host-b,c=host-c"


def sink(**extra: str) -> config.SinkConfig:
    return config.parse_sink({"SINK_SOURCES": SOURCES, **extra})


def test_four_sources_are_pulled_at_once_unless_told_otherwise():
    assert sink().concurrency == 4
    assert sink(SINK_CONCURRENCY="1").concurrency == 1
    assert sink(SINK_CONCURRENCY="64").concurrency == 64


@pytest.mark.parametrize("value", ["0", "65", "-1", "four", ""])
def test_a_concurrency_outside_1_to_64_is_refused_naming_the_setting(value):
    with pytest.raises(ConfigError) as caught:
        sink(SINK_CONCURRENCY=value)
    assert caught.value.problems == [
        f"SINK_CONCURRENCY: {value!r} is not allowed; use an integer from 1 to 64"
    ]


def test_the_results_of_the_sources_add_up_field_by_field():
    total = merged([PullResult(["a/data/G1"], 10), PullResult(), PullResult(["b/data/G1"], 5)])
    assert total == PullResult(["a/data/G1", "b/data/G1"], 15)


def failed(step: str, interrupted: bool = False) -> StepFailed:
    failure = StepFailed(step, "boom")
    if interrupted:
        failure.__cause__ = Interrupted(signal.SIGTERM)
    return failure


def test_the_summary_says_how_many_sources_were_pulled_and_which_failed():
    outcomes = [
        Outcome("a", PullResult(["a/data/G1"], 100), 1.0),
        Outcome("b", PullResult(), 0.5, failed("list the data generations waiting on b")),
        Outcome("c", PullResult(["c/data/G1", "c/data/G2"], 50), 2.0),
    ]
    line = summary("sink pull-data", sink(SINK_CONCURRENCY="2"), outcomes, 2.5)
    assert line == (
        "sink pull-data done: 2 of 3 source(s) pulled; 1 failed: b; 3 generation(s) pulled, "
        "150 bytes received, 2.50 s, at most 2 source(s) at once"
    )


def test_an_interrupted_round_says_which_were_stopped_and_how_many_never_started():
    outcomes = [
        Outcome("a", PullResult(["a/data/G1"], 100), 1.0),
        Outcome("b", PullResult(), 0.5, failed("2.a fetch", interrupted=True)),
    ]
    line = summary("sink pull-logs", sink(), outcomes, 3.0, signal.SIGTERM)
    assert line.startswith(
        "sink pull-logs interrupted: 1 of 3 source(s) pulled; 1 stopped by SIGTERM; "
        "1 not started; 1 generation(s) pulled, 100 bytes received"
    )
    assert outcomes[1].interrupted and not outcomes[0].interrupted
