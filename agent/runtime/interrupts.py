"""SIGTERM and SIGINT become an exception, so every `finally` runs — above all the one that
starts the application again. Inside `shielded()` a signal waits until the block is done."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

logger = logging.getLogger(__name__)


class Interrupted(BaseException):
    """A BaseException, like KeyboardInterrupt: an `except Exception` anywhere (logging's
    `Handler.emit` among them, and libraries' retry loops) must not swallow a SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class InterruptGuard:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> InterruptGuard:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No logging here: a handler that writes to a stream the interrupted code is writing
        # to raises "reentrant call" instead of doing its job.
        global _received
        _received = signum
        if self._depth:
            self._pending = signum
            return
        raise Interrupted(signum)

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Run the block to its end even when a signal arrives; raise Interrupted afterwards."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending is not None:
            signum, self._pending = self._pending, None
            logger.warning("received %s while finishing a step", signal.Signals(signum).name)
            raise Interrupted(signum)


_received: int | None = None


def take_received() -> int | None:
    """The last signal a guard received since the last call, if any: how a caller running jobs
    (cron) learns of one even when the job ended otherwise."""
    global _received
    signum, _received = _received, None
    return signum
