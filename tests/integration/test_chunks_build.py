"""Building chunked generations from a mirror on the real file system: what the index and
packs hold restores byte for byte, a second run reads only what changed, a blob is stored
once whichever file holds it, and only in packs every store holds."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyrage
import pytest

from agent.chunks import handover as chunked
from agent.chunks import ids, index, pack
from agent.chunks.builder import BuildSettings
from agent.core import manifest
from agent.core.handover import Handover
from agent.stores.local import LocalStore
from tests.chunked import MiB, make_tricky_tree, restore_by_hand
from tests.trees import snapshot

MEMBER = "srv/app"


@pytest.fixture
def site(tmp_path: Path) -> tuple[Handover, list[LocalStore]]:
    handover = Handover(tmp_path / "handover")
    handover.mirror("data").joinpath(MEMBER).mkdir(parents=True)
    return handover, [LocalStore(tmp_path / "sink"), LocalStore(tmp_path / "store")]


def settings(
    recipients: tuple[object, ...] = (), key: bytes | None = None, pack_size: int = 8 * MiB
) -> BuildSettings:
    return BuildSettings(level=3, recipients=recipients, key=key, pack_size=pack_size, threads=2)


def run(
    handover: Handover,
    stores: list[LocalStore],
    gen: str,
    recipients: tuple = (),
    domain: str = "",
    into_stores: bool = True,
) -> chunked.Built:
    """One build published into the handover; then, as a transport would, the packs and the
    generation moved into every store (unless `into_stores` is false: it waits)."""
    handover.discard_staging()
    staging = handover.fresh_staging("data")
    built = chunked.build(
        handover,
        stores,
        staging,
        [MEMBER],
        settings(recipients, chunked.chunk_id_key(handover, domain)),
        domain,
    )
    stamp = {
        "source_id": "s",
        "generation": gen,
        "created_at": "2026-11-28T02:00:00Z",
        "downtime_seconds": 0.1,
        "agent_version": "0",
    }
    manifest.write(
        staging, chunked.chunked_manifest(stamp, ["/" + MEMBER], built, bool(recipients))
    )
    handover.publish("data", gen)
    chunked.keep_parent(handover, built, domain)
    if into_stores:
        for store in stores:
            for pack_id, _ in chunked.packs_of(LocalStore(handover.root)):
                target = store.root / ids.pack_key(pack_id)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    shutil.copy(handover.root / ids.pack_key(pack_id), target)
            shutil.copytree(handover.generation_dir("data", gen), store.path("data", gen))
        shutil.rmtree(handover.generation_dir("data", gen))
        chunked.free_packs(handover)
    return built


def mirror(handover: Handover) -> Path:
    return handover.mirror("data") / MEMBER


def test_the_tricky_tree_restores_byte_for_byte_from_the_index_and_packs(site, tmp_path):
    handover, stores = site
    make_tricky_tree(mirror(handover))
    before = snapshot(mirror(handover))
    built = run(handover, stores, "2026-11-28T02-00-00Z")
    target = tmp_path / "restored"
    restore_by_hand(stores[1].root, "2026-11-28T02-00-00Z", target)
    assert snapshot(target / MEMBER) == before
    assert os.stat(target / MEMBER / "sparse.img").st_blocks * 512 < 4 * MiB
    assert built.result.bytes_read < 8 * MiB, "the holes of the sparse file were read"
    assert built.result.skipped == 0


def test_the_index_keeps_every_kind_of_entry(site):
    handover, stores = site
    make_tricky_tree(mirror(handover))
    run(handover, stores, "2026-11-28T02-00-00Z")
    gen_dir = stores[0].path("data", "2026-11-28T02-00-00Z")
    entries = {e.path: e for e in index.read_entries(gen_dir / index.NAME)}
    base = MEMBER.encode()
    assert entries[base + b"/uploads/photo-hardlink.jpg"].link == base + b"/uploads/photo one.jpg"
    assert entries[base + b"/uploads/photo one.jpg"].mode == 0o4755
    assert entries[base + b"/uploads/photo one.jpg"].mtime_ns == 1_600_000_000_123_456_789
    assert entries[base + b"/db/PG_VERSION"].uid == 999
    assert entries[base + b"/uploads/latin-\xe9t\xe9.txt"].type == "file"
    assert entries[base + b"/a-fifo"].type == "fifo"
    assert entries[base + b"/empty/nested-empty"].type == "dir"
    assert list(entries) == sorted(entries, key=index.sort_key)


def test_a_second_run_reads_only_the_files_that_changed(site, tmp_path):
    handover, stores = site
    make_tricky_tree(mirror(handover))
    relation = mirror(handover) / "db" / "base" / "16384"
    # Seeded, so the chunk boundaries are the same every run: a file of random bytes may
    # hold no cut point at all within 2 MiB, and then one chunk is the whole file.
    relation.write_bytes(random.Random(16384).randbytes(8 * MiB))
    run(handover, stores, "2026-11-28T02-00-00Z")
    with open(relation, "r+b") as handle:
        handle.seek(4 * MiB)
        handle.write(random.Random(4096).randbytes(4096))
    (mirror(handover) / "new.txt").write_bytes(b"new file")
    before = snapshot(mirror(handover))

    second = run(handover, stores, "2026-11-29T02-00-00Z").result

    assert second.files_read == 2
    assert second.bytes_read == 8 * MiB + len(b"new file")
    assert second.files_reused == 8
    assert second.added_size < 3 * MiB, "unchanged chunks of the changed file stored again"
    target = tmp_path / "restored"
    restore_by_hand(stores[0].root, "2026-11-29T02-00-00Z", target)
    assert snapshot(target / MEMBER) == before


def test_the_same_content_in_two_files_is_stored_once(site):
    handover, stores = site
    data = os.urandom(2 * MiB)
    (mirror(handover) / "a").write_bytes(data)
    (mirror(handover) / "b").write_bytes(data)
    built = run(handover, stores, "2026-11-28T02-00-00Z")
    assert built.result.added_size < 2 * MiB + 64 * 1024
    assert built.result.chunk_count >= 2


def test_a_file_changed_with_the_same_size_and_mtime_but_a_new_inode_is_read_again(site):
    handover, stores = site
    path = mirror(handover) / "f"
    path.write_bytes(b"one")
    run(handover, stores, "2026-11-28T02-00-00Z")
    st = path.stat()
    replacement = path.with_name("f.new")
    replacement.write_bytes(b"two")
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, path)
    second = run(handover, stores, "2026-11-29T02-00-00Z")
    assert second.result.files_read == 1


def test_a_chunk_only_one_store_holds_is_stored_again(site):
    handover, stores = site
    (mirror(handover) / "f").write_bytes(os.urandom(MiB))
    first = run(handover, stores, "2026-11-28T02-00-00Z").result
    [pack_id] = [p.pack_id for p in first.new_packs]
    (stores[1].root / ids.pack_key(pack_id)).unlink()  # lost behind the cache's back
    second = run(handover, stores, "2026-11-29T02-00-00Z").result
    assert second.files_read == 1 and len(second.new_packs) == 1
    assert (stores[1].root / ids.pack_key(second.new_packs[0].pack_id)).is_file()


def test_the_packs_of_a_waiting_generation_are_deduplicated_against(site):
    handover, stores = site
    (mirror(handover) / "f").write_bytes(os.urandom(MiB))
    first = run(handover, stores, "2026-11-28T02-00-00Z", into_stores=False).result
    (mirror(handover) / "g").write_bytes(b"more")
    second = run(handover, stores, "2026-11-29T02-00-00Z", into_stores=False).result
    assert second.files_reused == 1
    assert {p.pack_id for p in first.new_packs} <= set(second.packs)


def test_with_a_deleted_cache_the_next_run_rebuilds_it_from_the_stores(site):
    handover, stores = site
    (mirror(handover) / "f").write_bytes(os.urandom(MiB))
    run(handover, stores, "2026-11-28T02-00-00Z")
    for cache in chunked.state_dir(handover).glob("cache-*"):
        cache.unlink()
    (chunked.state_dir(handover) / chunked.PARENT_INDEX).unlink()
    second = run(handover, stores, "2026-11-29T02-00-00Z").result
    assert second.files_read == 1 and second.new_packs == []


def test_the_same_file_under_two_keys_gets_two_chunk_ids(site):
    handover, stores = site
    identity = pyrage.x25519.Identity.generate()
    (mirror(handover) / "f").write_bytes(b"same content" * 1000)
    first = run(handover, stores, "2026-11-28T02-00-00Z", (identity.to_public(),), "one")
    second = run(handover, stores, "2026-11-29T02-00-00Z", (identity.to_public(),), "two")
    assert second.result.files_read == 1, "a new recipient set reuses nothing"
    [a], [b] = (_blobs(stores[0], built.result.new_packs[0].pack_id) for built in (first, second))
    assert a.chunk_id != b.chunk_id
    assert a.chunk_id != ids.chunk_id(b"same content" * 1000, None)


def _blobs(store: LocalStore, pack_id: str) -> tuple[pack.BlobEntry, ...]:
    """The blobs of a pack in `store`, from its trailer."""
    path = store.root / ids.pack_key(pack_id)
    return pack.read_trailer(pack.file_range_reader(path), path.stat().st_size)


def test_a_missing_data_path_in_the_mirror_fails_the_build_and_leaves_no_index(site):
    handover, stores = site
    shutil.rmtree(mirror(handover))
    with pytest.raises(FileNotFoundError):
        run(handover, stores, "2026-11-28T02-00-00Z")
    assert not (chunked.state_dir(handover) / "index.zst.tmp").exists()


def test_packs_no_waiting_generation_lists_leave_the_handover(site):
    handover, stores = site
    (mirror(handover) / "f").write_bytes(os.urandom(MiB))
    run(handover, stores, "2026-11-28T02-00-00Z", into_stores=False)
    assert chunked.free_packs(handover) == 0, "the waiting generation's pack was removed"
    shutil.rmtree(handover.generation_dir("data", "2026-11-28T02-00-00Z"))
    assert chunked.free_packs(handover) == 1
    assert list(chunked.packs_of(LocalStore(handover.root))) == []


def test_the_restorer_in_the_format_document_restores_the_tricky_tree(site, tmp_path):
    handover, stores = site
    make_tricky_tree(mirror(handover))
    before = snapshot(mirror(handover))
    run(handover, stores, "2026-11-28T02-00-00Z")
    text = (Path(__file__).parents[2] / "docs" / "chunks-format.md").read_text()
    script = tmp_path / "restore.py"
    script.write_text(text.split("```python\n", 1)[1].split("```\n", 1)[0])
    subprocess.run(
        [
            sys.executable,
            str(script),
            str(stores[1].root),
            "2026-11-28T02-00-00Z",
            str(tmp_path / "by-hand"),
        ],
        check=True,
    )
    assert snapshot(tmp_path / "by-hand" / MEMBER) == before


def test_unchanged_files_beyond_one_lookup_batch_are_reused_and_indexed_as_before(site):
    handover, stores = site
    files = 1300  # more than two batches of the previous index read ahead (512 entries)
    for no in range(files):
        (mirror(handover) / f"f{no:04}").write_bytes(b"%d" % no * 50)
    first = run(handover, stores, "2026-11-28T02-00-00Z").result
    (mirror(handover) / "f0700").write_bytes(b"changed")
    second = run(handover, stores, "2026-11-29T02-00-00Z").result
    assert (first.files_read, second.files_read, second.files_reused) == (files, 1, files - 1)
    assert second.new_packs and set(first.packs) <= set(second.packs)
    lines = {
        gen: list(index.read_entries(stores[1].path("data", gen) / index.NAME))
        for gen in ("2026-11-28T02-00-00Z", "2026-11-29T02-00-00Z")
    }
    old, new = lines["2026-11-28T02-00-00Z"], lines["2026-11-29T02-00-00Z"]
    assert [e.path for e in old] == [e.path for e in new]
    differing = [b.path for a, b in zip(old, new, strict=True) if a.line != b.line]
    assert differing == [MEMBER.encode() + b"/f0700"]
    assert all(index.to_json(e) == e.line for e in new), "a reused line is not its entry's"
