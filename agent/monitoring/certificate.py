"""The sink's SSH certificate: when it expires, from `ssh-keygen -L`, so an alert goes out
before the pulls start failing (CERT_WARN_DAYS)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_LIMIT = 64 * 1024


class CertificateUnreadable(Exception):
    """`ssh-keygen -L` cannot read the file as a certificate; the message says why."""


@dataclass(frozen=True)
class Validity:
    after: datetime | None  # None: from always
    before: datetime | None  # None: forever


def validity(listing: str) -> Validity:
    """Given what `ssh-keygen -L` shows of a certificate (run with TZ=UTC), return its
    validity. Raise ValueError if it shows none. Pure."""
    line = re.search(r"^\s*Valid: (.*)$", listing, re.MULTILINE)
    if line is None:
        raise ValueError("no Valid: line")
    stamp = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)"
    after = re.search(rf"(?:from|after) {stamp}", line[1])
    before = re.search(rf"(?:to|before) {stamp}", line[1])

    def moment(found: re.Match[str] | None) -> datetime | None:
        return datetime.fromisoformat(found[1]).replace(tzinfo=UTC) if found else None

    return Validity(moment(after), moment(before))


def read(path: Path) -> Validity:
    """The validity of the certificate at `path`. Raise CertificateUnreadable."""
    try:
        shown = subprocess.run(
            ["ssh-keygen", "-L", "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "TZ": "UTC"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CertificateUnreadable(f"cannot run ssh-keygen -L: {exc}") from None
    if shown.returncode != 0:
        raise CertificateUnreadable(shown.stderr.strip()[-200:] or "ssh-keygen -L failed")
    try:
        return validity(shown.stdout[:_LIMIT])
    except ValueError:
        raise CertificateUnreadable(f"{path} shows no validity (not a certificate?)") from None


def warning(valid: Validity, now: datetime, warn_days: int) -> str:
    """What to say when a certificate valid `valid` is within `warn_days` of its end at
    `now`, else ''. Nothing for one that is not valid now: the pull fails and its alert names
    the certificate's problem. Pure."""
    expires = valid.before
    if expires is None or warn_days <= 0 or expires <= now:
        return ""
    if valid.after is not None and valid.after > now:
        return ""
    left = expires - now
    if left.days < warn_days:
        return (
            f"the sink's SSH certificate expires on {expires:%Y-%m-%d %H:%M} UTC, in "
            f"{left.days} day(s) {left.seconds // 3600} hour(s)"
        )
    return ""
