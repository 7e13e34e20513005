"""The dedup cache: what it knows follows the store's listing, condemned packs are never
deduplicated against, and a damaged or deleted cache is rebuilt."""

from __future__ import annotations

from pathlib import Path

from agent.chunks import pack
from agent.chunks.cache import DedupCache, path_for
from agent.chunks.pack import BlobEntry

P1, P2, P3 = ("1" * 64, "2" * 64, "3" * 64)


def blobs(*names: bytes) -> tuple[BlobEntry, ...]:
    return tuple(BlobEntry(n * 32, i * 10, 10, 20) for i, n in enumerate(names))


TRAILERS = {P1: blobs(b"a", b"b"), P2: blobs(b"c"), P3: blobs(b"a", b"d")}


def reader(read: list[str]):
    def read_trailer(pack_id: str, size: int) -> tuple[BlobEntry, ...]:
        read.append(pack_id)
        if pack_id not in TRAILERS:
            raise pack.PackError("not a pack")
        return TRAILERS[pack_id]

    return read_trailer


def cache(tmp_path: Path) -> DedupCache:
    return DedupCache(path_for(tmp_path, "s3://bucket/prefix/source"), "s3://bucket/prefix/source")


def test_a_sync_reads_the_trailers_of_the_packs_it_does_not_know_only(tmp_path):
    read: list[str] = []
    c = cache(tmp_path)
    assert c.sync([(P1, 100), (P2, 50)], reader(read)) == (2, 0)
    assert c.sync([(P1, 100), (P2, 50)], reader(read)) == (0, 0)
    assert read == [P1, P2]
    assert c.pack_of(b"a" * 32) == P1 and c.pack_of(b"c" * 32) == P2
    assert c.pack_size(P1) == 100 and c.total_size() == 150


def test_a_pack_gone_from_the_store_is_forgotten_with_its_blobs(tmp_path):
    c = cache(tmp_path)
    c.sync([(P1, 100), (P2, 50)], reader([]))
    assert c.sync([(P2, 50)], reader([])) == (0, 1)
    assert c.pack_of(b"a" * 32) is None and c.pack_size(P1) is None


def test_a_pack_of_another_size_than_cached_is_read_again(tmp_path):
    read: list[str] = []
    c = cache(tmp_path)
    c.sync([(P1, 100)], reader(read))
    c.sync([(P1, 101)], reader(read))
    assert read == [P1, P1] and c.pack_size(P1) == 101


def test_condemned_packs_are_left_out(tmp_path):
    c = cache(tmp_path)
    c.sync([(P1, 100), (P2, 50)], reader([]), condemned=[P2])
    assert c.pack_of(b"c" * 32) is None
    c.sync([(P1, 100), (P2, 50)], reader([]))
    assert c.pack_of(b"c" * 32) == P2


def test_a_chunk_in_two_packs_keeps_the_first_until_that_one_goes(tmp_path):
    c = cache(tmp_path)
    c.sync([(P1, 100), (P3, 80)], reader([]))
    assert c.pack_of(b"a" * 32) == P1
    c.sync([(P3, 80)], reader([]))
    assert c.pack_of(b"a" * 32) is None, "forgotten with P1: costs an upload, never a loss"
    assert c.pack_of(b"d" * 32) == P3


def test_a_pack_whose_trailer_does_not_read_is_not_deduplicated_against(tmp_path):
    c = cache(tmp_path)
    assert c.sync([("9" * 64, 10), (P2, 50)], reader([])) == (1, 0)
    assert c.pack_size("9" * 64) is None


def test_a_damaged_cache_file_is_replaced_and_filled_again(tmp_path):
    path = path_for(tmp_path, "s3://bucket/prefix/source")
    path.write_bytes(b"this is not a database" * 100)
    c = cache(tmp_path)
    c.sync([(P1, 100)], reader([]))
    assert c.pack_of(b"b" * 32) == P1


def test_the_cache_survives_a_reopen(tmp_path):
    c = cache(tmp_path)
    c.sync([(P1, 100)], reader([]))
    c.close()
    assert cache(tmp_path).pack_of(b"a" * 32) == P1
