"""2.c move into the source store, across filesystems (a real tmpfs), and its rotation."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core import manifest
from agent.stores import VerificationFailed
from agent.stores.local import LocalStore
from tests.generations import make_generation

GEN = "2026-11-01T00-00-00Z"


@pytest.fixture
def other_filesystem(make_tmpfs) -> Path:
    return make_tmpfs("tmpfs", "16m")


def test_a_move_across_filesystems_copies_verifies_and_then_deletes(tmp_path, other_filesystem):
    content = make_generation(tmp_path / "handover", GEN)
    store = LocalStore(other_filesystem / "store")

    moved = store.move_in(tmp_path / "handover" / "data" / GEN, "data", GEN)

    assert (moved / "data.tar.zst").read_bytes() == content
    assert manifest.read(moved).generation == GEN
    assert not (tmp_path / "handover" / "data" / GEN).exists()
    assert store.generations("data") == ([GEN], [])


def test_a_copy_that_does_not_match_its_manifest_is_not_moved(tmp_path, other_filesystem):
    make_generation(tmp_path / "handover", GEN)
    archive = tmp_path / "handover" / "data" / GEN / "data.tar.zst"
    archive.write_bytes(b"x" * archive.stat().st_size)
    store = LocalStore(other_filesystem / "store")

    with pytest.raises(VerificationFailed):
        store.move_in(tmp_path / "handover" / "data" / GEN, "data", GEN)

    assert archive.exists(), "the handover keeps its copy"
    assert store.generations("data") == ([], [])
