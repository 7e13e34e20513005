"""The schedules of the cron entrypoint (`CRON_*`), per role."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.config.parsing import Parser
from agent.config.settings import SINK, SOURCE


@dataclass(frozen=True)
class CronConfig:
    schedules: tuple[tuple[str, str], ...]  # (job, cron expression), in declaration order
    at_start: tuple[str, ...]


CRON_JOBS = {
    SOURCE: ("run", "backup", "push", "verify"),
    SINK: ("pull-logs", "pull-data", "verify"),
}


def parse_cron(values: Mapping[str, str], role: str) -> CronConfig:
    """The schedules of `role`'s jobs. Raise ConfigError for an invalid cron expression, an
    unknown job to run at start, or no job scheduled at all."""
    from croniter import croniter

    p = Parser(values)
    schedules = []
    for job in CRON_JOBS[role]:
        env = "CRON_" + job.upper().replace("-", "_")

        def convert(value: str) -> str:
            if value and not croniter.is_valid(value):
                raise ValueError
            return value

        expression = p.check(env, convert, "use a cron expression such as `0 2 * * *` (UTC)", "")
        if expression:
            schedules.append((job, expression))

    def jobs(value: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in value.split(",") if n.strip())
        if any(n not in CRON_JOBS[role] for n in names):
            raise ValueError
        return names

    none: tuple[str, ...] = ()
    at_start = p.check(
        "CRON_AT_START",
        jobs,
        f"use comma-separated jobs of the {role}: {', '.join(CRON_JOBS[role])}",
        none,
    )
    if not schedules and not at_start and not p.problems and not p.unreadable:
        p.problems.append(
            f"CRON_*: no job is scheduled; set at least one of "
            f"{', '.join('CRON_' + j.upper().replace('-', '_') for j in CRON_JOBS[role])}"
        )
    p.finish()
    return CronConfig(tuple(schedules), at_start)
