"""A SIGTERM must end the job whatever code it lands in: CI once saw one arrive while logging
formatted a record, and logging's `except Exception` in `Handler.emit` swallowed it, so the
backup ran to its end and exited 0."""

from __future__ import annotations

import io
import logging
import os
import signal

import pytest

from agent.runtime.interrupts import Interrupted, InterruptGuard


class SignalsWhileFormatting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        return super().format(record)


def test_a_sigterm_while_a_record_is_logged_is_not_swallowed_by_logging() -> None:
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(SignalsWhileFormatting())
    logger = logging.getLogger("test-interrupts")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with InterruptGuard(), pytest.raises(Interrupted) as raised:
            logger.warning("stopped process %s", 1)
    finally:
        logger.removeHandler(handler)
    assert raised.value.signum == signal.SIGTERM


def test_a_sigterm_inside_an_except_exception_block_still_interrupts() -> None:
    with InterruptGuard(), pytest.raises(Interrupted):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # a bytecode boundary, where the handler runs
        except Exception:
            pytest.fail("the interruption was caught as an ordinary error")
