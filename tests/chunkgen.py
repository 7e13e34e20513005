"""Chunked data generations written straight into a store directory with the builder and the
format modules (packs, then the index, then MANIFEST.json), without Docker or a push; and
copying a store directory into S3 as a push leaves it there."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.chunks import builder, ids, index
from agent.chunks import handover as chunked
from agent.chunks.cache import DedupCache
from agent.core import manifest
from agent.core.manifest import FileEntry, Manifest, PackRef
from tests.conftest import S3_BUCKET, S3_PREFIX

SOURCE = "test-source"
SMALL_PACKS = 1 << 20


def build_chunked(
    store: Path,
    data_paths: Sequence[Path],
    gen: str,
    recipients: Sequence[Any] = (),
    key: bytes | None = None,
    pack_size: int = SMALL_PACKS,
    source: str = SOURCE,
) -> Manifest:
    """Write the chunked generation `gen` of `data_paths` (read where they are) into the
    store directory `store` (its packs/ and data/<gen>/), deduplicated against the packs
    earlier calls wrote there. Return its manifest."""
    if recipients and key is None:
        key = ids.load_or_create_key(store / ".state")
    settings = builder.BuildSettings(3, tuple(recipients), key, pack_size, 2)
    cache = DedupCache(store / ".state" / "dedup.sqlite", str(store))
    gen_dir = store / "data" / gen
    gen_dir.mkdir(parents=True)
    plain = store / ".state" / f"{gen}.index.zst"
    try:
        result = builder.build(
            Path("/"),
            [str(p).lstrip("/") for p in data_paths],
            None,
            settings,
            builder.Dedup(cache, []),
            store / "packs",
            store / ".state",
            plain,
        )
        name, size, sha256 = index.publish(plain, gen_dir, recipients)
    finally:
        cache.close()
        plain.unlink(missing_ok=True)
    files = [FileEntry(name, size, sha256)]
    if recipients:
        files.append(chunked.publish_key(gen_dir, settings))
    m = Manifest(
        source_id=source,
        kind="data",
        generation=gen,
        created_at=gen,
        downtime_seconds=0.1,
        agent_version="test",
        files=tuple(files),
        paths=tuple(map(str, data_paths)),
        format=manifest.CHUNKS_FORMAT_VERSION,
        data_format="chunks",
        encrypted=bool(recipients),
        packs=tuple(PackRef(p, s) for p, s in sorted(result.packs.items())),
        logical_size=result.logical_size,
        added_size=result.added_size,
        chunk_count=result.chunk_count,
    )
    manifest.write(gen_dir, m)
    return m


def upload_store(s3: Any, store: Path, source: str = SOURCE) -> list[str]:
    """Copy the store directory into S3 below `<prefix>/<source>/` (packs and keys first,
    manifests last) with the admin identity. Return the keys written."""
    client = s3.client()
    files = sorted(
        (p for p in store.rglob("*") if p.is_file() and ".state" not in p.relative_to(store).parts),
        key=lambda p: p.name == manifest.NAME,
    )
    keys = []
    for path in files:
        key = f"{S3_PREFIX}/{source}/{path.relative_to(store).as_posix()}"
        client.put_object(Bucket=S3_BUCKET, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys


def pack_files(store: Path) -> list[Path]:
    return sorted((store / "packs").glob("*/*.pack"))


def corrupt(path: Path, at: int = 100) -> None:
    """Flip one byte of the file at `path`."""
    with open(path, "r+b") as handle:
        handle.seek(min(at, os.path.getsize(path) - 1))
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
