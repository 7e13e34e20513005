"""The monitoring state of an agent: one JSON file beside its other state
(`<handover>/.state/monitoring.json`, `<sink store>/.state/monitoring.json`), written by the
jobs and read by the metrics, the textfile and the status page between jobs.

    {"role": "source", "name": "shop",
     "jobs": {job: {"started", "ended", "outcome", "settled" (the last success or failure),
                    "duration_seconds", "last_success",
                    "read_bytes", "transferred_bytes", "stored_bytes", "summary", "error",
                    "runs": {outcome: count}}},
     "runs": [the last RUNS_KEPT runs: {"job", "started", "outcome", "duration_seconds",
              "downtime_seconds"}],
     "downtime": {"backup" | "restore": {"seconds", "at"}},
     "stores": {"recorded", "rows": [what `list --json` shows], "problems": [...]},
     "certificate": {"path", "expires", "checked"}}

Times are seconds since the epoch. `with_*` are pure; `load`, `save` and `update` the I/O.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNS_KEPT = 30
FILE_NAME = "monitoring.json"

# What a job's outcome is called in the state, the metrics and the pings.
SUCCESS, FAILURE, INTERRUPTED, SKIPPED = "success", "failure", "interrupted", "skipped"

Body = dict[str, Any]


@dataclass(frozen=True)
class Run:
    """One run of a job as the monitors see it."""

    job: str
    started: float
    ended: float
    outcome: str
    summary: str = ""
    error: str = ""
    downtime_seconds: float | None = None
    read_bytes: int | None = None
    transferred_bytes: int | None = None
    stored_bytes: int | None = None

    @property
    def duration_seconds(self) -> float:
        return max(0.0, self.ended - self.started)


def empty(role: str, name: str) -> Body:
    return {"role": role, "name": name, "jobs": {}, "runs": [], "downtime": {}}


def with_run(body: Body, run: Run) -> Body:
    """Given a state and a finished run, return the state that records it. Pure."""
    new: Body = json.loads(json.dumps(body))
    jobs = new.setdefault("jobs", {})
    previous = jobs.get(run.job, {})
    entry: Body = {
        "started": run.started,
        "ended": run.ended,
        "outcome": run.outcome,
        "duration_seconds": round(run.duration_seconds, 3),
        "summary": run.summary,
        "error": run.error,
        "runs": dict(previous.get("runs", {})),
    }
    entry["runs"][run.outcome] = entry["runs"].get(run.outcome, 0) + 1
    # What the last run that ran to its end gave: a run interrupted because the container
    # was stopping (or skipped) says nothing about the backups.
    settled = run.outcome in (SUCCESS, FAILURE)
    entry["settled"] = run.outcome if settled else previous.get("settled", previous.get("outcome"))
    if run.outcome == SUCCESS:
        entry["last_success"] = run.ended
    elif "last_success" in previous:
        entry["last_success"] = previous["last_success"]
    for figure in ("read_bytes", "transferred_bytes", "stored_bytes", "downtime_seconds"):
        value = getattr(run, figure)
        if value is not None:
            entry[figure] = value
    jobs[run.job] = entry
    if run.downtime_seconds is not None and run.outcome == SUCCESS:
        kind = "restore" if run.job == "restore" else "backup"
        new.setdefault("downtime", {})[kind] = {"seconds": run.downtime_seconds, "at": run.ended}
    if run.outcome != SKIPPED:
        runs = new.setdefault("runs", [])
        runs.append(
            {
                "job": run.job,
                "started": run.started,
                "outcome": run.outcome,
                "duration_seconds": round(run.duration_seconds, 3),
                "downtime_seconds": run.downtime_seconds,
            }
        )
        del runs[:-RUNS_KEPT]
    return new


def with_stores(
    body: Body, rows: Sequence[Mapping[str, Any]], problems: Sequence[str], now: float
) -> Body:
    """Given a state and what `list` found (its rows as dicts), return the state that holds
    them. Pure."""
    new = dict(body)
    new["stores"] = {"recorded": now, "rows": [dict(r) for r in rows], "problems": list(problems)}
    return new


def with_certificate(body: Body, path: str, expires: float | None, now: float) -> Body:
    """The state with the certificate's expiry (None: no expiry, valid forever). Pure."""
    new = dict(body)
    new["certificate"] = {"path": path, "expires": expires, "checked": now}
    return new


def load(path: Path) -> Body:
    """The state written last; an empty one when there is none or it cannot be read."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def save(path: Path, body: Body) -> None:
    """Write `body` to `path` atomically (a temporary sibling, renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".monitoring-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update(path: Path, role: str, name: str, change: Callable[[Body], Body]) -> Body:
    """Load the state (or start one for `role` and `name`), apply `change`, save and return
    it."""
    body = load(path) or empty(role, name)
    body = change(body)
    save(path, body)
    return body
