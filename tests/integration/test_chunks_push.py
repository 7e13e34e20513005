"""Chunked data generations through step 1 and push against the real components: a Docker
application with its volume, SeaweedFS as the sink store, the source store on disk. The
tricky tree round-trips, a second run reads and uploads only what changed, a lost or stale
dedup cache costs an upload and never a broken generation, encryption needs only the
recipients on the source, and a push killed at any step leaves every complete generation
restorable and the next run completes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyrage
import pytest
import zstandard

from agent.chunks import ids, index, pack
from agent.core.manifest import CHUNK_ID_KEY
from tests.chunked import MiB, make_tricky_tree, restore_by_hand
from tests.conftest import ROOT, S3_BUCKET, S3_PREFIX, agent_env, run_agent
from tests.generations import SOURCE
from tests.trees import snapshot

pytestmark = pytest.mark.docker

ROOT_KEY = f"{S3_PREFIX}/{SOURCE}"
READ = re.compile(r"chunked data: (\d+) file\(s\) read \((\d+) bytes\), (\d+) unchanged")


def env_for(app, tmp_path: Path, s3, **extra: str) -> dict[str, str]:
    return {
        **agent_env(app, tmp_path / "handover"),
        **s3.env(),
        "DATA_FORMAT": "chunks",
        "LOG_PATHS": "",
        "S3_RETRY_SECONDS": "2",
        **extra,
    }


def source_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = run_agent(env, "source", *(args or ("run",)))
    assert result.returncode == 0, result.stderr
    return result


def read_figures(result: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    found = READ.search(result.stderr)
    assert found, result.stderr
    return int(found[1]), int(found[2]), int(found[3])


def s3_packs(s3) -> set[str]:
    return {k.rsplit("/", 1)[1][:-5] for k in s3.keys(f"{ROOT_KEY}/packs/") if k.endswith(".pack")}


def s3_generations(s3) -> list[str]:
    return sorted(
        k.split("/")[-2] for k in s3.keys(f"{ROOT_KEY}/data/") if k.endswith("/MANIFEST.json")
    )


def download(s3, target: Path) -> Path:
    """Every object of this source in S3, as a local store directory."""
    client = s3.client()
    for key in s3.keys(f"{ROOT_KEY}/"):
        path = target / key[len(ROOT_KEY) + 1 :]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read())
    return target


def member(app) -> str:
    return str(app.data_dir).lstrip("/")


def test_the_tricky_tree_restores_from_s3_with_the_source_store_gone(make_app, s3, tmp_path):
    app = make_app()
    make_tricky_tree(app.data_dir)
    before = snapshot(app.data_dir)
    source_run(env_for(app, tmp_path, s3))
    [gen] = s3_generations(s3)
    manifest = json.loads((tmp_path / "store" / "data" / gen / "MANIFEST.json").read_text())
    assert manifest["format"] == 2 and manifest["data_format"] == "chunks"
    assert {p["id"] for p in manifest["packs"]} == s3_packs(s3)
    shutil.rmtree(tmp_path / "store")
    restore_by_hand(download(s3, tmp_path / "from-s3"), gen, tmp_path / "restored")
    assert snapshot(tmp_path / "restored" / member(app)) == before
    assert not list((tmp_path / "handover" / "packs").rglob("*.pack")), "handover not freed"


def test_the_tricky_tree_built_and_pushed_is_restored_by_the_agent_from_s3(make_app, s3, tmp_path):
    app = make_app()
    make_tricky_tree(app.data_dir)
    before = snapshot(app.data_dir)
    env = env_for(app, tmp_path, s3)
    source_run(env)
    shutil.rmtree(tmp_path / "store")
    for entry in app.data_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()

    result = run_agent(env, "restore", "--from", "s3")

    assert result.returncode == 0, result.stderr
    assert snapshot(app.data_dir) == before
    assert os.stat(app.data_dir / "sparse.img").st_blocks * 512 < 4 * MiB
    assert app.reload() == "running"


def test_a_second_run_reads_only_the_changed_files_and_uploads_only_new_packs(
    make_app, s3, tmp_path
):
    app = make_app()
    for i in range(20):
        (app.data_dir / f"file-{i:02d}").write_bytes(os.urandom(300_000))
    # Seeded, so the chunk boundaries around the change are the same every run.
    (app.data_dir / "db").write_bytes(random.Random(8).randbytes(8 * MiB))
    env = env_for(app, tmp_path, s3, PACK_SIZE_MB="4")
    first_read = read_figures(source_run(env))
    assert first_read[0] == 21
    first_packs = s3_packs(s3)
    with open(app.data_dir / "db", "r+b") as handle:
        handle.seek(5 * MiB)
        handle.write(random.Random(64).randbytes(64 * 1024))
    (app.data_dir / "file-03").write_bytes(os.urandom(300_000))
    before = snapshot(app.data_dir)

    files_read, bytes_read, reused = read_figures(source_run(env))

    assert (files_read, bytes_read, reused) == (2, 8 * MiB + 300_000, 19)
    second_packs = s3_packs(s3)
    assert first_packs < second_packs
    new = second_packs - first_packs
    sizes = {
        k.rsplit("/", 1)[1][:-5]: s
        for k, s in (
            (o["Key"], o["Size"])
            for o in s3.client().list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{ROOT_KEY}/packs/")[
                "Contents"
            ]
        )
    }
    assert sum(sizes[p] for p in new) < 6 * MiB, "more than the changed chunks were uploaded"
    _, second = s3_generations(s3)
    restore_by_hand(download(s3, tmp_path / "from-s3"), second, tmp_path / "restored")
    assert snapshot(tmp_path / "restored" / member(app)) == before


def test_with_the_dedup_caches_deleted_the_next_run_uploads_nothing_twice(make_app, s3, tmp_path):
    app = make_app()
    (app.data_dir / "f").write_bytes(os.urandom(3 * MiB))
    env = env_for(app, tmp_path, s3)
    source_run(env)
    packs = s3_packs(s3)
    shutil.rmtree(tmp_path / "handover" / ".state" / "chunks")  # caches, parent index, all

    files_read, _, _ = read_figures(source_run(env))

    assert files_read == 1, "without its parent index the file is read again"
    assert s3_packs(s3) == packs, "a chunk the stores hold was uploaded again"
    assert len(s3_generations(s3)) == 2


def test_a_pack_removed_from_s3_behind_the_caches_back_is_uploaded_again(make_app, s3, tmp_path):
    app = make_app()
    (app.data_dir / "f").write_bytes(os.urandom(3 * MiB))
    (app.data_dir / "g").write_bytes(os.urandom(MiB))
    env = env_for(app, tmp_path, s3, PACK_SIZE_MB="4")
    source_run(env)
    first = s3_generations(s3)[0]
    manifest = json.loads((tmp_path / "store" / "data" / first / "MANIFEST.json").read_text())
    lost = manifest["packs"][0]["id"]
    s3.client().delete_object(Bucket=S3_BUCKET, Key=f"{ROOT_KEY}/{ids.pack_key(lost)}")
    (app.data_dir / "h").write_bytes(b"a new file")
    before = snapshot(app.data_dir)

    source_run(env)

    second = s3_generations(s3)[-1]
    store = download(s3, tmp_path / "from-s3")
    listed = json.loads((store / "data" / second / "MANIFEST.json").read_text())["packs"]
    assert all((store / ids.pack_key(p["id"])).is_file() for p in listed)
    restore_by_hand(store, second, tmp_path / "restored")
    assert snapshot(tmp_path / "restored" / member(app)) == before
    restore_by_hand(tmp_path / "store", first, tmp_path / "first")  # the source store's copy


def test_encryption_needs_only_the_recipients_on_the_source(make_app, s3, tmp_path):
    app = make_app()
    (app.data_dir / "secret.txt").write_bytes(b"attack at dawn\n" * 1000)
    identity = pyrage.x25519.Identity.generate()
    env = env_for(app, tmp_path, s3, ENCRYPT_RECIPIENTS=str(identity.to_public()))
    source_run(env)
    [gen] = s3_generations(s3)
    store = download(s3, tmp_path / "from-s3")
    gen_dir = store / "data" / gen
    assert (gen_dir / index.ENCRYPTED_NAME).is_file() and not (gen_dir / index.NAME).exists()
    assert json.loads((gen_dir / "MANIFEST.json").read_text())["encrypted"] is True
    key = ids.decrypt_key((gen_dir / CHUNK_ID_KEY).read_bytes(), [identity])
    assert key == (tmp_path / "handover" / ".state" / "chunks" / ids.KEY_FILE).read_bytes()
    [entry] = [
        e
        for e in index.read_entries(gen_dir / index.ENCRYPTED_NAME, [identity])
        if e.path.endswith(b"secret.txt")
    ]
    [(cid, _, length)] = entry.chunks
    [pack_file] = (store / "packs").rglob("*.pack")
    body = pack_file.read_bytes()
    [blob] = pack.parse_trailer(body, len(body))
    assert blob.chunk_id.hex() == cid != hashlib.sha256(b"attack at dawn\n" * 1000).hexdigest()
    assert b"attack at dawn" not in body
    sealed = body[blob.offset : blob.offset + blob.stored_length]
    plain = zstandard.ZstdDecompressor().decompress(pyrage.decrypt(sealed, [identity]))
    assert plain == b"attack at dawn\n" * 1000 and length == len(plain)
    (app.data_dir / "secret.txt").write_text("changed")
    restored = run_agent({**env, "DECRYPT_IDENTITY": str(identity)}, "restore", "--from", "s3")
    assert restored.returncode == 0, restored.stderr
    assert (app.data_dir / "secret.txt").read_bytes() == b"attack at dawn\n" * 1000


def test_after_the_recipients_change_every_generation_verifies_chunk_ids_and_all(
    make_app, s3, tmp_path
):
    """Each encrypted generation carries the chunk-id key its chunk ids were made with,
    encrypted to its own recipients: one made before ENCRYPT_RECIPIENTS changed still has its
    blobs decoded and their ids checked, in S3 and in the source store."""
    app = make_app()
    (app.data_dir / "secret.txt").write_bytes(b"attack at dawn\n" * 1000)
    old, new = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    source_run(env_for(app, tmp_path, s3, ENCRYPT_RECIPIENTS=str(old.to_public())))
    env = env_for(app, tmp_path, s3, ENCRYPT_RECIPIENTS=str(new.to_public()))
    source_run(env)
    first, second = s3_generations(s3)
    store = download(s3, tmp_path / "s3")
    keys = [(store / "data" / gen / CHUNK_ID_KEY).read_bytes() for gen in (first, second)]
    assert ids.decrypt_key(keys[0], [old]) != ids.decrypt_key(keys[1], [new])

    both = {**env, "DECRYPT_IDENTITY": f"{old}\n{new}\n"}
    checked = run_agent(both, "verify", "--all")

    assert checked.returncode == 0, checked.stderr
    for gen in (first, second):  # in both stores
        assert len(re.findall(rf"{gen}: .* chunks decoded and checked", checked.stderr)) == 2


KILLER = """
import logging, os, re, runpy, signal, sys

pattern = re.compile(os.environ["KILL_AFTER"])
handle = logging.Logger.handle

def killing(self, record):
    handle(self, record)
    if pattern.search(record.getMessage()):
        os.kill(os.getpid(), signal.SIGKILL)

logging.Logger.handle = killing
sys.argv = ["backup-agent", *sys.argv[1:]]
runpy.run_module("agent", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "after",
    [
        r"^2\.a upload the packs .* done",
        r"^verify data generation .* done",
        r"^2\.a check that .* holds every pack .* done",
        r"^2\.c move .* done",
    ],
    ids=["after-packs", "after-index", "before-manifest", "after-2c"],
)
def test_a_push_killed_at_any_step_leaves_every_generation_restorable_and_the_next_completes(
    make_app, s3, tmp_path, after
):
    app = make_app()
    (app.data_dir / "kept").write_bytes(os.urandom(2 * MiB))
    env = env_for(app, tmp_path, s3, PACK_SIZE_MB="4")
    source_run(env)
    [first] = s3_generations(s3)
    (app.data_dir / "new").write_bytes(os.urandom(2 * MiB))
    before = snapshot(app.data_dir)
    source_run(env, "backup")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)

    killed = subprocess.run(
        [sys.executable, str(killer), "source", "push"],
        env={**env, "KILL_AFTER": after},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    for gen in s3_generations(s3):  # whatever is complete in S3 restores
        restore_by_hand(download(s3, tmp_path / f"s3-{gen}"), gen, tmp_path / f"r-{gen}")
    for gen in os.listdir(tmp_path / "store" / "data"):
        restore_by_hand(tmp_path / "store", gen, tmp_path / f"local-{gen}")
    source_run(env, "push")
    first_again, second = s3_generations(s3)
    assert first_again == first
    restore_by_hand(download(s3, tmp_path / "s3-after"), second, tmp_path / "after")
    assert snapshot(tmp_path / "after" / member(app)) == before
    restore_by_hand(tmp_path / "store", second, tmp_path / "local-after")
    assert snapshot(tmp_path / "local-after" / member(app)) == before
    assert os.listdir(tmp_path / "handover" / "data") == []
    assert not list((tmp_path / "handover" / "packs").rglob("*.pack"))


def test_a_push_collects_the_packs_rotation_left_in_two_phases(make_app, s3, tmp_path):
    """SINK_KEEP_LAST=1 and SOURCE_KEEP_LAST=1: the pack only an old generation listed is
    condemned by the push that rotated it away and deleted by the next push, in S3 and in
    the source store; the kept generation restores from S3."""
    app = make_app()
    (app.data_dir / "first.bin").write_bytes(os.urandom(2 * MiB))
    env = env_for(
        app,
        tmp_path,
        s3,
        SINK_KEEP_LAST="1",
        SOURCE_KEEP_LAST="1",
        SINK_KEEP_DAILY="0",
        SINK_KEEP_WEEKLY="0",
        SINK_KEEP_MONTHLY="0",
        SOURCE_KEEP_DAILY="0",
        SOURCE_KEEP_WEEKLY="0",
        SOURCE_KEEP_MONTHLY="0",
    )
    source_run(env)
    first = s3_packs(s3)
    (app.data_dir / "first.bin").unlink()
    (app.data_dir / "second.bin").write_bytes(os.urandom(2 * MiB))

    condemning = source_run(env)

    assert first <= s3_packs(s3), "deleted in the run that condemned it"
    assert "sink store s3://backups/sites/test-source: condemn 1 pack(s)" in condemning.stderr
    local = tmp_path / "store"
    source_store_packs = {p.stem for p in local.rglob("*.pack")}
    assert first <= source_store_packs

    (app.data_dir / "third.bin").write_bytes(os.urandom(1 * MiB))
    source_run(env)

    assert not first & s3_packs(s3), "a pack no kept generation lists is still in S3"
    assert not first & {p.stem for p in local.rglob("*.pack")}, "still in the source store"
    [gen] = s3_generations(s3)
    restore_by_hand(download(s3, tmp_path / "from-s3"), gen, tmp_path / "restored")
    assert (tmp_path / "restored" / member(app) / "third.bin").stat().st_size == 1 * MiB
