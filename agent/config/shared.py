"""The settings every role reads: where alerts go (mail, Apprise), the decryption identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.config.monitoring import parse_notify_urls
from agent.config.parsing import EMAIL_RE, Parser


@dataclass(frozen=True)
class MailConfig:
    """Where alerts go: the SMTP mail, and the Apprise URLs that receive the same messages
    (with `notify_level` = info also a summary of every job that succeeded)."""

    host: str
    port: int
    security: str
    user: str
    password: str
    timeout: float
    sender: str
    recipients: tuple[str, ...]
    notify_urls: tuple[str, ...] = ()
    notify_level: str = "error"
    notify_timeout: float = 10.0


def parse_mail(p: Parser) -> MailConfig:
    host = p.raw("SMTP_HOST")
    recipients = p.emails("ALERT_TO")
    if host and not recipients:
        p.problems.append(
            "ALERT_TO: required when SMTP_HOST is set; use comma-separated mail addresses"
        )
    return MailConfig(
        host=host,
        port=p.integer("SMTP_PORT", 1, 65535),
        security=p.choice("SMTP_SECURITY", ("starttls", "tls", "none")),
        user=p.raw("SMTP_USER"),
        password=p.raw("SMTP_PASSWORD"),
        timeout=p.integer("SMTP_TIMEOUT", 1, 3600),
        sender=p.pattern("ALERT_FROM", EMAIL_RE, "use a mail address"),
        recipients=recipients,
        notify_urls=parse_notify_urls(p),
        notify_level=p.choice("NOTIFY_LEVEL", ("error", "info")),
        notify_timeout=p.integer("PING_TIMEOUT", 1, 600),
    )


def parse_identities(p: Parser) -> tuple[Any, ...]:
    from agent.core import encryption

    secret = p.raw("DECRYPT_IDENTITY")
    try:
        return encryption.parse_identities(secret) if secret else ()
    except ValueError as exc:
        p.problems.append(
            f"DECRYPT_IDENTITY: {exc}; use an age identity file "
            "(`age-keygen -o key.txt`) or an unencrypted SSH private key"
        )
        return ()
