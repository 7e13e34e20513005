"""`list`: the generations every store of a role holds, with size, age, completeness and when
each was last verified; for chunked generations also the bytes of files they hold (logical)
and the bytes they added to the store, and per store what it holds in all and what
deduplication saves there."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

from agent.chunks import reader
from agent.core import generation
from agent.core.ledger import Ledger
from agent.core.manifest import InvalidManifest, Manifest
from agent.recovery.verification import Stored
from agent.runtime import diskspace
from agent.stores import StoreError


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
    data_format: str = ""  # data generations: archive or chunks
    logical_size: int | None = None  # chunks: the bytes of the files it holds
    added_size: int | None = None  # the bytes of packs (or files) it added to the store
    store_size: int | None = None  # all the store holds: its generations' files and its packs
    store_dedup_ratio: float | None = None  # chunked data: logical bytes per byte stored


def _figures(m: Manifest) -> tuple[int, str, int | None, int]:
    """(size, data format, logical size, bytes added) of a generation: a chunked one needs
    its files and the packs it lists; every other one its files, which it added itself."""
    if m.chunked:
        return m.total_size + sum(p.size for p in m.packs), "chunks", m.logical_size, m.added_size
    return m.total_size, "archive" if m.kind == "data" else "", None, m.total_size


def store_totals(packs_size: int, manifests: Sequence[Manifest]) -> tuple[int, float | None]:
    """Given the bytes of a store's packs and its complete generations' manifests, return
    (the bytes it holds in all, logical bytes of its chunked generations per byte their
    packs and indexes take; None without chunked generations). Pure."""
    files = sum(m.total_size for m in manifests)
    chunked = [m for m in manifests if m.chunked]
    stored = packs_size + sum(m.total_size for m in chunked)
    ratio = round(sum(m.logical_size for m in chunked) / stored, 2) if chunked and stored else None
    return files + packs_size, ratio


def rows(
    stores: Sequence[Stored], ledger: Ledger, now: datetime | None = None
) -> tuple[list[Row], list[str]]:
    """Every generation of every store, oldest first per store and kind, and a line for each
    store that could not be listed (the others are listed all the same). The size is the sum
    of the manifest's files, and of its packs when chunked (unknown for incomplete
    generations)."""
    now = now or datetime.now(UTC)
    verified = ledger.load()
    found: list[Row] = []
    problems: list[str] = []
    for stored in stores:
        url = stored.store.url
        of_store: list[Row] = []
        manifests: list[Manifest] = []
        for kind in generation.KINDS:
            try:
                complete, incomplete = stored.store.generations(kind)
            except StoreError as exc:
                problems.append(f"{stored.name} {url}: {exc}")
                break
            for gen in sorted(complete + incomplete):
                size: int | None = None
                data_format, logical, added = "", None, None
                if gen in complete:
                    try:
                        m = stored.store.read_manifest(kind, gen)
                        size, data_format, logical, added = _figures(m)
                        manifests.append(m)
                    except (InvalidManifest, FileNotFoundError, StoreError):
                        pass
                age = int((now - generation.parse(gen)).total_seconds())
                last = verified.get(Ledger.key(url, kind, gen), "")
                of_store.append(
                    Row(
                        stored.name,
                        url,
                        kind,
                        gen,
                        size,
                        age,
                        gen in complete,
                        last,
                        data_format,
                        logical,
                        added,
                    )
                )
        packs = 0
        if any(m.chunked for m in manifests):
            try:
                packs = sum(reader.present_packs(stored.store).values())  # type: ignore[arg-type]
            except StoreError as exc:
                problems.append(f"the packs of {stored.name} {url}: {exc}")
        total, ratio = store_totals(packs, manifests)
        found += [replace(row, store_size=total, store_dedup_ratio=ratio) for row in of_store]
    return found, problems


def as_json(found: list[Row]) -> str:
    return json.dumps([asdict(row) for row in found], indent=1)


def as_table(found: list[Row]) -> str:
    headers = (
        "store",
        "kind",
        "generation",
        "format",
        "size",
        "logical",
        "added",
        "age",
        "complete",
        "last verified",
    )
    lines = [
        (
            f"{r.store} ({r.location})",
            r.kind,
            r.generation,
            r.data_format or "-",
            _size(r.size),
            _size(r.logical_size),
            _size(r.added_size),
            _age(r.age_seconds),
            "yes" if r.complete else "NO",
            r.last_verified or "never",
        )
        for r in found
    ]
    if not lines:
        return "no generations"
    widths = [max(len(row[i]) for row in [headers, *lines]) for i in range(len(headers))]
    table = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *lines]
    ]
    return "\n".join(table + _summaries(found))


def _summaries(found: list[Row]) -> list[str]:
    """One line per store: what it holds in all, and the deduplication ratio."""
    lines = []
    seen: set[str] = set()
    for row in found:
        if row.location in seen or row.store_size is None:
            continue
        seen.add(row.location)
        line = f"{row.store} ({row.location}): {_size(row.store_size)} in all"
        if row.store_dedup_ratio is not None:
            line += (
                f"; chunked data generations hold {row.store_dedup_ratio:.2f}× the "
                "bytes they take (deduplication)"
            )
        lines.append(line)
    return ["", *lines] if lines else []


def _size(size: int | None) -> str:
    return "-" if size is None else diskspace.human(size)


def _age(seconds: int) -> str:
    if seconds < 3600:
        return f"{max(0, seconds) // 60} min"
    if seconds < 86400 * 2:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"
