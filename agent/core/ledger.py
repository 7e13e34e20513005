"""The ledger: when each generation was last verified in each store, for `list` and `verify`.
Written by every job that verifies a generation (push, pull, verify)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

from agent.core.manifest import fsync_dir

_writing = threading.Lock()  # one record at a time: a sink pulls several sources at once


class Ledger:
    """When each generation was last verified: `{"<store url>|<kind>|<gen>": "<UTC time>"}` in
    one JSON file, rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, str]:
        try:
            body = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    @staticmethod
    def key(url: str, kind: str, gen: str) -> str:
        return f"{url}|{kind}|{gen}"

    def last(self, url: str, kind: str, gen: str) -> str:
        return self.load().get(self.key(url, kind, gen), "")

    def record(self, url: str, kind: str, gen: str, when: datetime | None = None) -> None:
        with _writing:
            self._record(url, kind, gen, when)

    def _record(self, url: str, kind: str, gen: str, when: datetime | None) -> None:
        entries = self.load()
        entries[self.key(url, kind, gen)] = (
            (when or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z")
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".verified-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(entries, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)
