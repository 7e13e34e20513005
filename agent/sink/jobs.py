"""The sink agent's commands: `sink pull-data` (step 2, pull) and `sink pull-logs` (step 3), each
run as a job (see runtime.jobs)."""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime, timedelta

from agent import config
from agent.monitoring import certificate, context, record, state
from agent.monitoring.context import Monitoring
from agent.runtime import alerts, logsetup
from agent.runtime.interrupts import InterruptGuard
from agent.runtime.jobs import exclusive, run_job, values

logger = logging.getLogger(__name__)

_WARN_AGAIN = timedelta(hours=20)  # one certificate alert a day, whatever the pull schedule


def pull_command(args: argparse.Namespace) -> int:
    """Pull the generations of `args.kind` from every source, under the sink agent's lock."""
    from agent.sink import fanout, pull

    settings = config.load_sink(values(args))
    logsetup.configure(settings.log_level, settings.log_format)
    monitors = context.for_sink(settings)

    def run(guard: InterruptGuard) -> int:
        check_certificate(settings, monitors, pull.JOBS[args.kind])
        return run_job(
            pull.JOBS[args.kind],
            lambda _: fanout.pull(settings, args.kind),
            "sink",
            settings.mail,
            guard,
            monitors,
        )

    return exclusive(settings.lock_path, run)


def check_certificate(
    settings: config.SinkConfig, where: Monitoring, job: str, now: datetime | None = None
) -> None:
    """Record when SINK_SSH_CERT expires (for the metric) and alert, once a day, when that is
    within CERT_WARN_DAYS. Never raise: this is monitoring, and the pull goes on."""
    now = now or datetime.now(UTC)
    try:
        valid = certificate.read(settings.ssh_cert)
    except certificate.CertificateUnreadable as exc:
        logger.warning("the expiry of %s is unknown: %s", settings.ssh_cert, exc)
        return
    expires = valid.before
    try:
        previous = state.load(where.state_path).get("certificate") or {}
        warned = (
            float(previous.get("warned", 0))
            if previous.get("expires") == (expires.timestamp() if expires else None)
            else 0.0
        )
        message = certificate.warning(valid, now, settings.monitor.cert_warn_days)
        alert_now = bool(message) and now.timestamp() - warned >= _WARN_AGAIN.total_seconds()

        def change(body: state.Body) -> state.Body:
            body = state.with_certificate(
                body,
                str(settings.ssh_cert),
                expires.timestamp() if expires else None,
                now.timestamp(),
            )
            body["certificate"]["warned"] = now.timestamp() if alert_now else warned
            return body

        state.update(where.state_path, where.role, where.name, change)
        record.refresh_textfile(where)
    except Exception as exc:
        logger.warning("the certificate's expiry could not be recorded: %s", exc)
        return
    if alert_now:
        alerts.send(
            settings.mail,
            alerts.Alert(
                "sink",
                job,
                "check the sink's SSH certificate",
                f"{message}; sign a new one for SINK_SSH_KEY with your SSH user CA and put it "
                f"at {settings.ssh_cert} (see docs/pull.md) before the pulls start failing",
                "nothing was changed; the pull goes on",
                warning="SSH certificate expires soon",
            ),
        )
