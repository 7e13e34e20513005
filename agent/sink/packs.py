"""The packs of a chunked generation arriving on the sink (2.a, pull), before its index:

    the packs the sink store lacks → rsync by name from the handover's packs, then any still
    missing from the source store's (chunks.pulled) → into `.incoming/<source>/packs/`
    (resumable: `--partial`, and a killed rsync's temporary file taken up) → each checked:
    a regular file with the listed size whose sha256 is its id → moved into the sink store

A pack that fails its check is removed and nothing of the generation is stored or
acknowledged; the next pull fetches it again. Packs are immutable, so what arrived and
passed stays for the next try.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.chunks import ids, pack, pulled, transport
from agent.core.manifest import Manifest, PackRef
from agent.sink import incoming
from agent.sink.ssh import Gateway, TransferStats
from agent.stores import VerificationFailed
from agent.stores.local import LocalStore

logger = logging.getLogger(__name__)


@dataclass
class Arrived:
    stats: TransferStats
    packs: int = 0
    bytes: int = 0


def _name(ref: PackRef) -> str:
    """The pack's path below a `packs/` directory: `<2 hex>/<id>.pack`."""
    return ids.pack_key(ref.id).removeprefix(f"{ids.PACKS_DIR}/")


def fetch_lacking(gateway: Gateway, store: LocalStore, m: Manifest, directory: Path) -> Arrived:
    """Put into `store` every pack `m` lists that it lacks, fetched into `directory` first
    (see the module's docstring). Raise VerificationFailed for a pack the source holds in
    neither place or one that is not what its id says (then nothing was moved), SshError."""
    lacking = transport.missing(store, m.packs)
    arrived = Arrived(TransferStats())
    if not lacking:
        return arrived
    names = [_name(ref) for ref in lacking]
    incoming.take_up_temporaries_of(directory, names)
    for root in (pulled.HANDOVER_PACKS, pulled.STORED_PACKS):
        wanted = [n for n in names if not os.path.lexists(directory / n)]
        if wanted:
            arrived.stats += gateway.fetch_packs(root, wanted, directory)
    incoming.drop_partials(directory)
    problems = [problem for ref in lacking if (problem := _check(directory, ref))]
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise VerificationFailed("; ".join(problems[:3]) + more)
    for ref in lacking:
        store.move_file(ids.pack_key(ref.id), directory / _name(ref))
        arrived.packs += 1
        arrived.bytes += ref.size
    logger.info(
        "%s: %d pack(s) of %s fetched (%d bytes), %d already in the sink store",
        m.source_id,
        arrived.packs,
        m.generation,
        arrived.bytes,
        len(m.packs) - len(lacking),
    )
    return arrived


def _check(directory: Path, ref: PackRef) -> str:
    """What is wrong with the fetched copy of pack `ref` ('' if nothing); a bad copy is
    removed, so the next pull fetches it whole again."""
    path = directory / _name(ref)
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return (
            f"pack {ref.id} is in neither HANDOVER_DIR nor SOURCE_STORE_DIR of the source; "
            "the generation is not stored"
        )
    problem = ""
    if not stat.S_ISREG(found.st_mode):
        problem = "not a regular file"
    elif found.st_size != ref.size:
        problem = f"{found.st_size} bytes, the manifest says {ref.size}"
    else:
        try:
            pack.verify_file(path, ref.id)
        except pack.PackError:
            problem = "its sha256 is not its id"
    if problem:
        path.unlink()
        return f"pack {ref.id} as fetched: {problem}; it is not stored"
    return ""
