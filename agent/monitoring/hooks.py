"""The monitors of every job, chosen from one name → module table; each has the same two
functions, `start(where, job)` and `finish(where, run)`. A monitor that fails is logged as a
warning and never changes the job's outcome."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from agent.monitoring import notify, pings, record
from agent.monitoring.context import Monitoring
from agent.monitoring.state import Run

logger = logging.getLogger(__name__)

MONITORS: dict[str, ModuleType] = {"record": record, "ping": pings, "notify": notify}


def start(where: Monitoring | None, job: str) -> None:
    if where is None:
        return
    for name, monitor in MONITORS.items():
        try:
            monitor.start(where, job)
        except Exception as exc:
            logger.warning("monitor %s: %s start not reported: %s", name, job, exc)


def finish(where: Monitoring | None, run: Run) -> None:
    if where is None:
        return
    for name, monitor in MONITORS.items():
        try:
            monitor.finish(where, run)
        except Exception as exc:
            logger.warning("monitor %s: %s end not reported: %s", name, run.job, exc)


def figures(result: object) -> dict[str, Any]:
    """What a job's result says for the monitors: its one-line summary, the downtime and the
    bytes read, transferred and newly stored (the jobs' results name them alike)."""
    found: dict[str, Any] = {}
    for attribute, figure in (
        ("downtime_seconds", "downtime_seconds"),
        ("bytes_read", "read_bytes"),
        ("bytes_uploaded", "transferred_bytes"),
        ("bytes_received", "transferred_bytes"),
        ("data_size", "stored_bytes"),
    ):
        value = getattr(result, attribute, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[figure] = value
    parts = []
    if isinstance(gen := getattr(result, "generation", None), str):
        parts.append(f"generation {gen}")
    for attribute in ("pushed", "pulled", "verified"):
        items = getattr(result, attribute, None)
        if isinstance(items, list):
            parts.append(f"{attribute} {len(items)}: {', '.join(map(str, items[:5]))}".rstrip(": "))
    if "downtime_seconds" in found:
        parts.append(f"downtime {found['downtime_seconds']:.2f} s")
    found["summary"] = ", ".join(parts)
    return found
