"""The crash-safe record of what a quiescer stopped: written before anything is stopped, read by
the next run to undo what a killed run left quiesced. Every mode keeps its own body in it, with
its `mode`, so another mode never undoes what it does not know."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent.core.manifest import fsync_dir


def write_record(path: Path, body: dict[str, Any]) -> None:
    """Write a quiescer's record atomically and durably (temp file, fsync, rename, fsync of
    the directory): it must be on disk before anything is stopped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(body, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_record(path: Path, modes: tuple[str, ...]) -> dict[str, Any] | None:
    """Return the record a killed run left at `path`, or None. Raise RuntimeError (the record
    is kept) if another QUIESCE_MODE wrote it: only that mode knows how to undo it."""
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    mode = record.get("mode", "stop")
    if mode not in modes:
        raise RuntimeError(
            f"{path} was left by a run with QUIESCE_MODE={mode}, which was "
            f"interrupted with the application quiesced; run the agent once with "
            f"QUIESCE_MODE={mode} to bring the application back, then switch"
        )
    return record
