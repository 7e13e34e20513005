"""The cron entrypoint: the one process of an agent's container, running the agent's jobs on
their schedules, in-process and one at a time.

    start → the jobs asked for at start → loop: sleep until the next tick → run the due jobs
    one after another (a tick that passes while another job runs is skipped and logged) →
    record every outcome for `health` → SIGTERM/SIGINT: a running job ends as it does on
    SIGTERM (the application is started again), then the loop exits cleanly

`next_tick`, `missed` and `assess` are pure; `Status` is the file `health` reads.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from croniter import croniter

from agent.runtime import interrupts

logger = logging.getLogger(__name__)

# The command line of each job, as `backup-agent` takes it.
COMMANDS = {
    "run": ("source", "run"),
    "backup": ("source", "backup"),
    "push": ("source", "push"),
    "reconcile": ("source", "reconcile"),
    "pull-logs": ("sink", "pull-logs"),
    "pull-data": ("sink", "pull-data"),
}
_BUSY = 3
_HEARTBEAT = timedelta(seconds=60)


def command(job: str, role: str) -> tuple[str, ...]:
    return COMMANDS.get(job) or ("verify", "--role", role, "--latest")


def next_tick(expression: str, after: datetime) -> datetime:
    """The first time strictly after `after` the cron expression (UTC) fires."""
    return croniter(expression, after.astimezone(UTC)).get_next(datetime)


def previous_tick(expression: str, before: datetime) -> datetime:
    return croniter(expression, before.astimezone(UTC)).get_prev(datetime)


def missed(expression: str, since: datetime, until: datetime) -> list[datetime]:
    """The ticks in (since, until]: those that passed while something else ran."""
    ticks = []
    tick = next_tick(expression, since)
    while tick <= until:
        ticks.append(tick)
        tick = next_tick(expression, tick)
    return ticks


# ---------------------------------------------------------------- the status `health` reads


class Status:
    """`{"started": ..., "heartbeat": ..., "jobs": {job: {"started", "ended", "exit",
    "last_success"}}}` in one JSON file, rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.body: dict[str, object] = {"jobs": {}}

    def load(self) -> dict[str, object]:
        """The status written last. Raise FileNotFoundError or ValueError if there is none."""
        body = json.loads(self.path.read_text())
        if not isinstance(body, dict):
            raise ValueError(f"{self.path}: not a status")
        return body

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cron-", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(self.body, handle, indent=1)
        os.replace(tmp, self.path)

    def begin(self, now: datetime) -> None:
        try:
            previous = self.load()
        except (FileNotFoundError, ValueError):
            previous = {}
        jobs = previous.get("jobs", {}) if isinstance(previous, dict) else {}
        self.body = {"started": _stamp(now), "heartbeat": _stamp(now), "jobs": jobs}
        self._write()

    def heartbeat(self, now: datetime) -> None:
        self.body["heartbeat"] = _stamp(now)
        self._write()

    def record(self, job: str, started: datetime, ended: datetime, code: int) -> None:
        jobs = self.body["jobs"]
        assert isinstance(jobs, dict)
        entry = jobs.setdefault(job, {})
        entry.update(started=_stamp(started), ended=_stamp(ended), exit=code)
        if code == 0:
            entry["last_success"] = _stamp(ended)
        self.body["heartbeat"] = _stamp(ended)
        self._write()


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse(stamp: object) -> datetime | None:
    if not isinstance(stamp, str):
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def assess(
    status: dict[str, object], schedules: Sequence[tuple[str, str]], now: datetime
) -> list[str]:
    """Return what is unhealthy (empty: healthy): a scheduler that stopped beating, a job whose
    last run failed (not skipped, not interrupted by a signal), or a job that is late.

    A job is late when it has not succeeded since it was due: by the second tick after its last
    success (or the scheduler's start; one tick may be missed, e.g. to a held lock), plus the
    time the jobs' last runs took (jobs run one at a time, so a due job may wait for the others
    and then takes its own time), plus one heartbeat of slack."""
    problems = []
    heartbeat = _parse(status.get("heartbeat"))
    if heartbeat is None or now - heartbeat > 3 * _HEARTBEAT:
        problems.append(f"the scheduler has not reported since {status.get('heartbeat')}")
    started = _parse(status.get("started")) or now
    jobs = status.get("jobs", {})
    assert isinstance(jobs, dict)
    busy = sum((_duration(entry) for entry in jobs.values()), timedelta())
    for job, expression in schedules:
        entry = jobs.get(job, {})
        code = entry.get("exit")
        # Skipped (lock held) and interrupted (the container was stopping: 128+N) runs are not
        # failures; a job that keeps not succeeding is caught by the rule below.
        if code not in (None, 0, _BUSY) and not (isinstance(code, int) and code > 128):
            problems.append(
                f"{job}: the last run (started {entry.get('started')}) failed with exit code {code}"
            )
            continue
        last_success = _parse(entry.get("last_success"))
        since = max(started, last_success or started)
        due = next_tick(expression, next_tick(expression, since))
        if now > due + busy + _HEARTBEAT:
            problems.append(
                f"{job}: no successful run since {due:%Y-%m-%d %H:%M} UTC "
                f"(last: {entry.get('last_success', 'never')})"
            )
    return problems


def _duration(entry: object) -> timedelta:
    """How long a job's last run took, from its status entry (zero when unknown)."""
    if not isinstance(entry, dict):
        return timedelta()
    try:
        began, ended = _parse(entry.get("started")), _parse(entry.get("ended"))
    except ValueError:
        return timedelta()
    if began is None or ended is None or ended < began:
        return timedelta()
    return ended - began


# ---------------------------------------------------------------- the loop


class Scheduler:
    """Runs `run(job)` for each job on its schedule until `stop()`."""

    def __init__(
        self,
        schedules: Sequence[tuple[str, str]],
        run: Callable[[str], int],
        status: Status,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.schedules = list(schedules)
        self.run = run
        self.status = status
        self.clock = clock
        self._stopping = threading.Event()
        self._signal: int | None = None

    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Also the SIGTERM/SIGINT handler between jobs; it must not log (see interrupts)."""
        self._signal = self._signal or signum
        self._stopping.set()

    def _run_job(self, job: str) -> None:
        started = self.clock()
        logger.info("cron: %s started", job)
        code = self.run(job)
        ended = self.clock()
        self.status.record(job, started, ended, code)
        logger.info(
            "cron: %s ended with exit code %d after %.1f s",
            job,
            code,
            (ended - started).total_seconds(),
        )
        signum = interrupts.take_received()
        if signum is not None or code > 128:  # a signal came during the job: stopping
            self.stop(signum)

    def _reschedule(self, job: str, due: dict[str, datetime], finished: datetime) -> None:
        """After `job` ran: its ticks that passed while it ran are skipped (one run at a time);
        another job that came due meanwhile runs next, once, however many of its ticks
        passed."""
        for other, expression in self.schedules:
            start = due[other] if other == job else min(due[other], finished)
            passed = missed(expression, start, finished)
            if passed:
                why = "it was still running" if other == job else f"{job} ran"
                logger.warning(
                    "cron: skipped %d tick(s) of %s while %s (%s)",
                    len(passed),
                    other,
                    why,
                    ", ".join(_stamp(t) for t in passed[:3]),
                )
            if other == job:
                due[other] = next_tick(expression, finished)

    def serve(self, at_start: Sequence[str]) -> int:
        """Run the jobs of `at_start`, then the schedule, until stopped. Return 0."""
        self.status.begin(self.clock())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.stop)
        for job in at_start:
            if self._stopping.is_set():
                return 0
            self._run_job(job)
        now = self.clock()
        due = {job: next_tick(expression, now) for job, expression in self.schedules}
        for job, expression in self.schedules:
            logger.info("cron: %s at %s (next %s)", job, expression, _stamp(due[job]))
        while not self._stopping.is_set() and due:
            job = min(due, key=lambda j: due[j])
            wait = (due[job] - self.clock()).total_seconds()
            if wait > 0:
                self._stopping.wait(min(wait, _HEARTBEAT.total_seconds()))
                self.status.heartbeat(self.clock())
                continue
            self._run_job(job)
            self._reschedule(job, due, self.clock())
        received = f" on {signal.Signals(self._signal).name}" if self._signal else ""
        logger.info("cron: stopped%s", received)
        return 0
