"""Chunked data generations in pull mode against a real sshd, the real gateway (run as the
gateway users), rsync and rrsync: the sink fetches only the packs it lacks, verifies every
one, collects its garbage in two phases and tells the source what it gave up, and the
source's 2.c moves the packs into its own store.

The source side is the agent's own build into the handover (chunks.handover.build against
the source store, less what the sink reported), as `source backup` runs it on a pull site."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

from agent import config
from agent.chunks import handover as chunked
from agent.chunks import ids, prune, pulled
from agent.core.handover import Handover
from agent.core.manifest import CHUNK_ID_KEY, Manifest
from agent.stores.local import LocalStore
from tests.chunked import make_tricky_tree, restore_by_hand
from tests.conftest import AGENT, bytes_below, run_agent, start_agent, wait_until
from tests.generations import SOURCE
from tests.integration.test_pull import GEN1, GEN2, GEN3, MiB, Site, bytes_received, site
from tests.pulled import DATA, hand_over_mirror, mirror_dir
from tests.trees import snapshot

__all__ = ["site"]  # the fixture
PACK_SIZE = 1 * MiB
KEEP_ONE = {
    "SINK_KEEP_LAST": "1",
    "SINK_KEEP_DAILY": "0",
    "SINK_KEEP_WEEKLY": "0",
    "SINK_KEEP_MONTHLY": "0",
}


def content(seed: int, size: int) -> bytes:
    """Random bytes, seeded: where chunk boundaries fall is the same in every run."""
    return random.Random(seed).randbytes(size)


def hand_over(
    site: Site,
    gen: str,
    files: dict[str, bytes],
    recipients: tuple[object, ...] = (),
    pack_size: int = PACK_SIZE,
    domain: str = "",
) -> Manifest:
    """The chunked generation `gen` of `files` (below /srv/app), built from the mirror into
    the handover as a pull site's source builds it, and published."""
    mirror = mirror_dir(site.handover)
    shutil.rmtree(mirror, ignore_errors=True)
    for name, data in files.items():
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        (mirror / name).write_bytes(data)
    return hand_over_mirror(
        site.handover, site.source_store, SOURCE, gen, recipients, pack_size, domain=domain
    )


def housekeeping(site: Site) -> None:
    """What `source backup` does on a pull site after handing over (site.pull_housekeeping)."""
    handover = Handover(site.handover)
    store = LocalStore(site.source_store)
    prune.after_rotation(store, "source store", handover, prune.Settings(), "9999")
    chunked.free_packs(handover)
    pulled.forget_gone(handover, (p for p, _ in chunked.packs_of(store)))


def sink_store(site: Site) -> Path:
    return site.sink_store / SOURCE


def packs_in(root: Path) -> dict[str, int]:
    return dict(chunked.packs_of(LocalStore(root)))


def assert_restores(site: Site, gen: str, files: dict[str, bytes], tmp_path: Path) -> None:
    target = tmp_path / f"restored-{gen}"
    restore_by_hand(sink_store(site), gen, target)
    found = {
        str(p.relative_to(target / DATA)): p.read_bytes()
        for p in (target / DATA).rglob("*")
        if p.is_file()
    }
    assert found == files


def test_a_first_and_a_second_pull_move_only_the_packs_the_sink_lacks(site, tmp_path):
    files1 = {f"f{i}.bin": content(i, 1 * MiB) for i in range(4)}
    m1 = hand_over(site, GEN1, files1)

    first = site.pull("data")

    assert first.returncode == 0, first.stderr
    sizes1 = sum(p.size for p in m1.packs)
    assert sizes1 <= bytes_received(first) <= sizes1 + 256 * 1024
    assert set(packs_in(sink_store(site))) == {p.id for p in m1.packs}
    assert site.waiting("data") == [] and site.in_source_store() == [GEN1]
    assert set(packs_in(site.source_store)) == {p.id for p in m1.packs}
    assert packs_in(site.handover) == {}  # 2.c moved them: both sides hold what they need
    assert_restores(site, GEN1, files1, tmp_path)

    files2 = {**files1, "f1.bin": content(100, 1 * MiB), "new.bin": content(101, 300_000)}
    m2 = hand_over(site, GEN2, files2)
    new = {p.id: p.size for p in m2.packs}.keys() - {p.id for p in m1.packs}
    new_bytes = sum(p.size for p in m2.packs if p.id in new)
    assert 0 < new_bytes < sizes1 // 2

    second = site.pull("data")

    assert second.returncode == 0, second.stderr
    assert new_bytes <= bytes_received(second) <= new_bytes + 256 * 1024
    assert site.stored("data") == [GEN1, GEN2] and site.in_source_store() == [GEN1, GEN2]
    assert_restores(site, GEN1, files1, tmp_path)
    assert_restores(site, GEN2, files2, tmp_path)
    assert site.mail.messages == []


def test_a_pack_tampered_in_the_handover_is_refused_not_stored_and_not_acknowledged(site):
    m = hand_over(site, GEN1, {"a.bin": content(1, 2 * MiB)})
    victim = site.handover / ids.pack_key(m.packs[0].id)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))  # same size, other bytes

    result = site.pull("data")

    assert result.returncode == 1, result.stderr
    assert f"pack {m.packs[0].id} as fetched: its sha256 is not its id" in result.stderr
    assert site.stored("data") == []
    assert packs_in(sink_store(site)) == {}
    assert not list((site.sink_store / ".incoming").rglob(f"{m.packs[0].id}.pack"))
    assert site.waiting("data") == [GEN1] and site.in_source_store() == []
    [mail] = site.mail.wait_for(1)
    assert "verify" in mail["Subject"] or "fetch" in mail["Subject"]


def test_a_pack_the_handover_no_longer_holds_is_fetched_from_the_source_store(site, tmp_path):
    files1 = {"a.bin": content(1, 1 * MiB), "b.bin": content(2, 1 * MiB)}
    hand_over(site, GEN1, files1)
    assert site.pull("data").returncode == 0
    shutil.rmtree(sink_store(site))  # a new sink store: it lacks every pack of GEN1
    files2 = {**files1, "c.bin": content(3, 500_000)}
    m2 = hand_over(site, GEN2, files2)  # reuses GEN1's packs, which only the source store holds

    result = site.pull("data")

    assert result.returncode == 0, result.stderr
    assert set(packs_in(sink_store(site))) == {p.id for p in m2.packs}
    assert bytes_received(result) >= sum(p.size for p in m2.packs)
    assert_restores(site, GEN2, files2, tmp_path)


def test_what_the_sink_condemns_and_deletes_reaches_the_source_and_no_later_build_counts_on_it(
    site, tmp_path
):
    old = content(1, 1 * MiB)
    m1 = hand_over(site, GEN1, {"old.bin": old})
    assert site.pull("data", **KEEP_ONE).returncode == 0
    hand_over(site, GEN2, {"other.bin": content(2, 1 * MiB)})

    second = site.pull("data", **KEEP_ONE)  # rotates GEN1 out, condemns its packs

    assert second.returncode == 0, second.stderr
    assert site.stored("data") == [GEN2]
    gone = {p.id for p in m1.packs}
    record = json.loads((site.handover / pulled.RECORD).read_text())
    assert set(record["condemned"]) == gone and record["deleted"] == []
    assert gone <= set(packs_in(sink_store(site)))  # condemned, not deleted yet
    assert site.in_source_store() == [GEN1, GEN2]  # SOURCE_KEEP_* keeps more than the sink
    hand_over(site, GEN3, {"third.bin": content(3, 400_000)})

    third = site.pull("data", **KEEP_ONE)  # a later job: deletes what the earlier condemned

    assert third.returncode == 0, third.stderr
    assert not gone & set(packs_in(sink_store(site)))
    assert gone <= set(json.loads((site.handover / pulled.RECORD).read_text())["deleted"])
    m4 = hand_over(site, "2026-11-04T02-00-00Z", {"old.bin": old})  # GEN1's content again
    # stored again into the handover (packs are content-addressed: the same bytes, the same
    # id), not counted on in the source store, which still holds GEN1
    assert {p.id for p in m4.packs} == gone <= set(packs_in(site.handover))
    fourth = site.pull("data", **KEEP_ONE)
    assert fourth.returncode == 0, fourth.stderr
    assert_restores(site, "2026-11-04T02-00-00Z", {"old.bin": old}, tmp_path)


def test_a_pulled_generation_naming_a_pack_the_sink_deleted_gets_it_from_the_source(site, tmp_path):
    """The race of the two-phase rule: a build that began before the acknowledgement told
    the source what the sink condemned reuses such a pack, and the sink deletes it before
    that generation arrives. The sink then fetches the pack from the source store, which
    keeps it while a waiting generation lists it."""
    old = content(1, 1 * MiB)
    m1 = hand_over(site, GEN1, {"old.bin": old})
    assert site.pull("data", **KEEP_ONE).returncode == 0
    hand_over(site, GEN2, {"other.bin": content(2, 1 * MiB)})
    assert site.pull("data", **KEEP_ONE).returncode == 0  # condemns GEN1's packs
    (site.handover / pulled.RECORD).unlink()  # the build below did not see the report yet
    m3 = hand_over(site, GEN3, {"old.bin": old})
    assert {p.id for p in m3.packs} == {p.id for p in m1.packs}
    assert packs_in(site.handover) == {}  # it counts on the source store's copies
    housekeeping(site)  # the source store keeps them: GEN3 waits and lists them
    for p in m1.packs:  # the sink's next job deleted them before it saw GEN3
        (sink_store(site) / ids.pack_key(p.id)).unlink()

    result = site.pull("data", **KEEP_ONE)

    assert result.returncode == 0, result.stderr
    assert_restores(site, GEN3, {"old.bin": old}, tmp_path)


def test_a_sink_killed_mid_rsync_of_a_large_pack_resumes_and_stores_no_partial_generation(
    site, tmp_path
):
    size = 96 * MiB
    files = {"big.bin": content(7, size)}
    m = hand_over(site, GEN1, files, pack_size=128 * MiB)
    [big] = m.packs
    incoming = site.sink_store / ".incoming" / SOURCE / "packs"

    def partial_bytes() -> int:
        assert site.stored("data") == [], "a partial generation reached the sink store"
        return bytes_below(incoming)

    job = start_agent(site.env, "sink", "pull-data", start_new_session=True)
    try:
        wait_until(lambda: partial_bytes() > 8 * MiB or job.poll() is not None, timeout=30)
        assert job.poll() is None, "the transfer ended before it could be killed"
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert site.stored("data") == [] and packs_in(sink_store(site)) == {}
    kept = partial_bytes()
    assert 0 < kept < big.size
    assert site.waiting("data") == [GEN1]

    resumed = site.pull("data")

    assert resumed.returncode == 0, resumed.stderr
    assert bytes_received(resumed) < big.size - kept // 2  # the kept part did not travel again
    assert_restores(site, GEN1, files, tmp_path)


def test_encrypted_chunked_generations_are_pulled_and_verified_with_and_without_a_key(
    site, tmp_path
):
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    source = config.parse_source(
        {
            "SOURCE_ID": SOURCE,
            "DATA_PATHS": f"/{DATA}",
            "HANDOVER_DIR": str(site.handover),
            "SOURCE_STORE_DIR": str(site.source_store),
            "DATA_FORMAT": "chunks",
            "ENCRYPT_RECIPIENTS": str(identity.to_public()),
        }
    )
    recipients, domain = source.encrypt_recipients, source.encryption_domain
    files1 = {"secret.bin": content(1, 1 * MiB)}
    hand_over(site, GEN1, files1, recipients, domain=domain)
    assert site.pull("data").returncode == 0
    hand_over(site, GEN2, {**files1, "more.bin": content(2, 400_000)}, recipients, domain=domain)
    assert site.pull("data").returncode == 0
    stored = sink_store(site) / "data" / GEN2
    assert (stored / "INDEX.zst.age").is_file()
    key = (site.handover / ".state" / "chunks" / ids.KEY_FILE).read_bytes()
    assert ids.decrypt_key((stored / CHUNK_ID_KEY).read_bytes(), [identity]) == key
    assert content(1, 1 * MiB)[:4096] not in b"".join(
        p.read_bytes() for p in sink_store(site).rglob("*.pack")
    )

    verified = run_agent(site.env, "verify", "--role", "sink", "--all")

    assert verified.returncode == 0, verified.stderr
    keyed = run_agent(
        {**site.env, "DECRYPT_IDENTITY": str(identity)}, "verify", "--role", "sink", "--all"
    )
    assert keyed.returncode == 0, keyed.stderr
    assert "decoded and checked" in keyed.stderr, keyed.stderr
    listed = run_agent(site.env, "list", "--role", "sink")
    assert listed.returncode == 0 and GEN2 in listed.stdout, listed.stderr
    # a pack gone from the sink store is found without a key
    victim = next(sink_store(site).rglob("*.pack"))
    victim.unlink()
    broken = run_agent(site.env, "verify", "--role", "sink", "--all")
    assert broken.returncode != 0
    assert victim.name.removesuffix(".pack")[:12] in broken.stdout + broken.stderr


def test_the_sinks_commands_work_on_its_chunked_store(site, tmp_path):
    """verify and list on the sink; files, export and restore --from the sink store's
    directory where a source's settings are (a recovery host); prune --dry-run on the sink."""
    files = {"a.txt": b"hello\n" * 1000, "dir/b.bin": content(5, 700_000)}
    hand_over(site, GEN1, files)
    assert site.pull("data").returncode == 0
    files2 = {"c.txt": b"other\n" * 1000}
    hand_over(site, GEN2, files2)
    assert site.pull("data", **KEEP_ONE).returncode == 0
    recovery = {
        "PATH": os.environ["PATH"],
        "SOURCE_ID": SOURCE,
        "DATA_PATHS": f"/{DATA}",
        "HANDOVER_DIR": str(tmp_path / "handover"),
        "SOURCE_STORE_DIR": str(tmp_path / "store"),
        "DATA_FORMAT": "chunks",
    }
    origin = ("--from", str(site.sink_store))

    assert run_agent(site.env, "verify", "--role", "sink", "--all").returncode == 0
    listed = run_agent(site.env, "list", "--role", "sink")
    assert listed.returncode == 0 and GEN2 in listed.stdout, listed.stderr
    entries = run_agent(recovery, "files", *origin, "--json")
    assert entries.returncode == 0, entries.stderr
    paths = {json.loads(line).get("path", "").lstrip("/") for line in entries.stdout.splitlines()}
    assert f"{DATA}/c.txt" in paths and f"{DATA}/a.txt" not in paths
    exported = subprocess.run(
        [*AGENT, "export", *origin, "--generation", GEN2],
        env=recovery,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-x", "-C", unpacked], input=exported.stdout, check=True)
    assert (unpacked / DATA / "c.txt").read_bytes() == files2["c.txt"]
    restored = run_agent(recovery, "restore", *origin, "--target", str(tmp_path / "restored"))
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "restored" / DATA / "c.txt").read_bytes() == files2["c.txt"]

    dry = run_agent(site.env, "prune", "--role", "sink", "--dry-run")

    assert dry.returncode == 0, dry.stderr
    condemned = prune.read_record(LocalStore(sink_store(site)))
    assert condemned  # GEN1's packs, condemned by the pull that rotated GEN1 out
    assert f"would delete {len(condemned)} pack(s)" in dry.stdout, dry.stdout
    assert prune.read_record(LocalStore(sink_store(site))) == condemned
    assert set(condemned) <= set(packs_in(sink_store(site)))


def test_a_restore_drill_of_the_tricky_tree_from_the_sink_store(site, tmp_path):
    """Everything an index keeps (modes, owners, ns mtimes, links, holes, odd names, a fifo)
    survives the pull: restored from the sink store alone, the tree is the mirror's."""
    mirror = mirror_dir(site.handover)
    mirror.mkdir(parents=True)
    make_tricky_tree(mirror)
    before = snapshot(mirror)
    hand_over_mirror(site.handover, site.source_store, SOURCE, GEN1)

    result = site.pull("data")

    assert result.returncode == 0, result.stderr
    shutil.rmtree(site.source_store / "data")  # the source's copy is gone
    target = tmp_path / "drill"
    restore_by_hand(sink_store(site), GEN1, target)
    assert snapshot(target / DATA) == before
