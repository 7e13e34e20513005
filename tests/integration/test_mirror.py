"""The mirror's passes against a real filesystem, rsync and cp: what a pass copies (the bytes
changed), and that the mirror then equals its source in content, mode, owner, nanosecond mtime,
hardlinks, holes and deletions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.core.archive import member_name
from agent.source import mirror_patch
from agent.source.mirror import Mirror
from tests.trees import snapshot

MiB = 1 << 20
LARGE = mirror_patch.LARGE_FILE


@pytest.fixture
def scene(tmp_path: Path):
    source = tmp_path / "app" / "data"
    source.mkdir(parents=True)
    mirror = tmp_path / "handover" / ".mirror" / "data"
    return source, Mirror({mirror: [source]}), mirror / member_name(source)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def old_mtime(path: Path, ns: int = 1_700_000_000_000_000_000) -> None:
    os.utime(path, ns=(ns, ns))


def test_a_rewrite_inside_a_large_file_copies_only_the_pages_that_changed(scene):
    source, mirror, copy = scene
    (source / "table.db").write_bytes(os.urandom(3 * LARGE))
    old_mtime(source / "table.db")
    mirror.sync()
    write_at(source / "table.db", LARGE + 5000, os.urandom(10_000))

    report = mirror.sync(final=True)

    assert snapshot(copy) == snapshot(source)
    [patched] = report.patched
    assert patched.changed == 3 * mirror_patch.PAGE  # bytes 5000-15000 span pages 1-3
    assert report.rsync_bytes == 0 and report.changed == patched.changed


def test_a_same_size_rewrite_of_a_large_file_within_the_same_second_is_copied(scene):
    source, mirror, copy = scene
    (source / "table.db").write_bytes(b"A" * LARGE)
    old_mtime(source / "table.db")
    mirror.sync()
    (source / "table.db").write_bytes(b"B" * LARGE)
    old_mtime(source / "table.db", 1_700_000_000_000_000_001)

    mirror.sync(final=True)

    assert (copy / "table.db").read_bytes() == b"B" * LARGE
    assert snapshot(copy) == snapshot(source)


def test_a_large_file_that_grows_shrinks_or_changes_owner_and_mode_is_followed(scene):
    source, mirror, copy = scene
    for name in ("grows", "shrinks", "owner"):
        (source / name).write_bytes(os.urandom(2 * LARGE))
        old_mtime(source / name)
    mirror.sync()
    with open(source / "grows", "ab") as handle:
        handle.write(os.urandom(LARGE + 123))
    os.truncate(source / "shrinks", LARGE + 7)
    os.chown(source / "owner", 1234, 5678)
    os.chmod(source / "owner", 0o600)
    write_at(source / "owner", 0, b"x")

    mirror.sync(final=True)

    assert snapshot(copy) == snapshot(source)


def test_holes_stay_holes_when_a_sparse_large_file_grows(scene):
    source, mirror, copy = scene
    image = source / "disk.img"
    with open(image, "wb") as handle:
        handle.write(os.urandom(MiB))
        handle.truncate(2 * LARGE)
    mirror.sync()
    with open(image, "r+b") as handle:
        handle.truncate(64 * LARGE)
        handle.seek(64 * LARGE - MiB)
        handle.write(os.urandom(MiB))

    mirror.sync(final=True)

    assert snapshot(copy) == snapshot(source)
    assert os.stat(copy / "disk.img").st_blocks * 512 < 4 * MiB, "the hole was filled"


def test_deleted_and_newly_hardlinked_large_files_and_new_ones_are_followed(scene):
    source, mirror, copy = scene
    for name in ("deleted", "linked", "plain"):
        (source / name).write_bytes(os.urandom(LARGE))
    mirror.sync()
    (source / "deleted").unlink()
    os.link(source / "linked", source / "second-name")
    (source / "new-after-the-last-walk").write_bytes(os.urandom(LARGE))
    write_at(source / "plain", 0, b"changed")

    mirror.sync(final=True)

    assert snapshot(copy) == snapshot(source)
    assert os.stat(copy / "linked").st_ino == os.stat(copy / "second-name").st_ino


@pytest.mark.parametrize(
    "name", ["star*file", "[bracket]", "back\\slash?", "new\nline", "- dash first"]
)
def test_a_patched_file_with_an_odd_name_is_left_to_the_patch_not_copied_whole(scene, name):
    source, mirror, copy = scene
    (source / "dir").mkdir()
    (source / "dir" / name).write_bytes(os.urandom(LARGE))
    (source / "dir" / "star-file").write_bytes(os.urandom(LARGE))  # a wildcard would match it
    old_mtime(source / "dir" / "star-file")
    mirror.sync()
    write_at(source / "dir" / name, 0, b"changed")

    report = mirror.sync(final=True)

    assert snapshot(copy) == snapshot(source)
    assert [p.target.name for p in report.patched] == [name]
    assert report.rsync_bytes == 0, "rsync copied a file the patch had brought up to date"


def test_the_final_pass_copies_whole_a_file_whose_last_pass_found_it_mostly_changed(scene):
    source, mirror, copy = scene
    (source / "rewritten.db").write_bytes(os.urandom(2 * LARGE))
    mirror.sync()
    (source / "rewritten.db").write_bytes(os.urandom(2 * LARGE))
    [running] = mirror.sync().patched
    assert not running.copied_whole and running.changed == 2 * LARGE
    (source / "rewritten.db").write_bytes(os.urandom(2 * LARGE))

    [final] = mirror.sync(final=True).patched

    assert final.copied_whole
    assert snapshot(copy) == snapshot(source)


def test_a_file_written_just_before_a_running_pass_is_compared_again_by_the_final_pass(scene):
    source, mirror, copy = scene
    (source / "hot.db").write_bytes(os.urandom(LARGE))
    mirror.sync()
    write_at(source / "hot.db", 0, b"new")  # mtime: now; a write in the same tick could follow

    mirror.sync()
    assert os.stat(copy / "hot.db").st_mtime_ns == os.stat(source / "hot.db").st_mtime_ns - 1
    report = mirror.sync(final=True)

    assert [p.changed for p in report.patched] == [0]
    assert snapshot(copy) == snapshot(source)


def test_a_file_mostly_changed_once_but_unchanged_in_the_last_pass_is_compared_again(scene):
    source, mirror, copy = scene
    (source / "table.db").write_bytes(os.urandom(2 * LARGE))
    mirror.sync()
    (source / "table.db").write_bytes(os.urandom(2 * LARGE))
    old_mtime(source / "table.db")
    mirror.sync()  # found it all changed
    mirror.sync()  # found it unchanged
    write_at(source / "table.db", 0, b"changed")

    [final] = mirror.sync(final=True).patched

    assert not final.copied_whole and final.changed == mirror_patch.PAGE
    assert snapshot(copy) == snapshot(source)


def test_a_large_file_recycled_under_a_new_name_is_renamed_in_the_mirror_and_compared(scene):
    source, mirror, copy = scene
    (source / "pg_wal").mkdir()
    for number in range(3):
        (source / "pg_wal" / f"segment-{number}").write_bytes(os.urandom(LARGE))
    mirror.sync()
    (source / "pg_wal" / "segment-0").rename(source / "pg_wal" / "segment-3")
    write_at(source / "pg_wal" / "segment-3", 0, os.urandom(mirror_patch.PAGE))

    report = mirror.sync(final=True)

    assert snapshot(copy) == snapshot(source)
    assert report.renamed == 1 and report.rsync_bytes == 0
    assert [p.changed for p in report.patched] == [mirror_patch.PAGE]


def test_a_file_larger_than_one_span_is_patched_in_every_span(scene):
    source, mirror, copy = scene
    size = mirror_patch.SPAN + LARGE
    (source / "big.db").write_bytes(os.urandom(size))
    mirror.sync()
    for offset in (0, mirror_patch.SPAN - 1, size - 2):  # the second across the spans' border
        # each byte's complement: a fixed b"xx" over random bytes left a page unchanged once
        # in about 128 runs, when the byte it wrote across the border was an "x" already
        with open(source / "big.db", "rb") as handle:
            handle.seek(offset)
            old = handle.read(2)
        write_at(source / "big.db", offset, bytes(b ^ 0xFF for b in old))

    [patched] = mirror.sync(final=True).patched

    assert patched.changed == 4 * mirror_patch.PAGE
    assert snapshot(copy) == snapshot(source)


def test_the_final_pass_writes_rather_than_reads_blocks_of_a_mirror_copy_not_in_memory(scene):
    source, mirror, copy = scene
    (source / "cold.db").write_bytes(os.urandom(2 * LARGE))
    old_mtime(source / "cold.db")
    mirror.sync()
    write_at(source / "cold.db", LARGE, b"changed")
    with open(copy / "cold.db", "rb") as handle:  # its pages written back, then dropped
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    [patched] = mirror.sync(final=True).patched

    assert patched.unread > 0
    assert snapshot(copy) == snapshot(source)
