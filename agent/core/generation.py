"""Generation ids: the UTC timestamp a generation is named by, e.g. `2026-11-28T02-00-00Z`.

Sortable as text, safe as a file name and an S3 key. Pure logic, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

FORMAT = "%Y-%m-%dT%H-%M-%SZ"
_ID_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z$")
KINDS = ("data", "logs")


class InvalidGenerationId(ValueError):
    pass


def parse(text: str) -> datetime:
    """Given a generation id from anywhere (a directory, an S3 key, an SSH command), return its
    UTC time. Raise InvalidGenerationId unless it is exactly of the form `YYYY-MM-DDTHH-MM-SSZ`."""
    if not _ID_RE.match(text):
        raise InvalidGenerationId(f"not a generation id: {text!r}")
    try:
        return datetime.strptime(text, FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise InvalidGenerationId(f"not a generation id: {text!r}") from exc


def is_valid(text: str) -> bool:
    try:
        parse(text)
    except InvalidGenerationId:
        return False
    return True


def format_id(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(FORMAT)


def new_id(now: datetime, existing: Iterable[str]) -> str:
    """Return the id for a generation taken at `now`: its timestamp, moved one second past the
    newest existing id when a generation of that second (or a later one, after a clock step
    back) already exists, so ids stay unique and in the order the runs happened."""
    candidate = now.astimezone(UTC).replace(microsecond=0)
    newest = max((parse(e) for e in existing if is_valid(e)), default=None)
    if newest is not None and candidate <= newest:
        candidate = newest + timedelta(seconds=1)
    return format_id(candidate)
