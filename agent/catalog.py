"""`list`: the generations every store of a role holds, with size, age, completeness and when
each was last verified."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from agent import generation
from agent.manifest import InvalidManifest
from agent.stores import StoreError
from agent.verification import Ledger, Stored


@dataclass(frozen=True)
class Row:
    store: str
    location: str
    kind: str
    generation: str
    size: int | None
    age_seconds: int
    complete: bool
    last_verified: str


def rows(stores: Sequence[Stored], ledger: Ledger,
         now: datetime | None = None) -> tuple[list[Row], list[str]]:
    """Every generation of every store, oldest first per store and kind, and a line for each
    store that could not be listed (the others are listed all the same). The size is the sum
    of the manifest's files (unknown for incomplete generations)."""
    now = now or datetime.now(UTC)
    verified = ledger.load()
    found: list[Row] = []
    problems: list[str] = []
    for stored in stores:
        url = stored.store.url
        for kind in generation.KINDS:
            try:
                complete, incomplete = stored.store.generations(kind)
            except StoreError as exc:
                problems.append(f"{stored.name} {url}: {exc}")
                break
            for gen in sorted(complete + incomplete):
                size = None
                if gen in complete:
                    try:
                        size = stored.store.read_manifest(kind, gen).total_size
                    except (InvalidManifest, FileNotFoundError, StoreError):
                        size = None
                age = int((now - generation.parse(gen)).total_seconds())
                found.append(Row(stored.name, url, kind, gen, size, age, gen in complete,
                                 verified.get(Ledger.key(url, kind, gen), "")))
    return found, problems


def as_json(found: list[Row]) -> str:
    return json.dumps([asdict(row) for row in found], indent=1)


def as_table(found: list[Row]) -> str:
    headers = ("store", "kind", "generation", "size", "age", "complete", "last verified")
    lines = [(f"{r.store} ({r.location})", r.kind, r.generation, _size(r.size), _age(r.age_seconds),
              "yes" if r.complete else "NO", r.last_verified or "never") for r in found]
    if not lines:
        return "no generations"
    widths = [max(len(row[i]) for row in [headers, *lines]) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [headers, *lines])


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def _age(seconds: int) -> str:
    if seconds < 3600:
        return f"{max(0, seconds) // 60} min"
    if seconds < 86400 * 2:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"
