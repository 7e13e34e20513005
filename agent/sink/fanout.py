"""A round of pulls: `sink pull-data` and `sink pull-logs` take every source of SINK_SOURCES,
up to SINK_CONCURRENCY at once, each in a thread of its own (the work is ssh and rsync, so
threads suffice); agent.sink.pull does one source.

    every source, at most SINK_CONCURRENCY at a time:
        pull it (list → fetch → verify → move in → rotate → acknowledge), every line it logs
        marked `[<source id>]`; if it fails: its own alert (the source, the step, the error),
        and the others go on
    → the summary line: how many sources were pulled, which failed; the job fails (exit 1)
      if any did, without a second alert
    SIGTERM/SIGINT (they reach the main thread only): no further source starts, every
    running ssh and rsync stops as an interrupted one does (rsync keeps its partial file),
    the job ends with 128+N and one alert naming where each source was stopped
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.chunks import gc
from agent.config import SinkConfig, SourceEndpoint
from agent.runtime import alerts, logsetup, processes
from agent.runtime.interrupts import Interrupted
from agent.runtime.steps import Job, StepFailed
from agent.sink.pull import JOBS, PullResult, pull_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What pulling one source came to: its result so far and, if it did not finish, why."""

    source: str
    result: PullResult
    seconds: float
    failure: StepFailed | None = None

    @property
    def interrupted(self) -> bool:
        return self.failure is not None and isinstance(self.failure.__cause__, Interrupted)


def pull(config: SinkConfig, kind: str) -> PullResult:
    """Pull `kind` from every configured source, up to `config.concurrency` at once; return
    what they pulled together. A source that fails is alerted and the others still run. Raise
    StepFailed (already alerted) at the end if any source failed; on SIGTERM/SIGINT, raise
    StepFailed caused by Interrupted (or Interrupted) once every running pull has stopped."""
    job = Job(JOBS[kind])
    outcomes: list[Outcome] = []
    try:
        outcomes = _pull_all(config, kind, job, gc.run_id(datetime.now(UTC)))
    except _Stopped as stopped:
        outcomes = stopped.outcomes
        logger.error("%s", summary(JOBS[kind], config, outcomes, job.elapsed, stopped.signum))
        raise _interruption(stopped) from stopped.interruption
    failed = [o for o in outcomes if o.failure is not None]
    line = summary(JOBS[kind], config, outcomes, job.elapsed)
    if not failed:
        logger.info("%s", line)
        return merged(o.result for o in outcomes)
    logger.error("%s", line)
    failure = StepFailed(
        f"pull from {len(failed)} of {len(outcomes)} source(s): "
        + ", ".join(o.source for o in failed),
        "see the alert of each source",
        kept=f"the other {len(outcomes) - len(failed)} source(s) were pulled",
    )
    failure.alerted = True
    raise failure


class _Stopped(Exception):
    """The job was interrupted; every pull has stopped. `outcomes`: those that ended."""

    def __init__(self, interruption: Interrupted, outcomes: list[Outcome]) -> None:
        super().__init__(str(interruption))
        self.interruption = interruption
        self.signum = interruption.signum
        self.outcomes = outcomes


def _pull_all(config: SinkConfig, kind: str, job: Job, run: str) -> list[Outcome]:
    """Pull every source in a pool of threads; return their outcomes in SINK_SOURCES order;
    `run` is the job's garbage-collection run id, one for all its sources.
    Raise _Stopped once the pool is empty if the main thread was interrupted meanwhile."""
    cancellation = processes.Cancellation()
    pool = ThreadPoolExecutor(
        max(1, min(config.concurrency, len(config.sources))), thread_name_prefix="pull"
    )
    futures: list[Future[Outcome]] = []
    try:
        for source in config.sources:
            futures.append(pool.submit(_pull_one, config, source, kind, job, run, cancellation))
        return [future.result() for future in futures]
    except Interrupted as interruption:
        # Only the main thread sees the signal: stop the children of the others, start no
        # further source, and wait until every running pull has ended.
        cancellation.cancel(interruption.signum)
        pool.shutdown(wait=True, cancel_futures=True)
        ended = [f.result() for f in futures if f.done() and not f.cancelled()]
        raise _Stopped(interruption, ended) from None
    finally:
        pool.shutdown(wait=True)
        cancellation.close()


def _pull_one(
    config: SinkConfig,
    source: SourceEndpoint,
    kind: str,
    job: Job,
    run: str,
    cancellation: processes.Cancellation,
) -> Outcome:
    """Pull `kind` from `source` in this thread; alert its failure (not an interruption)."""
    result = PullResult()
    start = time.monotonic()
    with logsetup.for_source(source.id), cancellation.under():
        try:
            pull_source(config, source, kind, job, result, run)
        except StepFailed as failure:
            return _failed(config, source, kind, result, start, failure)
        except Interrupted as exc:
            interrupted = StepFailed("interrupted", exc)
            interrupted.__cause__ = exc
            return _failed(config, source, kind, result, start, interrupted)
        except Exception as exc:  # a bug must not stop the other sources
            logger.exception("pulling %s failed unexpectedly", source.id)
            return _failed(config, source, kind, result, start, StepFailed("unexpected error", exc))
        seconds = time.monotonic() - start
        logger.info(
            "pulled: %d generation(s), %d bytes in, %.2f s",
            len(result.pulled),
            result.bytes_received,
            seconds,
        )
        return Outcome(source.id, result, seconds)


def _failed(
    config: SinkConfig,
    source: SourceEndpoint,
    kind: str,
    result: PullResult,
    start: float,
    failure: StepFailed,
) -> Outcome:
    outcome = Outcome(source.id, result, time.monotonic() - start, failure)
    if outcome.interrupted:
        logger.warning("stopped at %s: %s", failure.step, failure.error)
    else:
        logger.error("failed at %s after %.2f s: %s", failure.step, outcome.seconds, failure.error)
        alerts.send(
            config.mail,
            alerts.Alert(source.id, JOBS[kind], failure.step, failure.error, failure.kept),
        )
    return outcome


def _interruption(stopped: _Stopped) -> BaseException:
    """What the job raises when interrupted: the StepFailed of the first pull that was stopped
    (its step, with where the others were), or the Interrupted itself if none was running."""
    interrupted = [o for o in stopped.outcomes if o.interrupted]
    if not interrupted:
        return stopped.interruption
    first = interrupted[0].failure
    assert first is not None
    others = ", ".join(f"{o.source} at {o.failure.step}" for o in interrupted[1:] if o.failure)
    failure = StepFailed(
        first.step,
        f"{interrupted[0].source}: {first.error}" + (f"; also stopped: {others}" if others else ""),
        kept=first.kept,
    )
    return failure


def merged(results: Iterable[PullResult]) -> PullResult:
    """The per-source results together, field by field: lists joined, counts added."""
    total = PullResult()
    for result in results:
        for item in dataclasses.fields(total):
            setattr(total, item.name, getattr(total, item.name) + getattr(result, item.name))
    return total


def summary(
    job: str,
    config: SinkConfig,
    outcomes: list[Outcome],
    seconds: float,
    signum: int | None = None,
) -> str:
    """The job's last line: how many sources were pulled and which failed (or were stopped, or
    never started, when `signum` interrupted the job)."""
    total = merged(o.result for o in outcomes)
    done = [o for o in outcomes if o.failure is None]
    failed = [o.source for o in outcomes if o.failure is not None and not o.interrupted]
    stopped = [o.source for o in outcomes if o.interrupted]
    parts = [f"{len(done)} of {len(config.sources)} source(s) pulled"]
    if failed:
        parts.append(f"{len(failed)} failed: {', '.join(failed)}")
    if signum is not None:
        parts.append(f"{len(stopped)} stopped by {signal.Signals(signum).name}")
        parts.append(f"{len(config.sources) - len(outcomes)} not started")
    outcome = "done" if signum is None else "interrupted"
    return (
        f"{job} {outcome}: {'; '.join(parts)}; {len(total.pulled)} generation(s) pulled, "
        f"{total.bytes_received} bytes received, {seconds:.2f} s, "
        f"at most {config.concurrency} source(s) at once"
    )
