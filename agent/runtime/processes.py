"""The agent's child processes (ssh, rsync): each dies with the agent, however the agent dies,
and what it prints is read only up to a bound — so neither a killed job nor a hostile source
can leave a transfer running behind the agent or fill its memory."""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from agent.runtime.interrupts import Interrupted

logger = logging.getLogger(__name__)

KEPT = 64 * 1024  # what is kept of standard error, and of standard output without a limit
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class OutputTooLarge(Exception):
    """The child wrote more than its limit to standard output; it was killed."""


class Cancellation:
    """How a thread that caught a signal stops the children of other threads: SIGTERM and SIGINT
    reach only the main thread, so `run` in a thread working `under` a Cancellation stops its
    child once the Cancellation is `cancel`led, as it does when interrupted itself, and raises
    Interrupted; it starts none after that. A pipe wakes every waiting thread at once."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        self.signum: int | None = None

    def cancel(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            os.write(self._write, b"x")  # never read: every selector sees it readable

    def fileno(self) -> int:
        """Readable once cancelled (for selectors)."""
        return self._read

    def check(self) -> None:
        """Raise Interrupted if cancelled."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)

    @contextmanager
    def under(self) -> Iterator[None]:
        """Make this the Cancellation of `run` in the calling thread for the block."""
        _local.cancellation = self
        try:
            yield
        finally:
            _local.cancellation = None


_local = threading.local()


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    limit: int | None = None,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> Outcome:
    """Run `argv` to its end, given `stdin` (small: written whole before its output is read;
    none: /dev/null); return its exit code, its standard output (all of it, at most
    `limit` bytes; without a limit its last KEPT bytes) and the last KEPT bytes of its standard
    error. Raise OutputTooLarge, the child killed, when it writes more than `limit` bytes.

    The child is killed when the agent dies, however it dies (PR_SET_PDEATHSIG; for rsync
    that is the process that talks to the source, its receiver then ends as on a lost
    connection and keeps its partial file). If the agent is interrupted meanwhile (SIGTERM and
    SIGINT become exceptions), the child is stopped with SIGTERM and waited for, reading its
    output, so that rsync keeps the partial file (subprocess.run would SIGKILL it); then the
    interruption is raised again. The same happens in a thread whose Cancellation (see
    Cancellation.under) is cancelled: a job's other threads are never interrupted themselves."""
    cancellation: Cancellation | None = getattr(_local, "cancellation", None)
    if cancellation is not None:
        cancellation.check()
    parent = os.getpid()
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: _die_with(parent),
    ) as process:
        if process.stdin is not None:
            try:
                process.stdin.write(stdin or b"")
                process.stdin.close()
            except BrokenPipeError:  # it ended without reading: its exit code tells why
                pass
        try:
            stdout, stderr = _collect(process, limit, cancellation=cancellation)
        except OutputTooLarge:
            process.kill()
            raise
        except BaseException:
            process.terminate()
            try:
                _collect(process, None, timeout=30)
            except (TimeoutError, subprocess.TimeoutExpired):
                process.kill()
            raise
    return Outcome(
        process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )


def _die_with(parent: int) -> None:
    """In the child, before it runs the program: ask to be killed when the agent dies, and
    end at once if it already has."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _collect(
    process: subprocess.Popen[bytes],
    limit: int | None,
    timeout: float | None = None,
    cancellation: Cancellation | None = None,
) -> tuple[bytes, bytes]:
    """Read both pipes of `process` to their end and wait for it. Raise OutputTooLarge beyond
    `limit`, TimeoutError or subprocess.TimeoutExpired after `timeout` seconds, Interrupted once
    `cancellation` is cancelled."""
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = bytearray(), bytearray()
    buffers = {process.stdout.fileno(): stdout, process.stderr.fileno(): stderr}
    deadline = None if timeout is None else time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        if cancellation is not None:
            selector.register(cancellation, selectors.EVENT_READ)
        while len(selector.get_map()) > (cancellation is not None):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            for key, _ in selector.select(left):
                if key.fileobj is cancellation:
                    cancellation.check()
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fd)
                    continue
                buffer = buffers[key.fd]
                buffer += data
                if buffer is stdout and limit is not None:
                    if len(buffer) > limit:
                        raise OutputTooLarge(f"more than {limit} bytes")
                elif len(buffer) > KEPT:
                    del buffer[:-KEPT]
    process.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return bytes(stdout), bytes(stderr)
