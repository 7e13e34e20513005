"""A pull site's source side without Docker: a chunked data generation built from the data
mirror into the handover, deduplicated as `source backup` does on a pull site (against the
source store, less what the sink reported condemned or deleted), and published shared with
the gateway users. For the pull tests and bench/pull_chunks.py."""

from __future__ import annotations

from pathlib import Path

from agent.chunks import handover as chunked
from agent.chunks import pulled
from agent.chunks.builder import BuildSettings
from agent.core import manifest
from agent.core.handover import Handover
from agent.core.manifest import Manifest
from agent.stores.local import LocalStore
from tests.sshd import share_tree

DATA = "srv/app"  # the data path /srv/app, as it lies in the mirror


def mirror_dir(handover: Path) -> Path:
    return Handover(handover).mirror("data") / DATA


def hand_over_mirror(
    handover: Path,
    source_store: Path,
    source_id: str,
    gen: str,
    recipients: tuple[object, ...] = (),
    pack_size: int = 1 << 20,
    threads: int = 2,
    domain: str = "",
) -> Manifest:
    """Build the chunked generation `gen` of what the mirror holds below `srv/app` into the
    handover and publish it (`domain`: of the recipients, see SourceConfig). Return its
    manifest."""
    place = Handover(handover)
    place.discard_staging()
    staging = place.fresh_staging("data")
    domain = domain or ("recipients" if recipients else "")
    store = LocalStore(source_store)
    built = chunked.build(
        place,
        [store],
        staging,
        [DATA],
        BuildSettings(3, recipients, chunked.chunk_id_key(place, domain), pack_size, threads),
        domain,
        {store.url: pulled.given_up(place)},
    )
    stamp = {
        "source_id": source_id,
        "generation": gen,
        "created_at": gen.replace("T", " "),
        "downtime_seconds": 0.1,
        "agent_version": "test",
    }
    m = chunked.chunked_manifest(stamp, [f"/{DATA}"], built, bool(recipients))
    manifest.write(staging, m)
    place.publish("data", gen)
    chunked.keep_parent(place, built, domain)
    place.discard_staging()
    share_tree(handover)
    return m
