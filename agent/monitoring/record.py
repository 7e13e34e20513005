"""The monitor that keeps the state file (and METRICS_TEXTFILE) up to date."""

from __future__ import annotations

from agent.monitoring import state
from agent.monitoring.context import Monitoring
from agent.monitoring.state import Run


def start(where: Monitoring, job: str) -> None:
    """Nothing to record before a job ends."""


def finish(where: Monitoring, run: Run) -> None:
    state.update(where.state_path, where.role, where.name, lambda body: state.with_run(body, run))
    refresh_textfile(where)


def refresh_textfile(where: Monitoring) -> None:
    if where.settings.metrics_textfile is not None:
        from agent.monitoring import metrics  # prometheus_client: only when it is needed

        metrics.write_textfile(where.settings.metrics_textfile, where.state_path)
