"""`files` and `export`: look into a data generation of either format without restoring it.

    choose the generation (as restore does: --from, --generation, default the newest) →
    files: list its entries (at or below PATH) | export: stream it to stdout as a tar

Both only read the store; neither takes the agent's lock nor touches the application.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import BinaryIO, TextIO

from agent.chunks import export as exporting
from agent.chunks import listing
from agent.chunks.reader import ReadFailed
from agent.config import SourceConfig
from agent.core.encryption import DecryptionFailed
from agent.core.manifest import Manifest
from agent.core.members import UnsafeMember
from agent.recovery.restore import RestoreRefused, choose
from agent.stores import ReadableStore, StoreError

logger = logging.getLogger(__name__)


class BrowseFailed(Exception):
    """The generation could not be read as its manifest says; the message is one line."""


def _identities(config: SourceConfig, m: Manifest) -> tuple[object, ...]:
    encrypted = m.encrypted if m.chunked else m.files[0].encrypted
    if encrypted and not config.decrypt_identities:
        raise RestoreRefused(
            f"generation {m.generation} is encrypted; set "
            "DECRYPT_IDENTITY_FILE to the age identity or SSH private key of "
            "one of its recipients"
        )
    return tuple(config.decrypt_identities) if encrypted else ()


def files(
    config: SourceConfig,
    store: ReadableStore,
    wanted: str | None,
    path: str,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> int:
    """Print the entries of the generation at or below `path` (absolute; '' for all); return
    how many. Raise RestoreRefused if there is no such generation or no such path in it,
    BrowseFailed if it cannot be read."""
    if path and not path.startswith("/"):
        raise RestoreRefused(f"{path}: give the absolute path, as `files` lists them")
    m = choose(store, config.source_id, wanted)
    identities = _identities(config, m)
    count = 0
    try:
        for item in listing.items(store, m, identities, os.fsencode(path)):  # type: ignore[arg-type]
            out.write((listing.as_json(item) if as_json else listing.as_line(item)) + "\n")
            count += 1
    except (ReadFailed, DecryptionFailed, StoreError) as exc:
        raise BrowseFailed(str(exc)) from None
    if path and not count:
        raise RestoreRefused(f"generation {m.generation} holds no {path}")
    return count


def export(
    config: SourceConfig, store: ReadableStore, wanted: str | None, out: BinaryIO
) -> exporting.Exported:
    """Write the generation to `out` as a tar stream. Raise RestoreRefused if there is no
    such generation, BrowseFailed if it cannot be read (the stream then stops short)."""
    m = choose(store, config.source_id, wanted)
    identities = _identities(config, m)
    started = time.monotonic()
    try:
        result = exporting.export(store, m, identities, out)  # type: ignore[arg-type]
    except (ReadFailed, DecryptionFailed, StoreError, UnsafeMember) as exc:
        raise BrowseFailed(f"export of {m.generation} from {store.url} stopped: {exc}") from None
    out.flush()
    logger.info(
        "exported %s from %s: %d entries, %d bytes of files, %.2f s",
        m.generation,
        store.url,
        result.entries,
        result.size,
        time.monotonic() - started,
    )
    return result
