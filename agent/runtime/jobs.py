"""How every job of the agent runs: under the agent's lock, with SIGTERM/SIGINT turned into
exceptions, its outcome mapped to an exit code and every failure alerted.

Exit codes: 0 done; 1 the job failed (an alert was sent); 2 invalid configuration or usage
(nothing was touched); 3 another job of this agent is running (this run was skipped);
128+N interrupted by signal N (the application was started again).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from agent import config
from agent.monitoring import hooks
from agent.monitoring.context import Monitoring
from agent.monitoring.state import FAILURE, INTERRUPTED, SUCCESS, Run
from agent.runtime import alerts, lock
from agent.runtime.interrupts import Interrupted, InterruptGuard
from agent.runtime.lock import LockBusy
from agent.runtime.steps import StepFailed

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BUSY = 3


class UsageError(Exception):
    """The command cannot run as given; nothing was touched."""


def values(args: argparse.Namespace) -> config.Values:
    """The raw settings: the environment, over the `--env-file` of `args`."""
    return config.read_values(os.environ, args.env_file)


def exclusive(lock_path: Path, run: Callable[[InterruptGuard], int]) -> int:
    """Run while holding the agent's lock, with SIGTERM/SIGINT turned into exceptions; a run
    that finds the lock taken is skipped with exit code 3."""
    try:
        with lock.exclusive(lock_path), InterruptGuard() as guard:
            return run(guard)
    except LockBusy as exc:
        logger.error("%s", exc)
        return EXIT_BUSY


def run_job(
    job: str,
    body: Callable[[InterruptGuard], object],
    source: str,
    mail: config.MailConfig,
    guard: InterruptGuard,
    monitors: Monitoring | None = None,
) -> int:
    """Run a job's body and turn its outcome into an exit code, alerting on every failure;
    `monitors` hear of its start and its end (their failures never change the outcome)."""
    started = time.time()
    code, outcome, error, figures = EXIT_OK, SUCCESS, "", {}
    try:
        hooks.start(monitors, job)
        figures = hooks.figures(body(guard))
    except StepFailed as failure:
        cause = failure.__context__ if isinstance(failure.__context__, StepFailed) else None
        error = failure.error + (f" (while handling: {cause})" if cause else "")
        if not failure.alerted:
            alerts.send(
                mail,
                alerts.Alert(
                    source, job, failure.step, error, failure.kept, free_space=failure.free_space
                ),
            )
        error = f"{failure.step}: {error}"
        outcome, code = FAILURE, EXIT_FAILED
        if isinstance(failure.__cause__, Interrupted):
            outcome, code = INTERRUPTED, 128 + failure.__cause__.signum
    except Interrupted as exc:
        alerts.send(
            mail,
            alerts.Alert(
                source,
                job,
                "interrupted",
                str(exc),
                "everything as it was; the next run takes it up again",
            ),
        )
        outcome, code, error = INTERRUPTED, 128 + exc.signum, str(exc)
    except Exception as exc:
        logger.exception("%s failed unexpectedly", job)
        alerts.send(mail, alerts.Alert(source, job, "unexpected error", repr(exc), ""))
        outcome, code, error = FAILURE, EXIT_FAILED, repr(exc)
    try:
        with guard.shielded():  # a signal now waits until every monitor has heard the end
            hooks.finish(monitors, Run(job, started, time.time(), outcome, error=error, **figures))
    except Interrupted as exc:
        code = code if outcome == INTERRUPTED else 128 + exc.signum
    return code


def role(args: argparse.Namespace, values: Mapping[str, str]) -> str:
    """The role of `--role`, else the one whose identifying setting is set. Raise UsageError if
    that cannot be told."""
    if args.role:
        return str(args.role)
    roles = [
        role
        for role, env in ((config.SOURCE, "SOURCE_ID"), (config.SINK, "SINK_SOURCES"))
        if values.get(env)
    ]
    if len(roles) != 1:
        raise UsageError(
            "cannot tell the role: set SOURCE_ID (source) or SINK_SOURCES (sink), or pass --role"
        )
    return roles[0]
