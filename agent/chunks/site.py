"""A site's chunked generations from its configuration: the stores a generation goes to (push:
the S3 sink store and the source store; pull: the source store, less what the sink gave up),
the build settings, step 1's build, and a pull site's housekeeping after it."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Iterable
from datetime import UTC, datetime

from agent.chunks import gc, prune, pulled
from agent.chunks import handover as chunked
from agent.chunks.builder import BuildSettings
from agent.config import SourceConfig
from agent.core import archive
from agent.core.handover import Handover
from agent.stores.local import LocalStore
from agent.stores.s3 import S3Store

logger = logging.getLogger(__name__)

# Listing the sink store's packs at build time waits this long for an S3 outage at most: the
# generation is built all the same (see chunked.open_cache).
_LISTING_PATIENCE_SECONDS = 10


def sink_store(config: SourceConfig, patience: int | None = None) -> S3Store:
    settings = config.s3
    if patience is not None:
        settings = dataclasses.replace(
            settings, retry_seconds=min(settings.retry_seconds, patience)
        )
    return S3Store(settings, config.source_id)


def source_store(config: SourceConfig) -> LocalStore:
    return LocalStore(config.source_store_dir)


def build_settings(config: SourceConfig, handover: Handover) -> BuildSettings:
    return BuildSettings(
        level=config.zstd_level,
        recipients=config.encrypt_recipients,
        key=chunked.chunk_id_key(handover, config.encryption_domain),
        pack_size=config.pack_size,
        threads=config.zstd_threads or os.cpu_count() or 1,
    )


def build(config: SourceConfig, handover: Handover) -> chunked.Built:
    """Build this run's chunked data generation from the mirror into the data staging
    directory (its packs into the handover), leaving out what EXCLUDE and EXCLUDE_IF_PRESENT
    exclude (the mirror lacks it already, but for a directory marked after the last walk),
    deduplicated against the sink store and the
    source store. Log what it read and wrote. Raise OSError if the mirror cannot be read."""
    excluded = config.excludes.skipper(handover.mirror("data"), config.data_paths)
    stores: list[chunked.ObjectStore] = [source_store(config)]
    condemned: dict[str, Iterable[str]] | None = None
    if config.s3.bucket:
        stores.insert(0, sink_store(config, _LISTING_PATIENCE_SECONDS))
    else:
        # Pull: the sink holds what it pulled (the source store's packs, which every acked
        # generation's 2.c put there) but what it reported condemned or deleted.
        condemned = {stores[0].url: pulled.given_up(handover)}
    built = chunked.build(
        handover,
        stores,
        handover.staging("data"),
        [archive.member_name(p) for p in config.data_paths],
        build_settings(config, handover),
        config.encryption_domain,
        condemned,
        skip=None
        if excluded is None
        else lambda path, st: excluded(path, stat.S_ISDIR(st.st_mode)),
    )
    r = built.result
    logger.info(
        "chunked data: %d file(s) read (%d bytes), %d unchanged file(s) reused unread, "
        "%d new pack(s) (%d bytes); the generation references %d pack(s), %d bytes of files",
        r.files_read,
        r.bytes_read,
        r.files_reused,
        len(r.new_packs),
        r.added_size,
        len(r.packs),
        r.logical_size,
    )
    return built


def pull_housekeeping(config: SourceConfig, handover: Handover) -> list[str]:
    """A pull site, under the agent's lock after handing over: collect the source store's
    garbage (the gateway's `ack` moves generations in and rotates, but never deletes a pack:
    a build could be counting on it), free the handover of packs no waiting generation lists,
    and forget the packs the sink deleted that the source store no longer holds. Return the
    lines saying what went; a store that cannot be collected now is logged, not a failure."""
    store = source_store(config)
    settings = prune.settings_for(config)
    lines = prune.after_rotation(
        store, "source store", handover, settings, gc.run_id(datetime.now(UTC))
    )
    chunked.free_packs(handover)
    pulled.forget_gone(handover, (p for p, _ in chunked.packs_of(store)))
    return lines
