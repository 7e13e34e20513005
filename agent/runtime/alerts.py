"""Alerts by mail, and the same message to NOTIFY_URLS (Apprise). Sending never fails a job: a
mail or notification that cannot be sent is logged and the job's own outcome stands."""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from agent.config import MailConfig
from agent.monitoring import notify
from agent.monitoring.message import Alert

__all__ = ["Alert", "send"]

logger = logging.getLogger(__name__)


def send(mail: MailConfig, alert: Alert) -> bool:
    """Mail `alert` to the configured recipients and notify NOTIFY_URLS; return whether it was
    mailed. Never raise: every failure is logged."""
    logger.error("ALERT %s — %s", alert.subject, alert.error)
    notify.send(mail, alert)
    if not mail.host:
        logger.warning("alert not mailed: SMTP_HOST is not set")
        return False
    message = EmailMessage(policy=policy.SMTP.clone(max_line_length=998))
    message["Subject"] = alert.subject
    message["From"] = mail.sender or f"backup-agent@{socket.gethostname()}"
    message["To"] = ", ".join(mail.recipients)
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="backup-agent")
    message.set_content(alert.body)
    try:
        context = ssl.create_default_context()
        if mail.security == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                mail.host, mail.port, timeout=mail.timeout, context=context
            )
        else:
            client = smtplib.SMTP(mail.host, mail.port, timeout=mail.timeout)
        with client:
            if mail.security == "starttls":
                client.starttls(context=context)
            if mail.user:
                client.login(mail.user, mail.password)
            client.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        logger.error("alert could not be mailed via %s:%s: %s", mail.host, mail.port, exc)
        return False
    logger.info("alert mailed to %s", ", ".join(mail.recipients))
    return True
