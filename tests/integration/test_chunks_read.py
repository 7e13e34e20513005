"""Reading chunked generations back, against the real file system and SeaweedFS: restore into
a directory (whole and `--path`), `export | tar -x`, `files --json`, `verify` of intact,
damaged and incomplete stores, encryption with the right and a wrong key. The generations are
written by the builder straight into a store directory (tests/chunked.py), and copied into
S3 as a push leaves them."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyrage
import pytest

from agent.chunks import chunker, index, pack
from agent.core import archive, manifest
from agent.core.manifest import FileEntry, Manifest
from tests.chunkgen import build_chunked, corrupt, pack_files, upload_store
from tests.conftest import ROOT, S3_BUCKET, S3_PREFIX
from tests.integration.test_restore import make_realistic_tree
from tests.trees import snapshot

GEN = "2026-11-28T02-00-00Z"
GEN2 = "2026-11-29T02-00-00Z"
MiB = 1 << 20
# random bytes longer than the longest chunk: cut into two chunks at least, whatever the bytes
SEVERAL_CHUNKS = chunker.MAX_SIZE + MiB


def env_for(base: Path, data: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "PYTHONPATH")
    }
    env.update(
        SOURCE_ID="test-source",
        DATA_PATHS=str(data),
        HANDOVER_DIR=str(base / "handover"),
        SOURCE_STORE_DIR=str(base / "store"),
        STOP_LABEL="backup.chunks-read=true",
    )
    env.update(extra)
    return env


def agent(env: dict[str, str], *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        **kwargs,
    )


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """The tricky tree in a data path and one chunked generation of it in the source store."""
    data = tmp_path / "app-data"
    data.mkdir()
    make_realistic_tree(data)
    build_chunked(tmp_path / "store", [data], GEN)
    return tmp_path, data, env_for(tmp_path, data)


def restored(target: Path, data: Path) -> Path:
    return target / str(data).lstrip("/")


def test_a_chunked_generation_restores_into_a_directory_exactly(site) -> None:
    base, data, env = site
    result = agent(env, "restore", "--target", str(base / "out"))
    assert result.returncode == 0, result.stderr
    assert snapshot(restored(base / "out", data)) == snapshot(data)
    sparse = restored(base / "out", data) / "sparse.img"
    assert sparse.stat().st_blocks * 512 < MiB, "the holes of the sparse file were filled"


def test_a_chunked_generation_restores_from_s3_with_the_source_store_gone(site, s3) -> None:
    base, data, env = site
    upload_store(s3, base / "store")
    shutil.rmtree(base / "store")
    result = agent({**env, **s3.env()}, "restore", "--from", "s3", "--target", str(base / "out"))
    assert result.returncode == 0, result.stderr
    assert f"from s3://{S3_BUCKET}/{S3_PREFIX}/test-source" in result.stdout
    assert snapshot(restored(base / "out", data)) == snapshot(data)


def test_a_file_changed_in_place_restores_as_it_was_in_each_generation(tmp_path: Path) -> None:
    data = tmp_path / "app-data"
    data.mkdir()
    db = data / "db.bin"
    first = os.urandom(6 * MiB)
    db.write_bytes(first)
    build_chunked(tmp_path / "store", [data], GEN)
    second = bytearray(first)
    second[3 * MiB : 3 * MiB + 4096] = os.urandom(4096)  # rewritten in place, same size
    with open(db, "r+b") as handle:
        handle.seek(3 * MiB)
        handle.write(second[3 * MiB : 3 * MiB + 4096])
    build_chunked(tmp_path / "store", [data], GEN2)
    env = env_for(tmp_path, data)
    for gen, content in ((GEN, first), (GEN2, bytes(second))):
        out = tmp_path / f"out-{gen}"
        result = agent(env, "restore", "--generation", gen, "--target", str(out))
        assert result.returncode == 0, result.stderr
        assert (restored(out, data) / "db.bin").read_bytes() == content


def test_restore_path_brings_back_one_file_from_s3_reading_only_its_blobs(site, s3) -> None:
    base, data, env = site
    upload_store(s3, base / "store")
    wanted = data / "uploads" / "photo one.jpg"
    started = time.monotonic()
    result = agent(
        {**env, **s3.env()},
        "restore",
        "--from",
        "s3",
        "--path",
        str(wanted),
        "--target",
        str(base / "out"),
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    out = restored(base / "out", data)
    assert sorted(p.name for p in out.rglob("*")) == ["photo one.jpg", "uploads"]
    assert (out / "uploads" / "photo one.jpg").read_bytes() == wanted.read_bytes()
    assert os.stat(out / "uploads" / "photo one.jpg").st_mtime_ns == wanted.stat().st_mtime_ns
    assert "1 files, 100000 bytes) from 1 packs, 1 blobs; 0 files read back" in result.stderr
    print(f"restore --path of a 100 kB file from S3: {elapsed:.2f} s with the interpreter")


def test_restore_path_of_a_hard_link_whose_first_name_is_elsewhere_gives_the_content(site) -> None:
    base, data, env = site
    wanted = data / "uploads" / "photo-hardlink.jpg"
    result = agent(env, "restore", "--path", str(wanted), "--target", str(base / "out"))
    assert result.returncode == 0, result.stderr
    assert (
        restored(base / "out", data) / "uploads" / "photo-hardlink.jpg"
    ).read_bytes() == wanted.read_bytes()


def test_restore_path_of_something_the_generation_does_not_hold_is_refused(site) -> None:
    base, data, env = site
    result = agent(
        env, "restore", "--path", str(data / "no-such-file"), "--target", str(base / "out")
    )
    assert result.returncode == 2
    assert f"holds no {data / 'no-such-file'}" in result.stderr
    assert not (base / "out").exists()


def test_export_piped_to_tar_gives_the_tree_back(site) -> None:
    base, data, env = site
    (base / "out").mkdir()
    export = subprocess.Popen(
        [sys.executable, "-m", "agent", "export"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    untar = subprocess.run(
        ["tar", "-x", "--numeric-owner", "-p", "-C", str(base / "out")],
        stdin=export.stdout,
        capture_output=True,
    )
    assert export.wait(timeout=300) == 0, export.stderr.read()  # type: ignore[union-attr]
    assert untar.returncode == 0, untar.stderr
    assert snapshot(restored(base / "out", data)) == snapshot(data)


def archive_generation(tmp_path: Path) -> Path:
    """An archive generation (data.tar.zst) of a small tree in the source store; return the
    data path."""
    data = tmp_path / "app-data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "file").write_bytes(os.urandom(50_000))
    os.symlink("sub/file", data / "link")
    os.utime(data / "sub" / "file", ns=(1_600_000_000_123_456_789,) * 2)
    gen_dir = tmp_path / "store" / "data" / GEN
    gen_dir.mkdir(parents=True)
    done = archive.create(Path("/"), [str(data).lstrip("/")], gen_dir / archive.ARCHIVE_NAME, 3, 1)
    entry = FileEntry(archive.ARCHIVE_NAME, done.stored.size, done.stored.sha256)
    manifest.write(
        gen_dir, Manifest("test-source", "data", GEN, GEN, 0.1, "test", (entry,), (str(data),))
    )
    return data


def test_export_of_an_archive_generation_is_its_tar(tmp_path: Path) -> None:
    data = archive_generation(tmp_path)
    raw = subprocess.run(
        [sys.executable, "-m", "agent", "export"],
        cwd=ROOT,
        check=True,
        env=env_for(tmp_path, data),
        capture_output=True,
    ).stdout
    (tmp_path / "out").mkdir()
    subprocess.run(["tar", "-x", "-C", str(tmp_path / "out")], input=raw, check=True)
    assert snapshot(restored(tmp_path / "out", data)) == snapshot(data)


def test_files_of_an_archive_generation_lists_its_members(tmp_path: Path) -> None:
    data = archive_generation(tmp_path)
    result = agent(env_for(tmp_path, data), "files", "--json")
    assert result.returncode == 0, result.stderr
    items = {i["path"]: i for i in map(json.loads, result.stdout.splitlines())}
    assert sorted(items) == [
        str(data),
        str(data / "link"),
        str(data / "sub"),
        str(data / "sub" / "file"),
    ]
    assert items[str(data / "sub" / "file")]["size"] == 50_000
    assert items[str(data / "sub" / "file")]["mtime_ns"] == 1_600_000_000_123_456_789
    assert items[str(data / "link")]["target"] == "sub/file"


def test_export_to_a_terminal_is_refused(site) -> None:
    _base, _data, env = site
    script = (
        f"import pty, sys; sys.exit(pty.spawn([{sys.executable!r}, '-m', 'agent', 'export']) >> 8)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=60
    )
    assert result.returncode == 2
    assert b"not to a terminal" in result.stdout


def test_files_json_lists_every_entry_with_its_kind_and_names_that_are_not_utf8(site) -> None:
    _base, data, env = site
    result = agent(env, "files", "--json")
    assert result.returncode == 0, result.stderr
    items = [json.loads(line) for line in result.stdout.splitlines()]
    by_path = {
        (i.get("path") or base64.b64decode(i["path_b64"]).decode(errors="replace")): i
        for i in items
    }
    root = str(data)
    assert by_path[root]["type"] == "dir"
    photo = by_path[f"{root}/uploads/photo one.jpg"]
    assert (photo["type"], photo["size"], photo["mode"]) == ("file", 100_000, 0o4755)
    assert photo["mtime_ns"] == 1_600_000_000_123_456_789
    assert by_path[f"{root}/uploads/photo-hardlink.jpg"]["link"] == f"{root}/uploads/photo one.jpg"
    assert by_path[f"{root}/uploads/latest.jpg"]["target"] == "photo one.jpg"
    latin = [i for i in items if "path_b64" in i]
    assert [base64.b64decode(i["path_b64"]) for i in latin] == [
        os.fsencode(data / "uploads") + b"/latin-\xe9t\xe9.txt"
    ]
    assert len(items) == len(snapshot(data)) + 1  # and the data path itself


def test_files_of_a_path_lists_it_and_what_lies_below(site) -> None:
    _base, data, env = site
    result = agent(env, "files", str(data / "db"))
    assert result.returncode == 0, result.stderr
    assert [re.sub(r"^.*? \d\d:\d\d:\d\d ", "", line) for line in result.stdout.splitlines()] == [
        str(data / "db"),
        str(data / "db" / "PG_VERSION"),
        str(data / "db" / "base"),
        str(data / "db" / "base" / "16384"),
    ]
    assert result.stdout.startswith("drwx------ 999/999")


def test_verify_reads_every_pack_and_checks_every_file(site) -> None:
    base, _data, env = site
    result = agent(env, "verify", "--role", "source")
    assert result.returncode == 0, result.stderr
    packs = len(pack_files(base / "store"))
    assert re.search(
        rf"{packs} of {packs} packs read \(\d+ bytes\), 7 files and \d+ chunks decoded and "
        "checked",
        result.stderr,
    ), result.stderr


def test_verify_finds_a_corrupted_pack_and_restore_refuses_it(site) -> None:
    base, _data, env = site
    damaged = max(pack_files(base / "store"), key=lambda p: p.stat().st_size)
    corrupt(damaged)
    checked = agent(env, "verify", "--role", "source")
    assert checked.returncode == 1
    assert f"pack {damaged.stem}" in checked.stderr and "damaged" in checked.stderr
    result = agent(env, "restore", "--target", str(base / "out"))
    assert result.returncode == 1
    assert not (base / "out").exists()


def test_verify_names_a_deleted_pack_and_restore_refuses_the_generation(site) -> None:
    base, _data, env = site
    gone = pack_files(base / "store")[0]
    gone.unlink()
    checked = agent(env, "verify", "--role", "source")
    assert checked.returncode == 1
    assert f"pack {gone.stem} is missing" in checked.stderr
    result = agent(env, "restore", "--target", str(base / "out"))
    assert result.returncode == 1
    assert gone.stem in result.stderr
    assert not (base / "out").exists()


def test_verify_of_a_subset_reads_only_some_packs_but_checks_all_are_there(site) -> None:
    base, _data, env = site
    result = agent(env, "verify", "--role", "source", "--read-data-subset=1%")
    assert result.returncode == 0, result.stderr
    packs = len(pack_files(base / "store"))
    read = re.search(rf"(\d+) of {packs} packs read", result.stderr)
    assert read and int(read[1]) < packs, result.stderr
    pack_files(base / "store")[-1].unlink()
    assert agent(env, "verify", "--role", "source", "--read-data-subset=1%").returncode == 1


def test_an_encrypted_generation_restores_with_its_key_and_a_wrong_key_is_one_line(
    tmp_path: Path,
) -> None:
    data = tmp_path / "app-data"
    data.mkdir()
    make_realistic_tree(data)
    key = pyrage.x25519.Identity.generate()
    m = build_chunked(tmp_path / "store", [data], GEN, recipients=[key.to_public()])
    assert m.encrypted and m.files[0].path == "INDEX.zst.age"
    env = env_for(tmp_path, data, DECRYPT_IDENTITY=str(key))
    result = agent(env, "restore", "--target", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert snapshot(restored(tmp_path / "out", data)) == snapshot(data)
    assert agent(env, "verify", "--role", "source").returncode == 0

    wrong = env_for(tmp_path, data, DECRYPT_IDENTITY=str(pyrage.x25519.Identity.generate()))
    result = agent(wrong, "restore", "--target", str(tmp_path / "other"))
    assert result.returncode == 1
    assert "is not a recipient of this generation" in result.stderr
    assert not (tmp_path / "other").exists()
    without = agent(env_for(tmp_path, data), "files")
    assert without.returncode == 2 and "DECRYPT_IDENTITY_FILE" in without.stderr


def _rewrite(
    store: Path, gen: str, change_sha256_of: str = "", reverse_packs: bool = False
) -> None:
    """Rewrite generation `gen` consistently (index, then manifest): give the file
    `change_sha256_of` another sha256 in the index, and list the packs in the order of the
    chunks in the files, or (`reverse_packs`) in the reverse order."""
    gen_dir = store / "data" / gen
    m = manifest.read(gen_dir)
    entries = list(index.read_entries(gen_dir / index.NAME))
    for entry in entries:
        if entry.path.endswith(b"/" + change_sha256_of.encode()) and change_sha256_of:
            entry.sha256 = "0" * 64
    plain = store / "plain.zst"
    writer = index.IndexWriter(plain, 3)
    for entry in entries:
        writer.write(entry)
    writer.close()
    name, size, sha256 = index.publish(plain, gen_dir, ())
    plain.unlink()
    holder = {
        entry.chunk_id.hex(): path.stem
        for path in pack_files(store)
        for entry in pack.read_trailer(pack.file_range_reader(path), path.stat().st_size)
    }
    order = [holder[cid] for entry in entries for cid, _, _ in entry.chunks]
    packs = tuple(sorted(m.packs, key=lambda ref: order.index(ref.id), reverse=reverse_packs))
    manifest.write(
        gen_dir, dataclasses.replace(m, files=(FileEntry(name, size, sha256),), packs=packs)
    )


@pytest.mark.parametrize("order", ["in order", "out of order"])
def test_a_file_whose_content_differs_from_its_index_is_refused(tmp_path: Path, order: str) -> None:
    data = tmp_path / "app-data"
    data.mkdir()
    (data / "big.bin").write_bytes(os.urandom(SEVERAL_CHUNKS))
    m = build_chunked(tmp_path / "store", [data], GEN, pack_size=1)  # a pack per blob
    assert len(m.packs) > 1
    _rewrite(tmp_path / "store", GEN, "big.bin", reverse_packs=order == "out of order")
    result = agent(env_for(tmp_path, data), "restore", "--target", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "the generation is damaged" in result.stderr and "big.bin" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_file_whose_chunks_arrive_out_of_order_is_restored_and_checked(tmp_path: Path) -> None:
    data = tmp_path / "app-data"
    data.mkdir()
    (data / "big.bin").write_bytes(os.urandom(SEVERAL_CHUNKS))
    m = build_chunked(tmp_path / "store", [data], GEN, pack_size=1)  # a pack per blob
    assert len(m.packs) > 1
    for reverse in (False, True):
        _rewrite(tmp_path / "store", GEN, reverse_packs=reverse)
        out = tmp_path / f"out-{reverse}"
        result = agent(env_for(tmp_path, data), "restore", "--target", str(out))
        assert result.returncode == 0, result.stderr
        assert (restored(out, data) / "big.bin").read_bytes() == (data / "big.bin").read_bytes()
        assert f"; {int(reverse)} files read back to check them" in result.stderr


def test_list_shows_logical_and_added_bytes_and_the_stores_deduplication(tmp_path: Path) -> None:
    data = tmp_path / "app-data"
    data.mkdir()
    (data / "big.bin").write_bytes(os.urandom(4 * MiB))
    m1 = build_chunked(tmp_path / "store", [data], GEN)
    (data / "new.bin").write_bytes(os.urandom(300_000))
    m2 = build_chunked(tmp_path / "store", [data], GEN2)
    result = agent(env_for(tmp_path, data), "list", "--role", "source", "--json")
    assert result.returncode == 0, result.stderr
    rows = {
        row["generation"]: row
        for row in json.loads(result.stdout)
        if row["store"] == "source store"
    }
    packs = sum(p.stat().st_size for p in pack_files(tmp_path / "store"))
    assert rows[GEN]["data_format"] == rows[GEN2]["data_format"] == "chunks"
    assert (rows[GEN]["logical_size"], rows[GEN2]["logical_size"]) == (4 * MiB, 4 * MiB + 300_000)
    assert rows[GEN]["added_size"] + rows[GEN2]["added_size"] == packs
    assert rows[GEN2]["added_size"] < 400_000, "the unchanged file was stored again"
    assert rows[GEN2]["store_size"] == packs + m1.total_size + m2.total_size
    ratio = (8 * MiB + 300_000) / (packs + m1.total_size + m2.total_size)
    assert rows[GEN2]["store_dedup_ratio"] == pytest.approx(ratio, abs=0.01)
    table = agent(env_for(tmp_path, data), "list", "--role", "source").stdout
    assert "× the bytes they take (deduplication)" in table
