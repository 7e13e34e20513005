"""Chunked generations written into a real local store with the format modules (packs,
index, manifest last), and an independent check that a generation restores byte for byte.

The writer deduplicates as the builder must: against the blobs of the packs the store holds
that are not condemned; small chunks and packs keep the tests fast and the packs many.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.chunks import blob, ids, index, pack
from agent.chunks import handover as chunked
from agent.chunks.builder import BuildSettings
from agent.chunks.pack import PackWriter
from agent.core import manifest
from agent.core.manifest import FileEntry, Manifest, PackRef
from agent.stores.local import LocalStore

PACK_SIZE = 6000
CHUNK_ID_KEY = b"chunk-id key of the test stores!"  # 32 bytes


def held_blobs(store: LocalStore) -> dict[bytes, str]:
    """Chunk id → pack id of every blob in the store's packs that are not condemned."""
    record_path = store.root / "gc" / "condemned.json"
    condemned = (
        set(json.loads(record_path.read_text())["condemned"]) if record_path.exists() else set()
    )
    found: dict[bytes, str] = {}
    for path in sorted((store.root / "packs").glob("*/*.pack")):
        pack_id = path.stem
        if pack_id in condemned:
            continue
        for entry in pack.read_trailer(pack.file_range_reader(path), path.stat().st_size):
            found.setdefault(entry.chunk_id, pack_id)
    return found


@dataclass
class Built:
    """A generation written into `root` (a store, or a handover: packs/ and data/<gen>/)."""

    manifest: Manifest
    new_packs: list[str]
    plain_index: Path


def build(
    root: Path,
    gen: str,
    files: dict[str, list[bytes]],
    dedup: dict[bytes, str],
    manifest_last: bool = True,
    other_roots: tuple[Path, ...] = (),
    recipients: tuple[Any, ...] = (),
) -> Built:
    """Write generation `gen` of `files` (path → its chunks) below `root`: new blobs into
    packs at `root/packs`, then the index, then (unless not `manifest_last`) the manifest,
    which lists every pack holding one of its chunks (those in `dedup`, found below `root`
    or `other_roots`, or new). With `recipients`, blobs and index are encrypted to them, the
    chunk ids are keyed with CHUNK_ID_KEY, and the generation carries that key."""
    key = CHUNK_ID_KEY if recipients else None
    staging = root / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    writer: PackWriter | None = None
    where: dict[bytes, str] = {}
    new_packs: list[str] = []

    def close() -> None:
        nonlocal writer
        if writer is not None:
            info = writer.close()
            new_packs.append(info.pack_id)
            for b in info.blobs:
                where[b.chunk_id] = info.pack_id
            writer = None

    pending: list[bytes] = []
    entries: list[index.Entry] = []
    for path in sorted(files, key=lambda p: index.sort_key(p.encode())):
        offset = 0
        chunk_list = []
        for chunk in files[path]:
            cid = ids.chunk_id(chunk, key)
            chunk_list.append((cid.hex(), offset, len(chunk)))
            offset += len(chunk)
            if cid in dedup or cid in where or cid in pending:
                continue
            data = blob.encode(chunk, 1, recipients)
            if writer is not None and not writer.fits(len(data)):
                close()
                pending.clear()
            if writer is None:
                writer = PackWriter(root / "packs", staging, PACK_SIZE)
            writer.add(cid, data, len(chunk))
            pending.append(cid)
        content = b"".join(files[path])
        entries.append(
            index.Entry(
                path.encode(),
                "file",
                0o644,
                0,
                0,
                0,
                size=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                chunks=chunk_list,
            )
        )
    close()
    used = {bytes.fromhex(c) for e in entries for c, _, _ in e.chunks}
    listed = sorted({dedup.get(c) or where[c] for c in used})
    sizes = {p: pack_size(p, (root, *other_roots)) for p in listed}
    directory = root / "data" / gen
    directory.mkdir(parents=True, exist_ok=True)
    plain = staging / "index.zst"
    iw = index.IndexWriter(plain, 1)
    for entry in entries:
        iw.write(entry)
    iw.close()
    name, size, sha = index.publish(plain, directory, recipients)
    listed_files = [FileEntry(name, size, sha)]
    if recipients:
        settings = BuildSettings(1, recipients, key, PACK_SIZE, 1)
        listed_files.append(chunked.publish_key(directory, settings))
    m = Manifest(
        source_id="test",
        kind="data",
        generation=gen,
        created_at=gen,
        downtime_seconds=0.0,
        agent_version="test",
        files=tuple(listed_files),
        format=manifest.CHUNKS_FORMAT_VERSION,
        data_format="chunks",
        encrypted=bool(recipients),
        packs=tuple(PackRef(p, sizes[p]) for p in listed),
        logical_size=sum(e.size for e in entries),
        chunk_count=len(used),
    )
    if manifest_last:
        manifest.write(directory, m)
    plain.rename(root / f".plain-index-{gen}.zst")
    shutil.rmtree(staging, ignore_errors=True)
    return Built(m, new_packs, root / f".plain-index-{gen}.zst")


def pack_size(pack_id: str, roots: tuple[Path, ...]) -> int:
    """The size of pack `pack_id` in the first of `roots` holding it."""
    for root in roots:
        path = root / ids.pack_key(pack_id)
        if path.exists():
            return path.stat().st_size
    raise FileNotFoundError(f"pack {pack_id} is in none of {roots}")


def restore(
    root: Path, gen: str, pack_roots: tuple[Path, ...] = (), identities: tuple[Any, ...] = ()
) -> dict[str, bytes]:
    """Restore generation `gen` of the store at `root` from its manifest alone: every listed
    pack present (below `root`, or the first of `pack_roots` holding it) with its size and
    sha256, every chunk of its index found in them, every file's sha256 right. Return path →
    content. Raise AssertionError naming what is wrong."""
    m = manifest.read(root / "data" / gen)
    where: dict[bytes, tuple[Path, pack.BlobEntry]] = {}
    for ref in m.packs:
        path = next(
            (
                r / ids.pack_key(ref.id)
                for r in (root, *pack_roots)
                if (r / ids.pack_key(ref.id)).is_file()
            ),
            None,
        )
        assert path is not None, f"{gen}: listed pack {ref.id} is missing"
        assert path.stat().st_size == ref.size, f"{gen}: pack {ref.id} has another size"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.id, f"{ref.id} is damaged"
        for entry in pack.read_trailer(pack.file_range_reader(path), ref.size):
            where.setdefault(entry.chunk_id, (path, entry))
    index_file = root / "data" / gen / m.files[0].path
    assert hashlib.sha256(index_file.read_bytes()).hexdigest() == m.files[0].sha256
    restored = {}
    for entry in index.read_entries(index_file, identities):
        content = bytearray()
        for cid, offset, length in entry.chunks:
            assert bytes.fromhex(cid) in where, (
                f"{gen}: chunk {cid} of {entry.path!r} in no listed pack"
            )
            path, b = where[bytes.fromhex(cid)]
            with open(path, "rb") as handle:
                handle.seek(b.offset)
                chunk = blob.decode(handle.read(b.stored_length), b.raw_length, identities)
            assert len(content) == offset and len(chunk) == length
            content += chunk
        assert hashlib.sha256(content).hexdigest() == entry.sha256
        restored[entry.path.decode()] = bytes(content)
    return restored


class Crash(Exception):
    """The process died here (injected between two I/O steps)."""


class CrashingStore:
    """A real store that dies before its `crash_at`-th change (None: never), counting the
    changes it let through in `changes`. A generation's removal can also die halfway: after
    its manifest is gone, before the rest (`halfway`)."""

    MUTATING = ("put_bytes", "put_file", "delete_object", "replace_manifest")

    def __init__(self, store: LocalStore, crash_at: int | None, halfway: bool = False) -> None:
        self.store = store
        self.crash_at = crash_at
        self.halfway = halfway
        self.changes = 0

    def _step(self) -> None:
        if self.crash_at is not None and self.changes >= self.crash_at:
            raise Crash(f"killed before change {self.changes}")
        self.changes += 1

    def __getattr__(self, name: str):
        attribute = getattr(self.store, name)
        if name not in self.MUTATING:
            return attribute

        def changing(*args, **kwargs):
            self._step()
            return attribute(*args, **kwargs)

        return changing

    def delete_generation(self, kind: str, gen: str) -> None:
        if self.halfway and self.crash_at is not None and self.changes == self.crash_at:
            (self.store.path(kind, gen) / manifest.NAME).unlink()
            raise Crash("killed after the manifest was removed")
        self._step()
        self.store.delete_generation(kind, gen)
