"""How much space is free where a job writes, for the alerts of failed jobs."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import SourceConfig

logger = logging.getLogger(__name__)


def human(size: int) -> str:
    """A byte count for people: `512 B`, `4.0 MiB`, `1.2 TiB`."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def describe(places: Mapping[str, Path]) -> str:
    """Given named directories, say how much space is free on the filesystem of each, e.g.
    `handover /backup/handover: 1.2 GiB free of 20.0 GiB`. A directory that does not exist
    (yet) is measured at its nearest existing parent; one that cannot be measured says why."""
    seen: dict[int, str] = {}
    parts = []
    for name, directory in places.items():
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            device = os.stat(existing).st_dev
            usage = shutil.disk_usage(existing)
        except OSError as exc:
            parts.append(f"{name} {directory}: unknown ({exc.strerror})")
            continue
        if device in seen:
            parts.append(f"{name} {directory}: on the same filesystem as the {seen[device]}")
            continue
        seen[device] = name
        parts.append(f"{name} {directory}: {human(usage.free)} free of {human(usage.total)}")
    return "; ".join(parts)


def of_source(config: SourceConfig) -> str:
    """How much space is free in the source's handover and source store."""
    return describe({"handover": config.handover_dir, "source store": config.source_store_dir})
