"""Notifications through Apprise (NOTIFY_URLS): the alerts the mail sends, in the same
words, and with NOTIFY_LEVEL=info a summary of every job that succeeded. Apprise is imported
only when there is something to send."""

from __future__ import annotations

import logging

from agent.config import PING_JOBS, MailConfig
from agent.monitoring.context import Monitoring
from agent.monitoring.message import Message, Summary
from agent.monitoring.state import SUCCESS, Run

logger = logging.getLogger(__name__)


def send(mail: MailConfig, message: Message) -> bool:
    """Send `message` to every URL of NOTIFY_URLS; return whether all took it. Never raise:
    every failure is logged as a warning."""
    if not mail.notify_urls:
        return False
    try:
        import apprise

        sender = apprise.Apprise()
        for url in mail.notify_urls:
            if not sender.add(url):
                logger.warning("notification URL not understood by Apprise: %s", _scheme(url))
        kind = apprise.NotifyType.INFO if message.level == "info" else apprise.NotifyType.FAILURE
        if not len(sender):
            return False
        sent = bool(sender.notify(title=message.subject, body=message.body, notify_type=kind))
    except Exception as exc:
        logger.warning("notification not sent: %s", exc)
        return False
    if sent:
        logger.info("notification sent to %d URL(s)", len(mail.notify_urls))
    else:
        logger.warning("notification not taken by every URL of NOTIFY_URLS (see Apprise's log)")
    return sent


def _scheme(url: str) -> str:
    """A URL's scheme only: the rest may hold a token."""
    return url.split("://", 1)[0] + "://…"


def start(where: Monitoring, job: str) -> None:
    """Nothing is notified when a job starts."""


def finish(where: Monitoring, run: Run) -> None:
    """At NOTIFY_LEVEL=info, the summary of a job that succeeded (failures are alerts); not of
    the repairs `reconcile` does at every start."""
    if run.outcome == SUCCESS and where.mail.notify_level == "info" and run.job in PING_JOBS:
        send(where.mail, Summary(where.name, run.job, run.summary, run.duration_seconds))
