"""Steps of a job: one log line per step with its duration, and the name of the step that
failed, for the alert."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from agent.runtime.interrupts import Interrupted

logger = logging.getLogger(__name__)


class StepFailed(Exception):
    """A step of a job failed. `step` names it as the process does (e.g. "1.a stop the
    application"); `kept` says what the failure left in place and `free_space` how much space
    is free where the job writes, for the alert."""

    def __init__(self, step: str, error: BaseException | str, kept: str = "") -> None:
        super().__init__(f"{step}: {error}")
        self.step = step
        self.error = str(error) or type(error).__name__
        self.kept = kept
        self.free_space = ""
        self.alerted = False


class Job:
    """Runs the steps of one job, timing each and remembering which one failed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.monotonic()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as step `name`. An exception other than StepFailed leaving the block
        is turned into StepFailed(name, ...), so the alert names the step where it happened."""
        start = time.monotonic()
        logger.debug("%s: started", name)
        try:
            yield
        except StepFailed:
            raise
        except (Exception, Interrupted) as exc:
            elapsed = time.monotonic() - start
            logger.error("%s: failed after %.2f s: %s", name, elapsed, exc)
            raise StepFailed(name, exc) from exc
        elapsed = time.monotonic() - start
        logger.info("%s: done in %.2f s", name, elapsed)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started
