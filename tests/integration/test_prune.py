"""Garbage collection of a real local store with real packs (agent.chunks.prune): two phases,
waiting generations, repack, crashes at every step, and a dry run that changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pyrage
import pytest

from agent.chunks import gc, ids, prune
from agent.chunks.prune import GarbageCollectionRefused, Settings, Target
from agent.core import manifest
from agent.core.handover import Handover
from agent.stores.local import LocalStore
from tests.chunkstore import PACK_SIZE, Crash, CrashingStore, build, held_blobs, restore

RUNS = [f"2026-12-0{d}T02-00-00.000000Z" for d in range(1, 10)]
GENS = [f"2026-12-0{d}T02-00-00Z" for d in range(1, 10)]


def chunk(i: int) -> bytes:
    return random.Random(i).randbytes(700 + i % 800)


def files(*ranges: range) -> dict[str, list[bytes]]:
    return {f"srv/app/f{n}": [chunk(i) for i in r] for n, r in enumerate(ranges)}


def packs_in(root: Path) -> set[str]:
    return {p.stem for p in (root / "packs").glob("*/*.pack")}


def record(root: Path) -> dict[str, str]:
    path = root / prune.RECORD
    return json.loads(path.read_text())["condemned"] if path.exists() else {}


def target(
    root: Path, tmp_path: Path, waiting: dict[str, list[str]] | None = None, store: object = None
) -> Target:
    return Target(
        store or LocalStore(root),
        "source store",
        waiting or {},
        tmp_path / "cache.sqlite",
        tmp_path / "scratch",
    )


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


def add_generation(root: Path, gen: str, content: dict[str, list[bytes]]) -> list[str]:
    built = build(root, gen, content, held_blobs(LocalStore(root)))
    return [p.id for p in built.manifest.packs]


def mostly_dead(root: Path, dead_packs_too: bool = False) -> None:
    """g1, then g2 keeping every fifth chunk of g1; g1 removed: g1's packs are mostly dead
    (with `dead_packs_too`, some of them wholly)."""
    add_generation(
        root, GENS[0], files(range(0, 40), *([range(500, 520)] if dead_packs_too else []))
    )
    add_generation(root, GENS[1], files(range(0, 40, 5)))
    LocalStore(root).delete_generation("data", GENS[0])


def test_a_pack_of_a_removed_generation_is_condemned_first_and_deleted_a_run_later(root, tmp_path):
    g1 = add_generation(root, GENS[0], files(range(0, 12)))
    add_generation(root, GENS[1], files(range(100, 112)))
    LocalStore(root).delete_generation("data", GENS[0])
    settings = Settings(repack_below=0)

    first = prune.collect(target(root, tmp_path), settings, RUNS[0])
    assert set(first.plan.condemn) == set(g1)
    assert set(g1) <= packs_in(root)
    assert record(root) == {p: RUNS[0] for p in g1}

    second = prune.collect(target(root, tmp_path), settings, RUNS[1])
    assert set(second.plan.delete) == set(g1)
    assert not set(g1) & packs_in(root)
    assert record(root) == {}
    assert restore(root, GENS[1]) == {k: b"".join(v) for k, v in files(range(100, 112)).items()}


def test_a_pack_condemned_in_a_run_is_not_deleted_by_the_same_run_retried(root, tmp_path):
    g1 = add_generation(root, GENS[0], files(range(0, 12)))
    add_generation(root, GENS[1], files(range(100, 112)))
    LocalStore(root).delete_generation("data", GENS[0])
    prune.collect(target(root, tmp_path), Settings(repack_below=0), RUNS[0])
    again = prune.collect(target(root, tmp_path), Settings(repack_below=0), RUNS[0])
    assert again.plan.delete == ()
    assert set(g1) <= packs_in(root)


def test_a_generation_waiting_to_arrive_keeps_a_condemned_pack_it_relies_on(root, tmp_path):
    """A run that started before the rotation deduplicated against g1's packs; its generation
    waits in the handover while the store condemns them, and they must still be there."""
    g1 = add_generation(root, GENS[0], files(range(0, 12)))
    handover = tmp_path / "handover"
    dedup = held_blobs(LocalStore(root))
    waiting = build(
        handover, GENS[1], files(range(0, 12), range(200, 203)), dedup, other_roots=(root,)
    )
    LocalStore(root).delete_generation("data", GENS[0])
    prune.collect(target(root, tmp_path), Settings(repack_below=0), RUNS[0])
    assert set(g1) <= set(record(root))

    listed = {GENS[1]: [p.id for p in waiting.manifest.packs]}
    later = prune.collect(target(root, tmp_path, waiting=listed), Settings(repack_below=0), RUNS[1])
    assert later.plan.delete == ()
    assert set(later.plan.uncondemn) == set(g1)
    assert set(g1) <= packs_in(root)
    assert record(root) == {}


def test_a_mostly_dead_pack_is_repacked_and_the_generation_restores_from_the_new_packs(
    root, tmp_path
):
    add_generation(root, GENS[0], files(range(0, 40)))
    # g2 keeps every fifth chunk of g1: g1's packs are mostly dead once g1 goes
    kept = files(range(0, 40, 5), range(300, 304))
    g2 = add_generation(root, GENS[1], kept)
    expected = {k: b"".join(v) for k, v in kept.items()}
    LocalStore(root).delete_generation("data", GENS[0])

    outcome = prune.collect(target(root, tmp_path), Settings(repack_below=0.5), RUNS[0])
    assert outcome.plan.repack
    assert outcome.rewritten == [GENS[1]]
    listed = [p.id for p in manifest.read(root / "data" / GENS[1]).packs]
    assert not set(outcome.plan.repack) & set(listed)
    assert set(listed) - set(g2)  # new packs
    assert restore(root, GENS[1]) == expected
    assert set(outcome.plan.repack) <= set(record(root))

    prune.collect(target(root, tmp_path), Settings(repack_below=0.5), RUNS[1])
    assert not set(outcome.plan.repack) & packs_in(root)
    assert packs_in(root) == set(listed)
    assert restore(root, GENS[1]) == expected


def test_repacking_shrinks_the_store_to_about_the_live_bytes(root, tmp_path):
    add_generation(root, GENS[0], files(range(0, 60)))
    kept = files(range(0, 60, 6))
    add_generation(root, GENS[1], kept)
    LocalStore(root).delete_generation("data", GENS[0])
    before = sum(p.stat().st_size for p in (root / "packs").rglob("*.pack"))
    for run in RUNS[:3]:
        prune.collect(target(root, tmp_path), Settings(repack_below=0.5), run)
    after = sum(p.stat().st_size for p in (root / "packs").rglob("*.pack"))
    live = sum(len(c) for cs in kept.values() for c in cs)
    assert after < before / 3
    assert after < live * 1.2


IDENTITY = pyrage.x25519.Identity.generate()


def encrypted_mostly_dead(root: Path) -> tuple[dict[str, bytes], Path]:
    """mostly_dead with blobs and indexes encrypted (some of g1's packs wholly dead); return
    what g2 holds and its plaintext index."""
    recipients = (IDENTITY.to_public(),)
    build(root, GENS[0], files(range(0, 40), range(500, 520)), {}, recipients=recipients)
    kept = files(range(0, 40, 5))
    built = build(root, GENS[1], kept, held_blobs(LocalStore(root)), recipients=recipients)
    LocalStore(root).delete_generation("data", GENS[0])
    return {k: b"".join(v) for k, v in kept.items()}, built.plain_index


def test_packs_of_encrypted_generations_are_not_repacked_without_an_identity(root, tmp_path):
    encrypted_mostly_dead(root)
    outcome = prune.collect(target(root, tmp_path), Settings(repack_below=0.5), RUNS[0])
    assert outcome.plan.repack == ()
    assert outcome.plan.condemn  # g1's own packs still go


def test_packs_of_encrypted_generations_are_repacked_with_the_identity(root, tmp_path):
    expected, _ = encrypted_mostly_dead(root)
    outcome = prune.collect(
        target(root, tmp_path), Settings(repack_below=0.5, identities=(IDENTITY,)), RUNS[0]
    )
    assert outcome.rewritten == [GENS[1]]
    assert restore(root, GENS[1], identities=(IDENTITY,)) == expected


def test_packs_of_encrypted_generations_the_builder_told_of_are_repacked_without_a_key(
    root, tmp_path
):
    expected, plain_index = encrypted_mostly_dead(root)
    handover = Handover(tmp_path / "handover")
    prune.remember_index(
        handover, manifest.read(root / "data" / GENS[1]).files[0].sha256, plain_index
    )
    outcome = prune.collect(
        prune.target_for(LocalStore(root), "source store", handover),
        Settings(repack_below=0.5),
        RUNS[0],
    )
    assert outcome.rewritten == [GENS[1]]
    prune.collect(
        prune.target_for(LocalStore(root), "source store", handover),
        Settings(repack_below=0.5),
        RUNS[1],
    )
    assert restore(root, GENS[1], identities=(IDENTITY,)) == expected


def test_a_damaged_pack_is_left_alone_not_repacked(root, tmp_path):
    mostly_dead(root)
    dry = prune.collect(target(root, tmp_path), Settings(repack_below=0.5), RUNS[0], dry_run=True)
    victim = root / ids.pack_key(dry.plan.repack[0])
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = manifest.read(root / "data" / GENS[1]).packs

    outcome = prune.collect(target(root, tmp_path), Settings(repack_below=0.5), RUNS[0])
    assert outcome.copied is not None and outcome.copied.damaged == [dry.plan.repack[0]]
    assert victim.exists()
    assert dry.plan.repack[0] in {p.id for p in manifest.read(root / "data" / GENS[1]).packs}
    assert dry.plan.repack[0] in {p.id for p in before}


def test_a_dry_run_changes_nothing_in_the_store(root, tmp_path):
    mostly_dead(root, dead_packs_too=True)
    prune.collect(target(root, tmp_path), Settings(repack_below=0), RUNS[0])
    before = tree_digest(root)
    outcome = prune.collect(
        target(root, tmp_path), Settings(repack_below=0.5), RUNS[1], dry_run=True
    )
    assert outcome.plan.delete and outcome.plan.repack
    assert any(
        line.startswith("garbage collection of the source store")
        and "would delete" in line
        and outcome.plan.delete[0] in line
        for line in outcome.lines
    )
    assert tree_digest(root) == before


def test_garbage_collection_is_refused_when_a_manifest_cannot_be_read(root, tmp_path):
    g1 = add_generation(root, GENS[0], files(range(0, 12)))
    add_generation(root, GENS[1], files(range(100, 112)))
    (root / "data" / GENS[0] / manifest.NAME).write_text("{not json")
    with pytest.raises(GarbageCollectionRefused, match=GENS[0]):
        prune.collect(target(root, tmp_path), Settings(), RUNS[0])
    assert set(g1) <= packs_in(root)
    assert record(root) == {}


def test_an_unreadable_condemned_record_only_delays_deletion(root, tmp_path):
    g1 = add_generation(root, GENS[0], files(range(0, 12)))
    LocalStore(root).delete_generation("data", GENS[0])
    (root / "gc").mkdir()
    (root / prune.RECORD).write_text("garbage")
    outcome = prune.collect(target(root, tmp_path), Settings(repack_below=0), RUNS[1])
    assert outcome.plan.delete == ()
    assert set(outcome.plan.condemn) == set(g1)


def test_files_below_packs_that_are_not_packs_are_left_alone(root, tmp_path):
    add_generation(root, GENS[0], files(range(0, 12)))
    foreign = root / "packs" / "zz" / "notes.txt"
    foreign.parent.mkdir()
    foreign.write_text("mine")
    for run in RUNS[:2]:
        prune.collect(target(root, tmp_path), Settings(), run)
    assert foreign.read_text() == "mine"


def test_the_usage_cache_deleted_between_runs_is_rebuilt_from_the_store(root, tmp_path):
    mostly_dead(root)
    first = prune.collect(target(root, tmp_path), Settings(repack_below=0.5), RUNS[0], dry_run=True)
    (tmp_path / "cache.sqlite").unlink()
    second = prune.collect(
        target(root, tmp_path), Settings(repack_below=0.5), RUNS[0], dry_run=True
    )
    assert second.plan == first.plan


def test_a_garbage_collection_cache_that_is_not_a_database_is_replaced(root, tmp_path):
    add_generation(root, GENS[0], files(range(0, 12)))
    (tmp_path / "cache.sqlite").write_bytes(b"not a database at all" * 100)
    outcome = prune.collect(target(root, tmp_path), Settings(repack_below=0.5), RUNS[0])
    assert outcome.plan == gc.Plan(RUNS[0])


def crash_scene(root: Path, tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """A store where the next prune deletes, repacks, rewrites two manifests and condemns:
    g1's packs were condemned a run ago; g2 was just removed, and g3, g4 keep a few of its
    chunks each. Return what the kept generations hold."""
    add_generation(root, GENS[0], files(range(0, 12)))
    add_generation(root, GENS[1], files(range(100, 140)))
    kept = {GENS[2]: files(range(100, 140, 5), range(200, 210)), GENS[3]: files(range(101, 140, 4))}
    for gen, content in kept.items():
        add_generation(root, gen, content)
    LocalStore(root).delete_generation("data", GENS[0])
    prune.collect(target(root, tmp_path), Settings(repack_below=0.5), RUNS[0])
    LocalStore(root).delete_generation("data", GENS[1])
    return {gen: {k: b"".join(v) for k, v in content.items()} for gen, content in kept.items()}


def changes_of_a_clean_prune(tmp_path: Path) -> int:
    root = tmp_path / "count"
    root.mkdir()
    crash_scene(root, tmp_path / "count-state")
    counting = CrashingStore(LocalStore(root), None)
    outcome = prune.collect(
        target(root, tmp_path / "count-state", store=counting), Settings(repack_below=0.5), RUNS[1]
    )
    assert outcome.plan.delete and outcome.plan.repack and len(outcome.rewritten) == 2
    return counting.changes


def test_a_prune_killed_at_any_step_leaves_every_kept_generation_restorable(tmp_path):
    steps = changes_of_a_clean_prune(tmp_path)
    assert steps >= 7  # record, deletes, record, new packs, 2 manifests, record
    for crash_at in range(steps):
        root = tmp_path / f"store-{crash_at}"
        state = tmp_path / f"state-{crash_at}"
        root.mkdir()
        expected = crash_scene(root, state)
        with pytest.raises(Crash):
            prune.collect(
                target(root, state, store=CrashingStore(LocalStore(root), crash_at)),
                Settings(repack_below=0.5),
                RUNS[1],
            )
        for gen, content in expected.items():
            assert restore(root, gen) == content, f"killed before change {crash_at}"
        # the runs after it finish the work, and nothing any generation needs goes
        for run in RUNS[2:5]:
            prune.collect(target(root, state), Settings(repack_below=0.5), run)
            for gen, content in expected.items():
                assert restore(root, gen) == content, f"killed before change {crash_at}"
        listed = {p.id for gen in expected for p in manifest.read(root / "data" / gen).packs}
        assert packs_in(root) == listed, f"garbage left after a kill before change {crash_at}"


def test_a_store_that_fills_up_during_a_prune_after_a_push_is_a_warning(
    make_tmpfs, tmp_path, caplog
):
    root = make_tmpfs("full", "1m") / "store"
    root.mkdir()
    mostly_dead(root)
    fd = os.open(root.parent / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space left"):
        while True:
            os.write(fd, b"\1" * 4096)
    os.close(fd)
    lines = prune.after_rotation(
        LocalStore(root),
        "source store",
        Handover(tmp_path / "handover"),
        Settings(repack_below=0.5),
        RUNS[0],
    )
    assert lines == []
    assert "did not finish" in caplog.text and "No space left" in caplog.text
    assert restore(root, GENS[1]) == {k: b"".join(v) for k, v in files(range(0, 40, 5)).items()}


def test_temporary_files_a_killed_copy_left_are_removed_by_the_next_prune(root, tmp_path):
    add_generation(root, GENS[0], files(range(0, 12)))
    leftover = next((root / "packs").glob("*/*.pack")).parent / ".x.pack-abc.tmp"
    leftover.write_bytes(b"half a pack")
    prune.collect(target(root, tmp_path), Settings(), RUNS[0], dry_run=True)
    assert leftover.exists()
    prune.collect(target(root, tmp_path), Settings(), RUNS[0])
    assert not leftover.exists()
    assert restore(root, GENS[0])


def test_a_repack_that_writes_a_pack_again_as_it_was_condemns_nothing_still_listed(root, tmp_path):
    add_generation(root, GENS[0], files(range(0, 12)))  # every blob needed
    same = Settings(repack_below=1.0, pack_size=PACK_SIZE)  # so the new packs are the old ones
    outcome = prune.collect(target(root, tmp_path), same, RUNS[0])
    assert outcome.plan.repack
    assert outcome.copied is not None
    assert {p.pack_id for p in outcome.copied.new} == set(outcome.plan.repack)
    assert record(root) == {}
    prune.collect(target(root, tmp_path), same, RUNS[1])
    assert restore(root, GENS[0]) == {k: b"".join(v) for k, v in files(range(0, 12)).items()}


def test_a_push_that_collects_after_each_generation_deletes_nothing_it_condemned_itself(
    root, tmp_path
):
    g1 = add_generation(root, GENS[0], files(range(0, 12)))
    add_generation(root, GENS[1], files(range(100, 112)))
    LocalStore(root).delete_generation("data", GENS[0])
    handover = Handover(tmp_path / "handover")
    for _ in range(2):  # two generations pushed by one job: one run id
        prune.after_rotation(LocalStore(root), "source store", handover, Settings(), RUNS[0])
    assert set(g1) <= packs_in(root)
    prune.after_rotation(LocalStore(root), "source store", handover, Settings(), RUNS[1])
    assert not set(g1) & packs_in(root)
