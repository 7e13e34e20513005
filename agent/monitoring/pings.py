"""Pings in the healthchecks.io protocol (also taken by Uptime Kuma push monitors and
Cronitor): `POST <url>/start` when a job starts, `POST <url>` when it succeeds and
`POST <url>/fail` when it fails, the summary or the error as the body."""

from __future__ import annotations

import logging

from agent import __version__
from agent.monitoring.context import Monitoring
from agent.monitoring.state import FAILURE, INTERRUPTED, SUCCESS, Run

logger = logging.getLogger(__name__)

BODY_LIMIT = 10_000  # healthchecks.io keeps the first 10 kB of a ping's body


def ping(url: str, body: str, timeout: float) -> None:
    """POST `body` to `url`. Raise OSError (urllib's errors are OSErrors) if it is not taken."""
    import urllib.request  # only when a ping is configured: every command's start pays for it

    request = urllib.request.Request(
        url,
        data=body.encode()[:BODY_LIMIT],
        method="POST",
        headers={
            "Content-Type": "text/plain; charset=utf-8",
            "User-Agent": f"backup-agent/{__version__}",
        },
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        answer.read(1024)


def start(where: Monitoring, job: str) -> None:
    url = where.settings.ping_url(job)
    if url:
        ping(f"{url}/start", f"{where.name}: {job} started", where.settings.timeout)


def finish(where: Monitoring, run: Run) -> None:
    url = where.settings.ping_url(run.job)
    if not url or run.outcome not in (SUCCESS, FAILURE, INTERRUPTED):
        return
    if run.outcome == SUCCESS:
        body = f"{where.name}: {run.job} succeeded in {run.duration_seconds:.1f} s: {run.summary}"
        ping(url, body, where.settings.timeout)
    else:
        body = f"{where.name}: {run.job} {run.outcome}: {run.error}"
        ping(f"{url}/fail", body, where.settings.timeout)
