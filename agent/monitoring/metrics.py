"""The Prometheus metrics of a monitoring state (docs/monitoring.md lists them). Built from
the state file at every scrape, so the long-lived `cron` process serves what the jobs
recorded, and the same text goes to METRICS_TEXTFILE for node_exporter."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.core import generation
from agent.monitoring import state
from agent.monitoring.state import SUCCESS, Body

PREFIX = "backup_agent"


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def _age(gen: str, now: float) -> float | None:
    try:
        return max(0.0, now - generation.parse(gen).timestamp())
    except ValueError:
        return None


def families(body: Body, now: float) -> Iterator[Metric]:
    """Yield the metric families of state `body` at time `now`. Pure."""
    role = str(body.get("role", ""))
    info = _gauge(
        "info",
        "The agent: 1, labelled with its version, role and name.",
        ["version", "role", "name"],
    )
    info.add_metric([__version__, role, str(body.get("name", ""))], 1)
    yield info

    jobs: dict[str, Any] = body.get("jobs", {})
    job_labels = ["role", "job"]
    last_run = _gauge(
        "job_last_run_timestamp_seconds", "When the job's last run ended.", job_labels
    )
    last_ok = _gauge(
        "job_last_success_timestamp_seconds", "When the job last ended successfully.", job_labels
    )
    ok = _gauge(
        "job_success",
        "1 when the job's last run that ran to its end succeeded (an interrupted one is not "
        "counted), else 0.",
        job_labels,
    )
    duration = _gauge("job_duration_seconds", "How long the job's last run took.", job_labels)
    read = _gauge("job_read_bytes", "Bytes of data the job's last run read.", job_labels)
    moved = _gauge(
        "job_transferred_bytes",
        "Bytes the job's last run uploaded (push) or received (pull).",
        job_labels,
    )
    stored = _gauge(
        "job_stored_bytes", "Bytes the job's last run newly stored (after dedup).", job_labels
    )
    runs = CounterMetricFamily(
        f"{PREFIX}_job_runs", "Runs of the job by outcome.", labels=[*job_labels, "outcome"]
    )
    for job, entry in sorted(jobs.items()):
        key = [role, job]
        last_run.add_metric(key, entry.get("ended", 0))
        if "last_success" in entry:
            last_ok.add_metric(key, entry["last_success"])
        if entry.get("settled"):
            ok.add_metric(key, 1 if entry["settled"] == SUCCESS else 0)
        duration.add_metric(key, entry.get("duration_seconds", 0))
        for family, figure in (
            (read, "read_bytes"),
            (moved, "transferred_bytes"),
            (stored, "stored_bytes"),
        ):
            if figure in entry:
                family.add_metric(key, entry[figure])
        for outcome, count in sorted(entry.get("runs", {}).items()):
            runs.add_metric([*key, outcome], count)
    yield from (last_run, last_ok, ok, duration, read, moved, stored, runs)

    downtime = _gauge(
        "downtime_seconds",
        "How long the application was stopped by the last backup or restore.",
        ["role", "operation"],
    )
    for operation, entry in sorted(body.get("downtime", {}).items()):
        downtime.add_metric([role, operation], entry.get("seconds", 0))
    yield downtime

    verify = jobs.get("verify")
    verified = _gauge("verify_success", "1 when the last verify found every file intact.", ["role"])
    verified_at = _gauge("verify_timestamp_seconds", "When the last verify ended.", ["role"])
    if verify:
        verified.add_metric([role], 1 if verify.get("settled") == SUCCESS else 0)
        verified_at.add_metric([role], verify.get("ended", 0))
    yield verified
    yield verified_at

    yield from _store_families(body, role, now)

    cert = body.get("certificate")
    expiry = _gauge(
        "ssh_certificate_expiry_timestamp_seconds",
        "When the sink's SSH certificate (SINK_SSH_CERT) expires; +Inf: never.",
        ["role", "path"],
    )
    if cert:
        expires = cert.get("expires")
        expiry.add_metric(
            [role, cert.get("path", "")], float("inf") if expires is None else expires
        )
    yield expiry


def _store_families(body: Body, role: str, now: float) -> Iterator[Metric]:
    rows: list[dict[str, Any]] = body.get("stores", {}).get("rows", [])
    labels = ["role", "store", "location", "kind"]
    count = _gauge("store_generations", "Complete generations in the store.", labels)
    size = _gauge("store_generations_bytes", "Bytes of the store's complete generations.", labels)
    total = _gauge(
        "store_size_bytes",
        "Bytes the store holds in all (files and packs).",
        ["role", "store", "location"],
    )
    ratio = _gauge(
        "store_dedup_ratio",
        "Logical bytes of the store's chunked generations per byte they take there.",
        ["role", "store", "location"],
    )
    newest = _gauge(
        "store_newest_generation_age_seconds",
        "Age of the store's newest complete generation.",
        labels,
    )
    counted: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row.get("store") == "handover" or not row.get("complete"):
            continue
        counted.setdefault((row["store"], row["location"], row["kind"]), []).append(row)
        totals[(row["store"], row["location"])] = row
    for (store, location, kind), found in sorted(counted.items()):
        key = [role, store, location, kind]
        count.add_metric(key, len(found))
        size.add_metric(key, sum(r.get("size") or 0 for r in found))
        ages = [a for a in (_age(r["generation"], now) for r in found) if a is not None]
        if ages:
            newest.add_metric(key, min(ages))
    for (store, location), row in sorted(totals.items()):
        if row.get("store_size") is not None:
            total.add_metric([role, store, location], row["store_size"])
        if row.get("store_dedup_ratio") is not None:
            ratio.add_metric([role, store, location], row["store_dedup_ratio"])
    yield from (count, size, total, ratio, newest)

    waiting = [r for r in rows if r.get("store") == "handover" and r.get("complete")]
    queued = _gauge(
        "handover_waiting_generations",
        "Complete generations waiting in the handover for their transport.",
        ["role", "kind"],
    )
    oldest = _gauge(
        "handover_oldest_waiting_age_seconds",
        "Age of the oldest generation waiting in the handover (0: none waits).",
        ["role"],
    )
    if "stores" in body and role == "source":
        for kind in generation.KINDS:
            queued.add_metric([role, kind], sum(1 for r in waiting if r["kind"] == kind))
        ages = [a for a in (_age(r["generation"], now) for r in waiting) if a is not None]
        oldest.add_metric([role], max(ages, default=0.0))
    yield queued
    yield oldest


class StateCollector(Collector):
    """Collects the metrics of the state file at `path` at every scrape."""

    def __init__(self, load: Callable[[], Body]) -> None:
        self.load = load

    def collect(self) -> Iterator[Metric]:
        return families(self.load(), time.time())


def registry_of(load: Callable[[], Body]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(load))
    return registry


def exposition(body: Body) -> bytes:
    """The text exposition format of `body`'s metrics."""
    return generate_latest(registry_of(lambda: body))


def write_textfile(path: Path, state_path: Path) -> None:
    """Write the metrics of the state at `state_path` to `path` atomically (node_exporter's
    textfile collector must never read half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry_of(lambda: state.load(state_path)))
