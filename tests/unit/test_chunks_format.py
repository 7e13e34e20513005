"""The chunks format's pieces on their own: ids, blobs, packs, index entries, the chunker and
the chunked manifest (docs/chunks-format.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyrage
import pytest

from agent.chunks import blob, chunker, ids, index, pack
from agent.core import encryption, manifest
from agent.core.manifest import FileEntry, Manifest, PackRef


def test_chunk_ids_are_keyed_so_the_same_chunk_under_two_keys_has_two_ids() -> None:
    data = b"the same content" * 100
    plain = ids.chunk_id(data, None)
    assert plain == ids.chunk_id(data, None)
    assert len({plain, ids.chunk_id(data, b"k" * 32), ids.chunk_id(data, b"j" * 32)}) == 3


def test_the_chunk_id_key_is_made_once_and_kept(tmp_path: Path) -> None:
    key = ids.load_or_create_key(tmp_path)
    assert ids.load_or_create_key(tmp_path) == key
    assert (tmp_path / ids.KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_a_damaged_chunk_id_key_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    (tmp_path / ids.KEY_FILE).write_bytes(b"short")
    with pytest.raises(ValueError, match="remove it"):
        ids.load_or_create_key(tmp_path)


def test_the_stored_chunk_id_key_opens_only_with_the_identity() -> None:
    identity = pyrage.x25519.Identity.generate()
    stored = ids.encrypt_key(b"k" * 32, [identity.to_public()])
    assert ids.decrypt_key(stored, [identity]) == b"k" * 32
    with pytest.raises(encryption.WrongKey):
        ids.decrypt_key(stored, [pyrage.x25519.Identity.generate()])


def test_pack_names_are_parsed_and_foreign_names_ignored() -> None:
    pack_id = "ab" + "0" * 62
    assert ids.pack_key(pack_id) == f"packs/ab/{pack_id}.pack"
    assert ids.parse_pack_key(ids.pack_key(pack_id)) == pack_id
    assert ids.parse_pack_key(f"cd/{pack_id}.pack") is None
    assert ids.parse_pack_key("ab/.pack-123.tmp") is None
    with pytest.raises(ids.InvalidId):
        ids.pack_key("../x")


def test_a_blob_decodes_on_its_own_with_and_without_encryption() -> None:
    chunk = os.urandom(1000) + b"\0" * 5000
    assert blob.decode(blob.encode(chunk, 3), len(chunk)) == chunk
    identity = pyrage.x25519.Identity.generate()
    sealed = blob.encode(chunk, 3, [identity.to_public()])
    assert blob.decode(sealed, len(chunk), [identity]) == chunk
    with pytest.raises(encryption.WrongKey):
        blob.decode(sealed, len(chunk), [pyrage.x25519.Identity.generate()])


def test_a_blob_of_another_length_than_its_trailer_says_is_refused() -> None:
    with pytest.raises(blob.BlobError):
        blob.decode(blob.encode(b"x" * 100, 3), 99)


def _write_pack(tmp_path: Path, chunks: list[bytes], target: int = 1 << 20) -> pack.PackInfo:
    writer = pack.PackWriter(tmp_path / "packs", tmp_path / "tmp", target)
    for chunk in chunks:
        writer.add(ids.chunk_id(chunk, None), blob.encode(chunk, 3), len(chunk))
    return writer.close()


def test_a_pack_is_named_by_its_sha256_and_its_trailer_lists_its_blobs(tmp_path: Path) -> None:
    chunks = [os.urandom(100 + i) for i in range(5)]
    info = _write_pack(tmp_path, chunks)
    path = tmp_path / ids.pack_key(info.pack_id)
    pack.verify_file(path, info.pack_id)
    blobs = pack.read_trailer(pack.file_range_reader(path), path.stat().st_size)
    assert blobs == info.blobs
    with open(path, "rb") as handle:
        decoded = [
            blob.decode(data, entry.raw_length) for entry, data in pack.iter_blobs(handle, blobs)
        ]
    assert decoded == chunks
    assert not list((tmp_path / "tmp").iterdir())


def test_a_trailer_longer_than_the_first_tail_read_is_read_in_a_second(tmp_path: Path) -> None:
    count = pack.TAIL_READ // pack.ENTRY_SIZE + 10
    info = _write_pack(tmp_path, [i.to_bytes(4, "little") for i in range(count)])
    path = tmp_path / ids.pack_key(info.pack_id)
    reads: list[tuple[int, int]] = []
    read = pack.file_range_reader(path)

    def counting(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return read(offset, length)

    assert len(pack.read_trailer(counting, info.size)) == count
    assert len(reads) == 2


def test_a_changed_pack_fails_its_verification(tmp_path: Path) -> None:
    info = _write_pack(tmp_path, [b"a" * 1000])
    path = tmp_path / ids.pack_key(info.pack_id)
    data = bytearray(path.read_bytes())
    data[3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(pack.PackError, match="not the pack id"):
        pack.verify_file(path, info.pack_id)


def test_a_truncated_pack_has_no_trailer(tmp_path: Path) -> None:
    info = _write_pack(tmp_path, [b"a" * 1000])
    data = (tmp_path / ids.pack_key(info.pack_id)).read_bytes()[:-3]
    with pytest.raises(pack.PackError):
        pack.parse_trailer(data, len(data))


def test_a_pack_is_closed_before_it_passes_its_target_size(tmp_path: Path) -> None:
    writer = pack.PackWriter(tmp_path / "packs", tmp_path / "tmp", 1000)
    assert writer.fits(5000)  # the first blob always fits: a pack of its own
    writer.add(b"i" * 32, b"x" * 600, 600)
    assert not writer.fits(400)
    assert writer.fits(300)
    writer.abort()
    assert not list((tmp_path / "tmp").iterdir())


def test_index_entries_keep_names_that_are_not_utf8(tmp_path: Path) -> None:
    entries = [
        index.Entry(b"srv/d", "dir", 0o40755, 0, 0, 1),
        index.Entry(
            b"srv/d/\xff\nname",
            "file",
            0o104755,
            1000,
            50,
            123456789,
            1,
            2,
            3,
            size=10,
            sha256="a" * 64,
            chunks=[("b" * 64, 0, 4), ("c" * 64, 6, 4)],
        ),
        index.Entry(b"srv/d/l", "symlink", 0o120777, 0, 0, 5, target=b"../\xfe"),
        index.Entry(b"srv/d/h", "hardlink", 0o104755, 1000, 50, 5, link=b"srv/d/\xff\nname"),
    ]
    writer = index.IndexWriter(tmp_path / "i.zst", 3)
    for entry in entries:
        writer.write(entry)
    writer.close()
    assert list(index.read_entries(tmp_path / "i.zst")) == entries


def test_a_filtered_read_decodes_at_least_the_lines_holding_the_strings(tmp_path: Path) -> None:
    names = [b"srv/a", 'srv/"é"/x'.encode(), b"srv/b/\xff", b"srv/c", b"srv/cc"]
    writer = index.IndexWriter(tmp_path / "i.zst", 3)
    for name in names:
        writer.write(index.Entry(name, "dir", 0o755, 0, 0, 1))
    writer.write(index.Entry(b"srv/h", "hardlink", 0o644, 0, 0, 1, link=b"srv/a"))
    writer.close()

    def read(*members: bytes) -> list[bytes]:
        texts = [index.json_text(m) for m in members]
        assert None not in texts
        wanted = [t for t in texts if t is not None]
        return [e.path for e in index.read_entries(tmp_path / "i.zst", containing=wanted)]

    # a name that is not UTF-8 is base64 in its line: always decoded
    assert read('srv/"é"'.encode()) == ['srv/"é"/x'.encode(), b"srv/b/\xff"]
    assert read(b"srv/c") == [b"srv/b/\xff", b"srv/c", b"srv/cc"]
    assert read(b"srv/a") == [b"srv/a", b"srv/b/\xff", b"srv/h"]  # its link names srv/a
    assert index.json_text(b"srv/\xff") is None
    assert [e.path for e in index.read_entries(tmp_path / "i.zst")] == [*names, b"srv/h"]


def test_an_encrypted_index_reads_back_only_with_the_identity(tmp_path: Path) -> None:
    writer = index.IndexWriter(tmp_path / "i.zst", 3)
    writer.write(index.Entry(b"srv", "dir", 0o40755, 0, 0, 1))
    writer.close()
    identity = pyrage.x25519.Identity.generate()
    name, size, _ = index.publish(tmp_path / "i.zst", tmp_path, [identity.to_public()])
    assert name == index.ENCRYPTED_NAME and size == (tmp_path / name).stat().st_size
    assert [e.path for e in index.read_entries(tmp_path / name, [identity])] == [b"srv"]
    with pytest.raises(encryption.WrongKey):
        list(index.read_entries(tmp_path / name, [pyrage.x25519.Identity.generate()]))


@pytest.mark.parametrize(
    "path", [b"/etc/passwd", b"srv/../../etc", b"srv//x", b"srv/\0x", b"", b"./srv"]
)
def test_an_index_entry_with_an_unsafe_path_is_refused(path: bytes) -> None:
    line = json.dumps(
        {"path": path.decode(), "type": "dir", "mode": 0o40755, "uid": 0, "gid": 0, "mtime_ns": 1}
    )
    with pytest.raises(index.InvalidIndex):
        index.from_json(line)


def test_a_hardlink_to_an_unsafe_path_is_refused() -> None:
    line = json.dumps(
        {
            "path": "srv/h",
            "type": "hardlink",
            "mode": 0o100644,
            "uid": 0,
            "gid": 0,
            "mtime_ns": 1,
            "link": "../../etc/shadow",
        }
    )
    with pytest.raises(index.InvalidIndex):
        index.from_json(line)


def test_an_index_entry_whose_chunks_pass_the_file_size_is_refused() -> None:
    entry = index.Entry(
        b"f", "file", 0o100644, 0, 0, 1, size=4, sha256="a" * 64, chunks=[("b" * 64, 2, 4)]
    )
    with pytest.raises(index.InvalidIndex, match="size"):
        index.from_json(index.to_json(entry))


def test_the_index_order_is_depth_first_with_siblings_by_name_bytes() -> None:
    paths = [b"a0", b"a/x", b"a", b"a/x/y", b"b", b"a/\xff"]
    assert sorted(paths, key=index.sort_key) == [b"a", b"a/x", b"a/x/y", b"a/\xff", b"a0", b"b"]


def test_a_file_smaller_than_the_minimum_is_one_chunk(tmp_path: Path) -> None:
    path = tmp_path / "small"
    path.write_bytes(os.urandom(chunker.MIN_SIZE - 1))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert [(o, len(c)) for o, c in chunker.chunks(fd, chunker.MIN_SIZE - 1)] == [
            (0, chunker.MIN_SIZE - 1)
        ]
    finally:
        os.close(fd)


def test_a_large_file_is_cut_within_the_bounds_and_back_to_its_bytes(tmp_path: Path) -> None:
    data = os.urandom(12 << 20)
    path = tmp_path / "large"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = list(chunker.chunks(fd, len(data)))
    finally:
        os.close(fd)
    assert b"".join(c for _, c in pieces) == data
    assert all(chunker.MIN_SIZE <= len(c) <= chunker.MAX_SIZE for _, c in pieces[:-1])


def test_the_holes_of_a_sparse_file_are_not_read(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as handle:
        handle.write(b"a" * 4096)
        handle.seek(64 << 20)
        handle.write(b"b" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = list(chunker.chunks(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)
    assert sum(len(c) for _, c in pieces) < 1 << 20
    assert pieces[0] == (0, b"a" * 4096) and pieces[-1][0] >= 60 << 20


def _chunked_manifest(**fields: object) -> Manifest:
    body: dict[str, object] = {
        "source_id": "s",
        "kind": "data",
        "generation": "2026-11-28T02-00-00Z",
        "created_at": "2026-11-28T02:00:00Z",
        "downtime_seconds": 0.5,
        "agent_version": "0.1.0",
        "files": (FileEntry("INDEX.zst", 10, "a" * 64),),
        "format": manifest.CHUNKS_FORMAT_VERSION,
        "data_format": "chunks",
        "packs": (PackRef("b" * 64, 100),),
        "logical_size": 5,
        "added_size": 100,
        "chunk_count": 1,
    }
    body.update(fields)
    return Manifest(**body)  # type: ignore[arg-type]


def test_a_chunked_manifest_reads_back_with_its_packs() -> None:
    m = _chunked_manifest()
    assert manifest.from_json(m.to_json()) == m


def test_an_archive_manifest_reads_as_before_without_chunk_fields() -> None:
    m = _chunked_manifest(
        format=1,
        data_format="archive",
        packs=(),
        logical_size=0,
        added_size=0,
        chunk_count=0,
        files=(FileEntry("data.tar.zst", 10, "a" * 64),),
    )
    assert "packs" not in m.to_json() and manifest.from_json(m.to_json()) == m


def test_a_chunked_manifest_with_a_malformed_pack_list_is_invalid() -> None:
    text = _chunked_manifest().to_json().replace("b" * 64, "../x")
    with pytest.raises(manifest.InvalidManifest):
        manifest.from_json(text)


ENCRYPTED_FILES = (
    FileEntry("INDEX.zst.age", 10, "a" * 64),
    FileEntry(manifest.CHUNK_ID_KEY, 200, "c" * 64),
)


def test_an_encrypted_chunked_manifest_lists_its_index_and_its_chunk_id_key() -> None:
    m = _chunked_manifest(encrypted=True, files=ENCRYPTED_FILES)
    assert manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("encrypted", "files"),
    [
        (True, ENCRYPTED_FILES[:1]),  # an encrypted generation without its key
        (True, ENCRYPTED_FILES[::-1]),
        (False, (FileEntry("INDEX.zst", 10, "a" * 64), ENCRYPTED_FILES[1])),
        (False, ENCRYPTED_FILES[:1]),
        (True, (FileEntry("INDEX.zst", 10, "a" * 64), ENCRYPTED_FILES[1])),
        (False, (FileEntry("INDEX.zst", 10, "a" * 64), FileEntry("data.tar.zst", 1, "d" * 64))),
    ],
)
def test_a_chunked_manifest_listing_other_files_is_invalid(
    encrypted: bool, files: tuple[FileEntry, ...]
) -> None:
    text = _chunked_manifest(encrypted=encrypted, files=files).to_json()
    with pytest.raises(manifest.InvalidManifest, match="exactly its index"):
        manifest.from_json(text)
