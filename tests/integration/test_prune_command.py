"""`backup-agent prune [--dry-run]` of a source's stores: the source store (a real directory)
and the S3 sink store (SeaweedFS), and a real agent process killed (SIGKILL) before each of
its changes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config
from agent.chunks import ids, prune
from agent.core import manifest
from agent.core.handover import Handover
from agent.stores.local import LocalStore
from agent.stores.s3 import S3Store
from tests.chunkstore import build, held_blobs, restore
from tests.conftest import ROOT, S3_PREFIX, free_port, run_agent
from tests.generations import SOURCE
from tests.integration.test_prune import GENS, files, packs_in, tree_digest


def prune_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    data = tmp_path / "app-data"
    data.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "SOURCE_ID": SOURCE,
        "DATA_PATHS": str(data),
        "HANDOVER_DIR": str(tmp_path / "handover"),
        "SOURCE_STORE_DIR": str(tmp_path / "store"),
        "SOURCE_KEEP_LAST": "2",
        "S3_RETRY_SECONDS": "2",
    }
    env.update(extra)
    return env


def scene(root: Path) -> dict[str, dict[str, bytes]]:
    """g0 with chunks of its own; g1 whose packs g2 keeps a fifth of; g3 all new. Return what
    g2 and g3 hold: the generations kept by a keep-last-2 rotation."""
    contents = {
        GENS[0]: files(range(900, 912)),
        GENS[1]: files(range(0, 40)),
        GENS[2]: files(range(0, 40, 5), range(300, 303)),
        GENS[3]: files(range(400, 410)),
    }
    root.mkdir(parents=True, exist_ok=True)
    for gen, content in contents.items():
        build(root, gen, content, held_blobs(LocalStore(root)))
    return {gen: {k: b"".join(v) for k, v in contents[gen].items()} for gen in GENS[2:4]}


def test_a_dry_run_prints_what_would_go_and_changes_nothing(tmp_path):
    kept = scene(tmp_path / "store")
    before = tree_digest(tmp_path / "store")

    result = run_agent(prune_env(tmp_path), "prune", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert (
        f"would apply retention of data in the source store {tmp_path / 'store'}" in result.stdout
    )
    assert f"removed 2: {GENS[1]}, {GENS[0]}" in result.stdout
    assert "would condemn" in result.stdout and "would repack" in result.stdout
    assert tree_digest(tmp_path / "store") == before
    for gen, content in kept.items():
        assert restore(tmp_path / "store", gen) == content


def test_prune_rotates_condemns_repacks_and_a_later_prune_deletes(tmp_path):
    root = tmp_path / "store"
    kept = scene(root)
    g0_packs = {p.id for p in manifest.read(root / "data" / GENS[0]).packs}

    first = run_agent(prune_env(tmp_path), "prune")

    assert first.returncode == 0, first.stderr
    assert f"removed 2: {GENS[1]}, {GENS[0]}" in first.stdout
    assert "repacked" in first.stdout
    assert LocalStore(root).generations("data") == (GENS[2:4], [])
    assert g0_packs <= packs_in(root), "condemned, not deleted yet"

    second = run_agent(prune_env(tmp_path), "prune")

    assert second.returncode == 0, second.stderr
    assert "delete" in second.stdout
    listed = {p.id for gen in kept for p in manifest.read(root / "data" / gen).packs}
    assert packs_in(root) == listed
    for gen, content in kept.items():
        assert restore(root, gen) == content


def test_prune_without_any_generation_says_there_is_nothing_to_collect(tmp_path):
    result = run_agent(prune_env(tmp_path), "prune")
    assert result.returncode == 0, result.stderr
    assert "nothing to collect" in result.stdout


def test_an_invalid_repack_threshold_is_refused_at_start(tmp_path):
    result = run_agent(prune_env(tmp_path, REPACK_BELOW="150"), "prune")
    assert result.returncode == 2
    assert "REPACK_BELOW" in result.stderr and "0 to 100" in result.stderr


def upload_tree(local: Path, store: S3Store) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            name = path.relative_to(local).as_posix()
            if name.endswith(manifest.NAME):
                continue
            store.put_file(name, path, "checksum")
    for path in sorted(local.glob("data/*/" + manifest.NAME)):
        store.put_bytes(path.relative_to(local).as_posix(), path.read_bytes())


def download_tree(store: S3Store, target: Path) -> Path:
    for name, _ in store.list_objects(""):
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(bytes(b) for b in store.read_named(name)))
    return target


def test_prune_collects_the_s3_sink_store_too(tmp_path, s3):
    env = prune_env(
        tmp_path,
        SINK_KEEP_LAST="2",
        SINK_KEEP_DAILY="0",
        SINK_KEEP_WEEKLY="0",
        SINK_KEEP_MONTHLY="0",
        **s3.env(),
    )
    store = S3Store(config.parse_source(env, push=True).s3, SOURCE)
    kept = scene(tmp_path / "built")
    upload_tree(tmp_path / "built", store)
    g0_packs = {p.id for p in manifest.read(tmp_path / "built" / "data" / GENS[0]).packs}

    built_g2 = {p.id for p in manifest.read(tmp_path / "built" / "data" / GENS[2]).packs}

    first = run_agent(env, "prune")
    assert first.returncode == 0, first.stderr
    assert f"garbage collection of the sink store s3://backups/{S3_PREFIX}/{SOURCE}" in first.stdout
    assert "repacked" in first.stdout
    assert {p.id for p in store.read_manifest("data", GENS[2]).packs} != built_g2
    second = run_agent(env, "prune")
    assert second.returncode == 0, second.stderr

    held = prune.store_packs(store)
    assert not g0_packs & set(held)
    assert store.generations("data") == (GENS[2:4], [])
    assert f"{S3_PREFIX}/{SOURCE}/{prune.RECORD}" in s3.keys(f"{S3_PREFIX}/{SOURCE}/gc/")
    copy = download_tree(store, tmp_path / "downloaded")
    listed = {p.id for gen in kept for p in manifest.read(copy / "data" / gen).packs}
    assert set(held) == listed
    for gen, content in kept.items():
        assert restore(copy, gen) == content


KILLER = """
import os, signal, sys
from agent.stores.local import LocalStore
limit, count = int(sys.argv[1]), [0]

def dies_before(name):
    original = getattr(LocalStore, name)
    def changing(self, *args, **kwargs):
        if count[0] == limit:
            os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
        count[0] += 1
        return original(self, *args, **kwargs)
    setattr(LocalStore, name, changing)

for name in ("put_bytes", "put_file", "delete_object", "replace_manifest", "delete_generation"):
    dies_before(name)
from agent import cli
code = cli.main(["prune"])
print("changes:", count[0])
sys.exit(code)
"""


def killed_prune(env: dict[str, str], before_change: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", KILLER, str(before_change)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def prepared(tmp_path: Path) -> tuple[dict[str, str], dict[str, dict[str, bytes]]]:
    """The scene after a prune that kept three generations: g0's packs are condemned, so the
    next prune (keep-last 2) removes g1, deletes g0's packs, repacks g1's and rewrites g2."""
    kept = scene(tmp_path / "store")
    env = prune_env(tmp_path, SOURCE_KEEP_LAST="3", PYTHONPATH=str(ROOT))
    assert run_agent(env, "prune").returncode == 0
    return {**env, "SOURCE_KEEP_LAST": "2"}, kept


def test_a_prune_killed_before_any_of_its_changes_leaves_every_kept_generation_restorable(tmp_path):
    env, _ = prepared(tmp_path / "count")
    clean = killed_prune(env, 10**6)
    assert clean.returncode == 0, clean.stderr
    assert "repacked" in clean.stdout and "delete" in clean.stdout
    changes = int(clean.stdout.rsplit("changes:", 1)[1])
    assert changes >= 6  # a generation removed, packs deleted, record, new pack, manifest, record
    for before_change in range(changes):
        case = tmp_path / f"kill-{before_change}"
        env, kept = prepared(case)
        killed = killed_prune(env, before_change)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        root = case / "store"
        for gen, content in kept.items():
            assert restore(root, gen) == content, f"killed before change {before_change}"
        target = prune.target_for(LocalStore(root), "source store", Handover(case / "handover"))
        for _ in range(2):
            prune.rotate_and_collect(target, config.parse_source(env).source_keep, prune.Settings())
            for gen, content in kept.items():
                assert restore(root, gen) == content, f"killed before change {before_change}"
        listed = {p.id for gen in kept for p in manifest.read(root / "data" / gen).packs}
        assert packs_in(root) == listed, f"garbage left after a kill before {before_change}"


@pytest.mark.parametrize("flag", ["--dry-run", ""])
def test_prune_refuses_to_run_beside_another_job(tmp_path, flag):
    from agent.runtime import lock

    scene(tmp_path / "store")
    handover = Handover(tmp_path / "handover")
    handover.state.mkdir(parents=True)
    with lock.exclusive(handover.lock_path):
        result = run_agent(prune_env(tmp_path), "prune", *([flag] if flag else []))
    assert result.returncode == 3
    assert ids.PACKS_DIR in os.listdir(tmp_path / "store")


def test_a_sigterm_during_a_prune_ends_it_with_143_and_the_next_prunes_finish(tmp_path):
    env, kept = prepared(tmp_path)
    stopped = killed_prune({**env, "KILL_SIGNAL": "SIGTERM"}, 2)

    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "prune interrupted" in stopped.stderr and "Traceback" not in stopped.stderr
    for gen, content in kept.items():
        assert restore(tmp_path / "store", gen) == content
    for _ in range(2):  # garbage goes in two phases: condemned, then deleted
        assert run_agent(env, "prune").returncode == 0
    listed = {p.id for gen in kept for p in manifest.read(tmp_path / "store" / "data" / gen).packs}
    assert packs_in(tmp_path / "store") == listed


def test_a_store_that_cannot_be_reached_is_one_line_and_exit_1_and_the_other_is_pruned(tmp_path):
    env, kept = prepared(tmp_path)
    unreachable = {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "S3_BUCKET": "backups",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
    result = run_agent({**env, **unreachable}, "prune")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("backup-agent: ")]
    assert "127.0.0.1" in line or "s3://" in line, line
    assert sorted(p.name for p in (tmp_path / "store" / "data").iterdir()) == sorted(kept)
