"""The commands every role has: `config` (the effective settings), `cron` (the container's
entrypoint: the role's jobs on their schedules) and `health` (are those jobs healthy). The
scheduler (and croniter) and the metrics server (prometheus_client) are imported only by the
commands that use them."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent import config
from agent.core.handover import Handover
from agent.monitoring import state
from agent.runtime import logsetup
from agent.runtime.jobs import EXIT_FAILED, EXIT_OK, role, values

if TYPE_CHECKING:
    from agent.monitoring import server
    from agent.runtime import cron

logger = logging.getLogger(__name__)


def config_command(args: argparse.Namespace) -> int:
    """Print the effective settings (secrets masked), or the settings table of docs/settings.md."""
    if args.markdown:
        print(config.markdown_table())
        return EXIT_OK
    raw = values(args)
    if raw.unreadable:
        raise config.ConfigError(list(raw.unreadable.values()))
    for name, value, explicit in config.effective(raw, args.role):
        print(f"{name}={value}" + ("" if explicit else "  # default"))
    return EXIT_OK


def _cron_setup(
    args: argparse.Namespace,
) -> tuple[str, config.CronConfig, Path, config.MonitorConfig]:
    """The role, its schedules, the status file `health` reads (the monitoring state lies
    beside it) and the monitoring settings; every setting of the role is checked now, so a
    bad one stops the container at start (exit 2)."""
    raw = values(args)
    name = role(args, raw)
    problems = []
    try:
        schedule = config.parse_cron(raw, name)
    except config.ConfigError as exc:
        problems, schedule = exc.problems, config.CronConfig((), ())
    try:
        if name == config.SINK:
            sink = config.parse_sink(raw)
            status, monitor = sink.state_dir / "cron.json", sink.monitor
        else:
            jobs = {job for job, _ in schedule.schedules} | set(schedule.at_start)
            source = config.parse_source(raw, push=bool(jobs & {"run", "push"}))
            status = Handover(source.handover_dir).state / "cron.json"
            monitor = source.monitor
    except config.ConfigError as exc:
        problems += exc.problems
    if problems:
        raise config.ConfigError(list(dict.fromkeys(problems)))  # unread settings: named once
    return name, schedule, status, monitor


def cron_command(args: argparse.Namespace, main: Callable[[Sequence[str]], int]) -> int:
    """Serve the role's schedules; each job runs as `main` would run its command line. With
    METRICS_PORT the metrics and the status page are served meanwhile."""
    from agent.runtime import cron

    name, schedule, status_path, monitor = _cron_setup(args)
    logsetup.send_to(sys.stdout)
    raw = values(args)
    logsetup.configure(raw.get("LOG_LEVEL", "INFO"), raw.get("LOG_FORMAT", "plain"))
    watched = bool(monitor.metrics_port or monitor.metrics_textfile)

    def run(job: str) -> int:
        code = main(["--env-file", str(args.env_file), *cron.command(job, name)])
        if watched:  # what the stores hold now, for the metrics and the status page
            main(["--env-file", str(args.env_file), "list", "--role", name, "--record"])
        return code

    status = cron.Status(status_path)
    scheduler = cron.Scheduler(schedule.schedules, run, status)
    served = _serve_metrics(monitor, status, schedule, status_path.parent / state.FILE_NAME)
    # A source agent killed while the application was stopped (its container restarted, e.g.
    # a sidecar) repairs that now, not at the next tick.
    first = ("reconcile",) if name == config.SOURCE else ()
    try:
        return scheduler.serve(first + schedule.at_start)
    finally:
        if served is not None:
            served.close()


def _serve_metrics(
    monitor: config.MonitorConfig,
    status: cron.Status,
    schedule: config.CronConfig,
    state_path: Path,
) -> server.MetricsServer | None:
    """Start serving METRICS_PORT, when set. A port that cannot be bound is logged: the
    schedule runs all the same (monitoring never stops a backup)."""
    from agent.monitoring import server
    from agent.runtime import cron

    if not monitor.metrics_port:
        return None

    def health() -> list[str]:
        try:
            return cron.assess(status.load(), schedule.schedules, datetime.now(UTC))
        except (FileNotFoundError, ValueError):
            return ["the scheduler has not written its status yet"]

    try:
        return server.MetricsServer(
            monitor.metrics_bind, monitor.metrics_port, state_path, health
        ).start()
    except OSError as exc:
        logger.error(
            "METRICS_PORT: cannot serve on %s:%s (%s); the jobs run without it",
            monitor.metrics_bind,
            monitor.metrics_port,
            exc,
        )
        return None


def health_command(args: argparse.Namespace) -> int:
    """Exit 0 when the scheduled jobs are healthy, 1 when not (and say why)."""
    from agent.runtime import cron

    _, schedule, status_path, _ = _cron_setup(args)
    try:
        status = cron.Status(status_path).load()
    except (FileNotFoundError, ValueError):
        print(f"unhealthy: no status in {status_path}; is `backup-agent cron` running?")
        return EXIT_FAILED
    problems = cron.assess(status, schedule.schedules, datetime.now(UTC))
    for problem in problems:
        print(f"unhealthy: {problem}")
    if not problems:
        jobs = status.get("jobs")
        runs = jobs if isinstance(jobs, dict) else {}
        print(
            "healthy: "
            + ", ".join(
                f"{job} last succeeded {runs.get(job, {}).get('last_success', 'never')}"
                for job, _ in schedule.schedules
            )
        )
    return EXIT_FAILED if problems else EXIT_OK
