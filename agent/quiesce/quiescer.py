"""The app quiescer's interface and factory, and the window in which the application is stopped.

`QUIESCE_MODE` chooses the quiescer (`open_quiescer`): `stop` and `pause` are the Docker one
(`quiesce.docker`); `signal` (SIGSTOP of the application's processes from a sidecar,
`quiesce.signal`) and `scale` (Kubernetes workloads scaled to 0, `quiesce.scale`) have the same
interface: `select`, `quiesce`, `resume`, `reconcile`, `run_label_commands`, `nothing_selected`,
`verb`. Each writes a crash-safe record (`quiesce.record`) before it stops anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from agent.config import LabelSelector, SourceConfig
from agent.quiesce.docker import DockerQuiescer, connect
from agent.quiesce.scale import ScaleQuiescer
from agent.quiesce.signal import SignalQuiescer
from agent.runtime.interrupts import InterruptGuard
from agent.runtime.steps import Job

logger = logging.getLogger(__name__)


class AppQuiescer(Protocol):
    """What `application_stopped` and its callers need of a quiescer, whatever its mode."""

    @property
    def verb(self) -> str: ...

    def select(self, selector: LabelSelector, project: str) -> list[Any]: ...

    def nothing_selected(self, selector: LabelSelector) -> str: ...

    def quiesce(self, selected: list[Any]) -> None: ...

    def resume(self) -> None: ...

    def reconcile(self) -> list[str]: ...

    def run_label_commands(
        self, label: str, selector: LabelSelector, project: str, source_id: str
    ) -> list[str]: ...


TARGETS = {
    "stop": "the Docker engine",
    "pause": "the Docker engine",
    "signal": "the application's processes",
    "scale": "the Kubernetes API",
}


def open_quiescer(config: SourceConfig, record_path: Path) -> AppQuiescer:
    """Return the quiescer of `config.quiesce_mode`, keeping its crash-safe record at
    `record_path`. Raise DockerUnavailable (or the mode's own error) naming the cause and the
    fix when what it works through cannot be reached."""
    if config.quiesce_mode == "signal":
        return SignalQuiescer(record_path, config.signal_processes, config.stop_timeout)
    if config.quiesce_mode == "scale":
        return ScaleQuiescer(
            record_path, config.k8s_namespace, config.k8s_workloads, config.stop_timeout
        )
    return DockerQuiescer(
        connect(config.docker_host, config.stop_timeout),
        record_path,
        config.quiesce_mode,
        config.stop_timeout,
    )


@dataclass
class Window:
    """When the application was stopped, and for how long."""

    stopped_at: datetime
    downtime: float = 0.0


@contextmanager
def application_stopped(
    quiescer: AppQuiescer, selector: LabelSelector, project: str, guard: InterruptGuard, job: Job
) -> Iterator[Window]:
    """1.a stop the application for the block; 1.c start it again whatever happens."""
    window = Window(datetime.now(UTC))
    started = time.monotonic()
    try:
        with job.step("1.a stop the application"):
            selected = quiescer.select(selector, project)
            if not selected:
                logger.warning(
                    "%s; going on without stopping anything", quiescer.nothing_selected(selector)
                )
            window.stopped_at = datetime.now(UTC)
            quiescer.quiesce(selected)
        yield window
    finally:
        with guard.shielded(), job.step("1.c start the application"):
            quiescer.resume()
        window.downtime = time.monotonic() - started
        logger.info("application downtime: %.2f s", window.downtime)
