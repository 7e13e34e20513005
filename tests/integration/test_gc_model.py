"""A model-based test of a store's lifecycle (hypothesis stateful): random sequences of
backups into the handover (new and reused chunks), transports into the store, rotations,
prunes, repacks, and crashes in the middle of any of them, against a real local store with
real packs. After every step, invariant 9: every complete generation's listed packs are there
and every chunk its index needs is in them, byte for byte; every waiting generation still
finds every pack it lists on one side or the other; no generation went but those rotation
chose."""

from __future__ import annotations

import random
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent import stores
from agent.chunks import gc, ids, prune
from agent.chunks.prune import Settings, Target
from agent.core import generation, manifest, retention
from agent.stores.local import LocalStore
from tests.chunkstore import Crash, CrashingStore, build, held_blobs, restore

START = datetime(2026, 12, 1, 2, tzinfo=UTC)
CRASH = st.one_of(st.none(), st.integers(min_value=0, max_value=12))


def chunk(i: int) -> bytes:
    return random.Random(i).randbytes(600 + i % 700)


class StoreLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gc-model-"))
        self.root = self.dir / "store"
        self.handover = self.dir / "handover"
        self.root.mkdir()
        self.handover.mkdir()
        self.clock = 0
        self.runs = 0
        self.contents: dict[str, dict[str, bytes]] = {}
        self.chunks_seen: list[int] = []
        self.next_chunk = 0
        self.expected_complete: set[str] = set()
        self.before_last_prune: dict[bytes, str] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers

    def store(self, crash_at: int | None = None, halfway: bool = False) -> CrashingStore:
        return CrashingStore(LocalStore(self.root), crash_at, halfway)

    def waiting(self) -> list[manifest.Manifest]:
        directory = self.handover / "data"
        found = []
        for gen in sorted(directory.iterdir()) if directory.is_dir() else []:
            if (gen / manifest.NAME).is_file():
                found.append(manifest.read(gen))
        return found

    def complete(self) -> set[str]:
        return set(LocalStore(self.root).generations("data")[0])

    def tick(self) -> str:
        self.clock += 1
        return generation.format_id(START + timedelta(hours=self.clock))

    def run_id(self) -> str:
        self.runs += 1
        return gc.run_id(START + timedelta(seconds=self.runs))

    # -- rules

    @initialize()
    def two_generations_in_the_store(self) -> None:
        for _ in range(2):
            self.backup(new=10, reuse=[], files=2, crash=None)
            self.transport(crash_at=None)

    @rule(
        new=st.integers(min_value=1, max_value=8),
        reuse=st.lists(st.integers(min_value=0, max_value=10**6), max_size=8),
        files=st.integers(min_value=1, max_value=3),
        crash=st.sampled_from([None, None, "after packs", "after index"]),
        started_before_the_last_prune=st.booleans(),
    )
    def backup(
        self,
        new: int,
        reuse: list[int],
        files: int,
        crash: str | None,
        started_before_the_last_prune: bool = False,
    ) -> None:
        """Step 1 into the handover: deduplicated against the store's packs that are not
        condemned and the packs waiting generations bring; a crash leaves no manifest. A run
        that started before the last prune deduplicates against what the store held then
        (its cache knows nothing of that prune's condemnations)."""
        picked = (
            [self.chunks_seen[r % len(self.chunks_seen)] for r in reuse] if self.chunks_seen else []
        )
        fresh = list(range(self.next_chunk, self.next_chunk + new))
        self.next_chunk += new
        numbers = picked + fresh
        gen = self.tick()
        layout = {f"srv/app/f{n}": [chunk(i) for i in numbers[n::files]] for n in range(files)}
        layout = {path: cs for path, cs in layout.items() if cs}
        dedup = dict(
            self.before_last_prune
            if started_before_the_last_prune
            else held_blobs(LocalStore(self.root))
        )
        for m in self.waiting():
            for ref in m.packs:
                path = self.handover / ids.pack_key(ref.id)
                if path.exists():
                    dedup.update(dict.fromkeys(held_blobs_of(path), ref.id))
        build(
            self.handover, gen, layout, dedup, manifest_last=crash is None, other_roots=(self.root,)
        )
        if crash == "after packs":
            shutil.rmtree(self.handover / "data" / gen)
        if crash is None:
            self.contents[gen] = {p: b"".join(cs) for p, cs in layout.items()}
            self.chunks_seen += fresh

    @rule(crash_at=CRASH)
    def transport(self, crash_at: int | None) -> None:
        """The oldest waiting generation into the store: missing packs, the index, a check
        that every listed pack is there, the manifest; then the handover is freed."""
        waiting = self.waiting()
        if not waiting:
            return
        m = waiting[0]
        gen = m.generation
        source = self.handover / "data" / gen
        store = self.store(crash_at)
        try:
            held = prune.store_packs(LocalStore(self.root))
            for ref in m.packs:
                if ref.id not in held:
                    local = self.handover / ids.pack_key(ref.id)
                    assert local.exists(), f"{gen} lists {ref.id}, which neither side holds"
                    store.put_file(ids.pack_key(ref.id), local, "checksum")
            store.put_file(f"data/{gen}/{m.files[0].path}", source / m.files[0].path, "checksum")
            held = prune.store_packs(LocalStore(self.root))
            assert all(held.get(ref.id) == ref.size for ref in m.packs)
            store.replace_manifest("data", m, "checksum")
            self.expected_complete.add(gen)
            store._step()
            (source / manifest.NAME).unlink()
            shutil.rmtree(source)
            still = {ref.id for w in self.waiting() for ref in w.packs}
            for ref in m.packs:
                if ref.id not in still:
                    (self.handover / ids.pack_key(ref.id)).unlink(missing_ok=True)
        except Crash:
            event("transport killed midway")
            if (self.root / "data" / gen / manifest.NAME).is_file():
                self.expected_complete.add(gen)

    @rule(keep=st.integers(min_value=1, max_value=4), crash_at=CRASH, halfway=st.booleans())
    def rotate(self, keep: int, crash_at: int | None, halfway: bool) -> None:
        complete = sorted(self.complete())
        if not complete:
            return
        policy = retention.Policy(last=keep)
        chosen = set(retention.plan(complete, policy, protect=complete[-1]).remove)
        try:
            stores.rotate(
                self.store(crash_at, halfway),
                "source store",
                "data",
                policy,
                newest_verified=complete[-1],
            )
        except Crash:
            event("rotation killed midway")
        gone = self.expected_complete - self.complete()
        if gone:
            event("rotation removed a generation")
        assert gone <= chosen, f"rotation removed {gone - chosen}, which it did not choose"
        self.expected_complete -= gone

    @rule(crash_at=CRASH, repack_below=st.sampled_from([0.0, 0.5, 0.9]))
    def prune(self, crash_at: int | None, repack_below: float) -> None:
        """Garbage collection (repack_below > 0: with repacking), maybe killed midway."""
        self.before_last_prune = held_blobs(LocalStore(self.root))
        target = Target(
            self.store(crash_at),
            "source store",
            prune.waiting_packs(self.waiting()),
            self.dir / "gc.sqlite",
            self.dir / "scratch",
        )
        try:
            outcome = prune.collect(
                target, Settings(repack_below=repack_below, pack_size=6000), self.run_id()
            )
        except Crash:
            event("prune killed midway")
            return
        for what, done in (
            ("planned a repack", outcome.plan.repack),
            ("deleted", outcome.plan.delete),
            ("condemned", outcome.plan.condemn),
            ("repacked", outcome.rewritten),
            ("un-condemned", outcome.plan.uncondemn),
        ):
            if done:
                event(f"prune {what}")

    @rule(
        new=st.integers(min_value=1, max_value=8),
        reuse=st.lists(st.integers(min_value=0, max_value=10**6), max_size=8),
        keep=st.integers(min_value=1, max_value=4),
        transport_crash=CRASH,
        rotate_crash=CRASH,
        prune_crash=CRASH,
        repack_below=st.sampled_from([0.0, 0.5, 0.9]),
        stale=st.booleans(),
    )
    def nightly_run(
        self,
        new: int,
        reuse: list[int],
        keep: int,
        transport_crash: int | None,
        rotate_crash: int | None,
        prune_crash: int | None,
        repack_below: float,
        stale: bool,
    ) -> None:
        """What a push site's cron line does: backup, transport, rotate, collect."""
        self.backup(new, reuse, 2, None, stale)
        self.transport(transport_crash)
        self.rotate(keep, rotate_crash, False)
        self.prune(prune_crash, repack_below)

    # -- invariant 9

    @invariant()
    def every_complete_generation_restores_byte_for_byte(self) -> None:
        assert self.complete() == self.expected_complete
        for gen in self.complete():
            assert restore(self.root, gen) == self.contents[gen]

    @invariant()
    def every_waiting_generation_finds_every_pack_it_lists(self) -> None:
        for m in self.waiting():
            assert restore(self.handover, m.generation, (self.root,)) == self.contents[m.generation]


def held_blobs_of(path: Path) -> list[bytes]:
    from agent.chunks import pack

    return [
        e.chunk_id for e in pack.read_trailer(pack.file_range_reader(path), path.stat().st_size)
    ]


StoreLifecycle.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_lifecycle = StoreLifecycle.TestCase
