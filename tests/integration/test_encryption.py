"""Encryption at rest against the real components: a Docker application, the `age` tool,
SeaweedFS for the push transport. Keys are made with `age-keygen` and `ssh-keygen`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import agent_env, run_agent
from tests.integration.test_pull import site  # noqa: F401 - the pull-mode site fixture
from tests.integration.test_restore import make_realistic_tree, push_env, wipe
from tests.trees import snapshot

pytestmark = pytest.mark.docker

ENCRYPTED = "data.tar.zst.age"


def age_key(path: Path) -> tuple[Path, str]:
    """Make an age identity file; return it and its public key."""
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    public = subprocess.run(
        ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    return path, public


def ssh_key(path: Path) -> tuple[Path, str]:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops@example.org", "-f", str(path)],
        check=True,
    )
    return path, Path(f"{path}.pub").read_text().strip()


def only(directory: Path) -> Path:
    [entry] = list(directory.iterdir())
    return entry


def back_up_into_the_source_store(env: dict[str, str], tmp_path: Path) -> Path:
    """`source backup`, then move the generation to the source store as 2.c does; return it."""
    assert run_agent(env, "source", "backup").returncode == 0
    gen_dir = only(tmp_path / "handover" / "data")
    (tmp_path / "store" / "data").mkdir(parents=True, exist_ok=True)
    return gen_dir.rename(tmp_path / "store" / "data" / gen_dir.name)


def test_an_encrypted_generation_restores_the_exact_tree_and_age_d_gives_the_archive(
    make_app, tmp_path
):
    app = make_app()
    make_realistic_tree(app.data_dir)
    before = snapshot(app.data_dir)
    key, public = age_key(tmp_path / "key.txt")
    env = agent_env(app, tmp_path / "handover", ENCRYPT_RECIPIENTS=public)

    gen_dir = back_up_into_the_source_store(env, tmp_path)

    assert sorted(os.listdir(gen_dir)) == ["MANIFEST.json", ENCRYPTED]
    [entry] = json.loads((gen_dir / "MANIFEST.json").read_text())["files"]
    stored = (gen_dir / ENCRYPTED).read_bytes()
    assert stored.startswith(b"age-encryption.org/v1\n")
    assert (entry["size"], entry["sha256"]) == (len(stored), hashlib.sha256(stored).hexdigest())
    by_hand = subprocess.run(
        ["age", "-d", "-i", str(key), str(gen_dir / ENCRYPTED)], check=True, capture_output=True
    ).stdout
    assert (entry["plaintext_size"], entry["plaintext_sha256"]) == (
        len(by_hand),
        hashlib.sha256(by_hand).hexdigest(),
    )
    unpacked = tmp_path / "by-hand"
    unpacked.mkdir()
    subprocess.run(
        f"age -d -i '{key}' '{gen_dir / ENCRYPTED}' | zstd -d | "
        f"tar -x --numeric-owner -p -C '{unpacked}'",
        shell=True,
        check=True,
    )
    assert snapshot(unpacked / str(app.data_dir).lstrip("/")) == before

    wipe(app.data_dir)
    result = run_agent({**env, "DECRYPT_IDENTITY_FILE": str(key)}, "restore")

    assert result.returncode == 0, result.stderr
    assert snapshot(app.data_dir) == before
    assert app.reload() == "running"


def test_a_wrong_key_is_one_clear_error_and_nothing_is_restored(make_app, tmp_path):
    app = make_app()
    (app.data_dir / "file").write_text("backed up")
    _, public = age_key(tmp_path / "key.txt")
    other, _ = age_key(tmp_path / "other.txt")
    env = agent_env(app, tmp_path / "handover", ENCRYPT_RECIPIENTS=public)
    back_up_into_the_source_store(env, tmp_path)
    (app.data_dir / "file").write_text("current")
    before = snapshot(app.data_dir)
    started = app.started_at()

    wrong = run_agent({**env, "DECRYPT_IDENTITY_FILE": str(other)}, "restore")
    missing = run_agent(env, "restore")

    assert wrong.returncode == 1
    assert "not a recipient of this generation" in wrong.stderr
    assert missing.returncode == 2 and "DECRYPT_IDENTITY_FILE" in missing.stderr
    assert snapshot(app.data_dir) == before
    assert app.reload() == "running" and app.started_at() == started


def test_a_truncated_or_changed_ciphertext_is_detected(make_app, tmp_path):
    app = make_app()
    (app.data_dir / "file").write_bytes(os.urandom(300_000))
    key, public = age_key(tmp_path / "key.txt")
    env = agent_env(
        app, tmp_path / "handover", ENCRYPT_RECIPIENTS=public, DECRYPT_IDENTITY_FILE=str(key)
    )
    gen_dir = back_up_into_the_source_store(env, tmp_path)
    before = snapshot(app.data_dir)
    archive = gen_dir / ENCRYPTED
    original = archive.read_bytes()
    without_key = {k: v for k, v in env.items() if k != "DECRYPT_IDENTITY_FILE"}

    def damage(data: bytes, manifest_too: bool) -> None:
        archive.write_bytes(data)
        if manifest_too:  # crafted: the stored hash in the manifest matches the damage
            body = json.loads((gen_dir / "MANIFEST.json").read_text())
            body["files"][0].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
            (gen_dir / "MANIFEST.json").write_text(json.dumps(body))

    for data in (
        original[:-1000],
        original[: len(original) // 2],
        original[:5000] + bytes([original[5000] ^ 1]) + original[5001:],
    ):
        for manifest_too in (False, True):
            damage(data, manifest_too)
            restored = run_agent(env, "restore")
            assert restored.returncode == 1, restored.stderr
            assert snapshot(app.data_dir) == before
            checked = run_agent(env, "verify", "--all")
            assert checked.returncode == 1, checked.stderr
            # without the key only the stored hash can be checked: it finds plain damage
            assert run_agent(without_key, "verify", "--all").returncode == (
                0 if manifest_too else 1
            )
    assert app.reload() == "running"


def test_verify_without_a_key_checks_the_ciphertext_and_with_one_the_plaintext(make_app, tmp_path):
    app = make_app()
    (app.data_dir / "file").write_text("data")
    key, public = age_key(tmp_path / "key.txt")
    env = agent_env(app, tmp_path / "handover", ENCRYPT_RECIPIENTS=public, LOG_PATHS="")
    gen_dir = back_up_into_the_source_store(env, tmp_path)
    with_key = {**env, "DECRYPT_IDENTITY_FILE": str(key)}

    assert run_agent(env, "verify", "--all").returncode == 0
    assert run_agent(with_key, "verify", "--all").returncode == 0

    body = json.loads((gen_dir / "MANIFEST.json").read_text())
    body["files"][0]["plaintext_sha256"] = "0" * 64
    (gen_dir / "MANIFEST.json").write_text(json.dumps(body))
    assert run_agent(env, "verify", "--all").returncode == 0
    result = run_agent(with_key, "verify", "--all")
    assert result.returncode == 1 and "decrypted" in result.stderr
    other, _ = age_key(tmp_path / "other.txt")
    result = run_agent({**env, "DECRYPT_IDENTITY_FILE": str(other)}, "verify", "--all")
    assert result.returncode == 1 and "not a recipient" in result.stderr


def test_ssh_recipients_work_through_push_and_restore_from_s3(make_app, s3, tmp_path):
    app = make_app()
    make_realistic_tree(app.data_dir)
    before = snapshot(app.data_dir)
    ssh_private, ssh_public = ssh_key(tmp_path / "id_ed25519")
    _, age_public = age_key(tmp_path / "key.txt")
    recipients = tmp_path / "recipients.txt"
    recipients.write_text(f"# operators\n{ssh_public}\n{age_public}\n")
    env = push_env(
        app, tmp_path, s3, ENCRYPT_RECIPIENTS_FILE=str(recipients), DATA_FORMAT="archive"
    )

    assert run_agent(env, "source", "run").returncode == 0

    [gen] = os.listdir(tmp_path / "store" / "data")
    assert any(k.endswith(f"/data/{gen}/{ENCRYPTED}") for k in s3.keys(""))
    by_hand = subprocess.run(
        ["age", "-d", "-i", str(ssh_private), str(tmp_path / "store" / "data" / gen / ENCRYPTED)],
        check=True,
        capture_output=True,
    ).stdout
    assert by_hand.startswith(b"\x28\xb5\x2f\xfd")  # a zstd frame
    wipe(app.data_dir)
    result = run_agent(
        {**env, "DECRYPT_IDENTITY_FILE": str(ssh_private)}, "restore", "--from", "s3"
    )
    assert result.returncode == 0, result.stderr
    assert snapshot(app.data_dir) == before
    assert run_agent(env, "verify", "--all").returncode == 0


def test_encrypted_logs_and_data_are_pulled_and_verified_on_the_sink_with_its_key(
    make_app, site, tmp_path
):
    app = make_app()
    make_realistic_tree(app.data_dir)
    (app.logs_dir / "nested").mkdir()
    (app.logs_dir / "nested" / "audit.log").write_text("login\n")
    key, public = age_key(tmp_path / "key.txt")
    env = agent_env(
        app,
        site.handover,
        site.mail,
        SOURCE_STORE_DIR=str(site.source_store),
        ENCRYPT_RECIPIENTS=public,
        ENCRYPT_LOGS="true",
    )
    assert run_agent(env, "source", "backup").returncode == 0
    [gen] = site.waiting("logs")
    logs_dir = site.handover / "logs" / gen
    body = json.loads((logs_dir / "MANIFEST.json").read_text())
    assert body["files"] and all(
        f["path"].endswith(".age") and "plaintext_sha256" in f for f in body["files"]
    )
    for entry in body["files"]:
        plain = subprocess.run(
            ["age", "-d", "-i", str(key), str(logs_dir / entry["path"])],
            check=True,
            capture_output=True,
        ).stdout
        assert hashlib.sha256(plain).hexdigest() == entry["plaintext_sha256"]
        if entry["path"].endswith("nested/audit.log.age"):
            assert plain == b"login\n"
    stored_files = [p for p in logs_dir.rglob("*") if p.is_file()]
    assert all(p.name.endswith(".age") or p.name == "MANIFEST.json" for p in stored_files)

    data, logs = site.pull("data"), site.pull("logs")

    assert (data.returncode, logs.returncode) == (0, 0), data.stderr + logs.stderr
    assert site.stored("data") == site.stored("logs") == [gen]
    with_key = {**site.env, "DECRYPT_IDENTITY_FILE": str(key)}
    assert run_agent(site.env, "verify", "--all").returncode == 0
    result = run_agent(with_key, "verify", "--all")
    assert result.returncode == 0, result.stderr
    wipe(app.data_dir)
    restored = run_agent(
        {**env, "DECRYPT_IDENTITY_FILE": str(key)}, "restore", "--from", str(site.sink_store)
    )
    assert restored.returncode == 0, restored.stderr
