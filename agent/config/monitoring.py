"""The monitoring settings every role reads: the metrics port and textfile, the pings per job
and the certificate warning (the notification URLs travel with the alert mail, MailConfig)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from agent.config.parsing import Parser
from agent.config.settings import SINK, SOURCE

# The jobs that ping, by their name in runtime.jobs, and the setting of each one's own URL.
PING_JOBS = {
    "source backup": ("PING_URL_BACKUP", SOURCE),
    "source push": ("PING_URL_PUSH", SOURCE),
    "restore": ("PING_URL_RESTORE", SOURCE),
    "sink pull-data": ("PING_URL_PULL_DATA", SINK),
    "sink pull-logs": ("PING_URL_PULL_LOGS", SINK),
    "verify": ("PING_URL_VERIFY", ""),
}
URL_RE = re.compile(r"^https?://[^\s/]+(/\S*)?$")
APPRISE_RE = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")


@dataclass(frozen=True)
class MonitorConfig:
    metrics_port: int = 0  # 0: not served
    metrics_bind: str = "127.0.0.1"
    metrics_textfile: Path | None = None
    ping_urls: dict[str, str] = field(default_factory=dict)  # job name -> URL
    timeout: float = 10.0
    cert_warn_days: int = 14

    def ping_url(self, job: str) -> str:
        return self.ping_urls.get(job, "")


def _bind(value: str) -> str:
    ipaddress.ip_address(value)
    return value


def _url(value: str) -> str:
    if value and not URL_RE.match(value):
        raise ValueError
    return value.rstrip("/")


def parse_notify_urls(p: Parser) -> tuple[str, ...]:
    def convert(value: str) -> tuple[str, ...]:
        urls = tuple(u.strip() for u in value.split(",") if u.strip())
        if any(not APPRISE_RE.match(u) for u in urls):
            raise ValueError
        return urls

    none: tuple[str, ...] = ()
    return p.check(
        "NOTIFY_URLS",
        convert,
        "use comma-separated Apprise URLs such as `ntfy://ntfy.sh/topic` or "
        "`json://hooks.example/backup`",
        none,
    )


def parse_monitor(p: Parser, role: str) -> MonitorConfig:
    """The monitoring settings of `role`; problems are added to `p`."""
    port_text = p.raw("METRICS_PORT")
    port = p.integer("METRICS_PORT", 1, 65535) if port_text else 0
    textfile = p.raw("METRICS_TEXTFILE")
    if textfile and not textfile.endswith(".prom"):
        p.problems.append(
            f"METRICS_TEXTFILE: {textfile!r} is not allowed; use an absolute path ending in "
            "`.prom` (node_exporter reads only those)"
        )
    default = p.check("PING_URL", _url, "use an http:// or https:// URL", "")
    urls = {}
    for job, (env, job_role) in PING_JOBS.items():
        if job_role in ("", role):
            url = p.check(env, _url, "use an http:// or https:// URL", "") or default
            if url:
                urls[job] = url
    return MonitorConfig(
        metrics_port=port,
        metrics_bind=p.check(
            "METRICS_BIND", _bind, "use an IP address, e.g. 127.0.0.1 or 0.0.0.0", "127.0.0.1"
        ),
        metrics_textfile=p.path("METRICS_TEXTFILE") if textfile else None,
        ping_urls=urls,
        timeout=p.integer("PING_TIMEOUT", 1, 600),
        cert_warn_days=p.integer("CERT_WARN_DAYS", 0, 3650) if role == SINK else 14,
    )
