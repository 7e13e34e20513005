"""Chunked generations in pull mode: where the gateway serves packs from, and what the sink
tells the source with each acknowledgement.

The sink rsyncs a generation's packs by name from two read-only roots behind the gateway,
`packs/` (the handover's packs: those no store was known to hold) and then, for any it still
lacks, `stored-packs/` (the source store's: every pack a waiting generation lists that is not
in the handover is there, since the source deduplicates only against packs its own store
holds, and its garbage collection keeps what waiting generations list).

The sink's garbage collection runs before it acknowledges; the acknowledgement carries a
SinkReport: the packs the sink has condemned (its whole phase-1 record) and those it deleted
in this job. The source keeps them (`<HANDOVER_DIR>/.pull/sink.json`) and no later build
deduplicates against them, so only a build that began before the acknowledgement can still
name such a pack — and when the sink finds a pulled generation naming a pack it lacks, it
fetches that pack from the source store, which keeps it until that generation is
acknowledged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.chunks import ids
from agent.core.handover import Handover

logger = logging.getLogger(__name__)

HANDOVER_PACKS = "packs"
STORED_PACKS = "stored-packs"
REPORT_LIMIT = 4 << 20  # about 60 000 pack ids
RECORD = Path(".pull") / "sink.json"


@dataclass(frozen=True)
class SinkReport:
    """`condemned`: every pack the sink's phase-1 record holds; `deleted`: the packs it
    deleted in this job. Both sorted."""

    condemned: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return json.dumps({"condemned": self.condemned, "deleted": self.deleted}).encode()

    @classmethod
    def decode(cls, data: bytes) -> SinkReport:
        """Parse what the sink sent. Raise ValueError for anything but two lists of pack
        ids (an empty input is an empty report: a sink of an older release)."""
        if len(data) > REPORT_LIMIT:
            raise ValueError(f"a report longer than {REPORT_LIMIT} bytes")
        if not data.strip():
            return cls()
        body = json.loads(data)
        if not isinstance(body, dict) or set(body) - {"condemned", "deleted"}:
            raise ValueError("a report holds `condemned` and `deleted` only")
        lists = []
        for name in ("condemned", "deleted"):
            value = body.get(name, [])
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"`{name}` is not a list of pack ids")
            lists.append(tuple(sorted({ids.check_hex(p) for p in value})))
        return cls(*lists)


def record_report(handover: Handover, report: SinkReport) -> None:
    """Keep what the sink gave up: its condemned packs as it reports them now, and every
    pack it ever reported deleted (until forget_gone drops those the source no longer
    holds)."""
    before = _read(handover)
    _write(handover, report.condemned, set(before.deleted) | set(report.deleted))


def given_up(handover: Handover) -> set[str]:
    """The packs the sink condemned or deleted, as it last reported them."""
    body = _read(handover)
    return set(body.condemned) | set(body.deleted)


def forget_gone(handover: Handover, held: Iterable[str]) -> None:
    """Drop from the record the deleted packs the source store does not hold (`held` are
    those it does): no build can deduplicate against them any more."""
    body = _read(handover)
    kept = set(body.deleted) & set(held)
    if kept != set(body.deleted):
        _write(handover, body.condemned, kept)


def _write(handover: Handover, condemned: Iterable[str], deleted: Iterable[str]) -> None:
    """Write the record atomically."""
    path = handover.root / RECORD
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(SinkReport(tuple(sorted(condemned)), tuple(sorted(deleted))).encode() + b"\n")
    os.replace(tmp, path)


def _read(handover: Handover) -> SinkReport:
    path = handover.root / RECORD
    try:
        return SinkReport.decode(path.read_bytes())
    except FileNotFoundError:
        return SinkReport()
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); taking it as empty", path, exc)
        return SinkReport()
