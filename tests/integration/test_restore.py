"""Restore drills, verify and list against the real components: a Docker application with named
volumes, SeaweedFS for the push transport, sshd + rsync for the pull transport, aiosmtpd."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import S3_BUCKET, S3_PREFIX, agent_env, run_agent, start_agent, wait_until
from tests.integration.test_pull import site  # noqa: F401 - the pull-mode site fixture
from tests.trees import snapshot

pytestmark = pytest.mark.docker

MiB = 1 << 20


def make_realistic_tree(root: Path) -> None:
    """What a restore must bring back exactly: modes, numeric owners, nanosecond mtimes,
    symlinks, hardlinks, empty directories, a large sparse file, odd names."""
    (root / "db" / "base").mkdir(parents=True)
    (root / "empty" / "nested-empty").mkdir(parents=True)
    (root / "db" / "base" / "16384").write_bytes(os.urandom(2 * MiB))
    (root / "db" / "PG_VERSION").write_text("16\n")
    os.chmod(root / "db" / "PG_VERSION", 0o600)
    os.chown(root / "db" / "PG_VERSION", 999, 999)
    os.chown(root / "db", 999, 999)
    os.chmod(root / "db", 0o700)
    (root / "uploads").mkdir()
    (root / "uploads" / "photo one.jpg").write_bytes(os.urandom(100_000))
    (root / "uploads" / "line\nbreak.txt").write_text("newline in the name")
    with open(os.path.join(os.fsencode(root / "uploads"), b"latin-\xe9t\xe9.txt"), "wb") as h:
        h.write(b"not utf-8")
    os.link(root / "uploads" / "photo one.jpg", root / "uploads" / "photo-hardlink.jpg")
    os.symlink("photo one.jpg", root / "uploads" / "latest.jpg")
    os.symlink(str(root / "db" / "PG_VERSION"), root / "version-link")
    with open(root / "sparse.img", "wb") as handle:
        handle.truncate(256 * MiB)
        handle.seek(100 * MiB)
        handle.write(b"middle")
        handle.seek(256 * MiB - 3)
        handle.write(b"end")
    long_dir = root / ("d" * 60) / ("e" * 80)  # names longer than a tar header holds
    long_dir.mkdir(parents=True)
    with open(long_dir / ("f" * 90 + ".img"), "wb") as handle:
        handle.truncate(8 * MiB)
        handle.write(b"start")
    os.chmod(root / "uploads" / "photo one.jpg", 0o4755)
    os.utime(root / "uploads" / "photo one.jpg", ns=(1_600_000_000_123_456_789,) * 2)
    os.utime(root / "db" / "base", ns=(1_500_000_000_987_654_321,) * 2)


def wipe(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def push_env(app, tmp_path: Path, s3, mail=None, **extra: str) -> dict[str, str]:
    return {**agent_env(app, tmp_path / "handover", mail, **extra), **s3.env()}


@pytest.mark.parametrize("data_format", ["chunks", "archive"])
def test_restore_drill_from_s3_brings_back_the_exact_tree_and_the_app_runs(
    make_app, s3, smtp_server, tmp_path, data_format
):
    app = make_app()
    make_realistic_tree(app.data_dir)
    before = snapshot(app.data_dir)
    env = push_env(app, tmp_path, s3, smtp_server, DATA_FORMAT=data_format)
    assert run_agent(env, "source", "run").returncode == 0
    [gen] = os.listdir(tmp_path / "store" / "data")
    shutil.rmtree(tmp_path / "store")  # the source store is lost with the host
    wipe(app.data_dir)
    (app.data_dir / "written-after-the-backup").write_text("goes away")

    result = run_agent(env, "restore", "--from", "s3")

    assert result.returncode == 0, result.stderr
    assert (
        f"restored data generation {gen} from s3://{S3_BUCKET}/{S3_PREFIX}/test-source"
        in result.stdout
    )
    assert snapshot(app.data_dir) == before
    assert os.stat(app.data_dir / "sparse.img").st_blocks * 512 < 10 * MiB, "sparse file filled"
    assert app.reload() == "running"
    assert not any(p.name.startswith(".backup-agent") for p in app.data_dir.iterdir())
    assert smtp_server.messages == []


def test_restore_drill_from_a_pull_mode_sink_store(make_app, site, tmp_path):
    app = make_app()
    make_realistic_tree(app.data_dir)
    before = snapshot(app.data_dir)
    env = agent_env(
        app, site.handover, site.mail, SOURCE_STORE_DIR=str(site.source_store), LOG_PATHS=""
    )
    assert run_agent(env, "source", "backup").returncode == 0
    assert site.pull("data").returncode == 0
    [gen] = site.stored("data")
    assert site.in_source_store() == [gen]
    shutil.rmtree(site.source_store / "data")
    wipe(app.data_dir)
    started = app.started_at()

    result = run_agent(env, "restore", "--from", str(site.sink_store))

    assert result.returncode == 0, result.stderr
    assert snapshot(app.data_dir) == before
    assert app.reload() == "running" and app.started_at() != started
    assert site.mail.messages == []


def test_restore_without_options_takes_the_newest_generation_of_the_source_store(
    make_app, tmp_path
):
    app = make_app()
    (app.data_dir / "file").write_text("first")
    env = agent_env(app, tmp_path / "handover")
    assert run_agent(env, "source", "backup").returncode == 0
    time.sleep(1.1)
    (app.data_dir / "file").write_text("second")
    assert run_agent(env, "source", "backup").returncode == 0
    store = tmp_path / "store"
    for gen_dir in sorted((tmp_path / "handover" / "data").iterdir()):  # as the push's 2.c does
        (store / "data").mkdir(parents=True, exist_ok=True)
        gen_dir.rename(store / "data" / gen_dir.name)
    oldest = sorted(os.listdir(store / "data"))[0]
    (app.data_dir / "file").write_text("damaged")

    assert run_agent(env, "restore").returncode == 0
    assert (app.data_dir / "file").read_text() == "second"

    kept = run_agent(env, "restore", "--generation", oldest, "--keep-previous")
    assert kept.returncode == 0, kept.stderr
    assert (app.data_dir / "file").read_text() == "first"
    [previous] = (tmp_path / "handover" / ".replaced").iterdir()
    assert (previous / str(app.data_dir).lstrip("/") / "file").read_text() == "second"


def test_dry_run_changes_nothing_and_leaves_the_app_running(make_app, tmp_path):
    app = make_app()
    (app.data_dir / "file").write_text("kept")
    env = agent_env(app, tmp_path / "handover")
    assert run_agent(env, "source", "backup").returncode == 0
    (app.data_dir / "file").write_text("current")
    before = snapshot(app.data_dir)
    started = app.started_at()

    result = run_agent(env, "restore", "--from", "handover", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "would restore data generation" in result.stdout
    assert app.container.name in result.stdout
    assert "nothing was changed" in result.stdout
    assert snapshot(app.data_dir) == before
    assert app.started_at() == started


def test_restore_into_a_target_directory_leaves_the_app_alone(make_app, tmp_path):
    app = make_app()
    make_realistic_tree(app.data_dir)
    before = snapshot(app.data_dir)
    env = agent_env(app, tmp_path / "handover")
    assert run_agent(env, "source", "backup").returncode == 0
    started = app.started_at()

    result = run_agent(env, "restore", "--from", "handover", "--target", str(tmp_path / "out"))

    assert result.returncode == 0, result.stderr
    assert snapshot(tmp_path / "out" / str(app.data_dir).lstrip("/")) == before
    assert app.started_at() == started
    again = run_agent(env, "restore", "--from", "handover", "--target", str(tmp_path / "out"))
    assert again.returncode == 2
    assert "not an empty directory" in again.stderr


def test_an_unknown_generation_is_refused_with_exit_2_and_nothing_touched(make_app, tmp_path):
    app = make_app()
    env = agent_env(app, tmp_path / "handover")
    started = app.started_at()

    missing = run_agent(env, "restore", "--generation", "2020-01-01T00-00-00Z")
    malformed = run_agent(env, "restore", "--generation", "../../etc")

    assert missing.returncode == malformed.returncode == 2
    assert "holds no complete data generation 2020-01-01T00-00-00Z" in missing.stderr
    assert "is not a generation id" in malformed.stderr
    assert "Traceback" not in missing.stderr + malformed.stderr
    assert app.started_at() == started


def test_a_failing_swap_puts_the_previous_contents_back_and_starts_the_app(
    make_app, smtp_server, tmp_path
):
    app = make_app()
    (app.data_dir / "file").write_text("from the backup")
    env = agent_env(app, tmp_path / "handover", smtp_server)
    assert run_agent(env, "source", "backup").returncode == 0
    (app.data_dir / "file").write_text("current")
    (app.data_dir / "zz-mounted").mkdir()
    (app.data_dir / "zz-mounted" / "inside").write_text("on a tmpfs")
    before = snapshot(app.data_dir)
    # A mount point inside the data path cannot be renamed away: the swap fails (EBUSY).
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(app.data_dir / "zz-mounted")], check=True)
    try:
        (app.data_dir / "zz-mounted" / "inside").write_text("on a tmpfs")
        result = run_agent(env, "restore", "--from", "handover")
        assert result.returncode == 1
        assert "replace the contents of the data paths" in result.stderr
        assert (app.data_dir / "file").read_text() == "current"
    finally:
        subprocess.run(["umount", str(app.data_dir / "zz-mounted")], check=True)
    assert snapshot(app.data_dir) == before
    assert app.reload() == "running"
    assert not any(p.name.startswith(".backup-agent") for p in app.data_dir.iterdir())
    [mail] = smtp_server.wait_for(1)
    assert "replace the contents of the data paths" in mail["Subject"]


def test_a_restore_killed_during_the_swap_is_rolled_back_by_the_next_run(make_app, tmp_path):
    app = make_app()
    for index in range(20_000):  # enough entries for the swap to take a while
        (app.data_dir / f"f{index:05d}").write_text("backup")
    env = agent_env(app, tmp_path / "handover", LOG_PATHS="")
    assert run_agent(env, "source", "backup", timeout=300).returncode == 0
    for index in range(20_000):
        (app.data_dir / f"f{index:05d}").write_text("current")
    before = snapshot(app.data_dir)
    record = tmp_path / "handover" / ".state" / "restore.json"

    process = start_agent(env, "restore", "--from", "handover")
    wait_until(
        lambda: record.exists() and "moving" in record.read_text(), timeout=120, interval=0.001
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert app.reload() != "running"  # stopped by the killed run

    result = run_agent(env, "source", "backup", timeout=300)

    assert result.returncode == 0, result.stderr
    assert "rolling it back" in result.stderr
    assert app.reload() == "running"
    assert snapshot(app.data_dir) == before
    assert not record.exists()


def test_sigterm_during_the_unpack_leaves_everything_as_it_was(make_app, tmp_path):
    app = make_app()
    with open(app.data_dir / "big", "wb") as handle:
        for _ in range(64):
            handle.write(os.urandom(4 * MiB))
    env = agent_env(app, tmp_path / "handover", LOG_PATHS="")
    assert run_agent(env, "source", "backup", timeout=300).returncode == 0
    (app.data_dir / "big").write_text("current")
    before = snapshot(app.data_dir)
    started = app.started_at()

    process = start_agent(env, "restore", "--from", "handover")
    wait_until(lambda: (app.data_dir / ".backup-agent-restore").exists(), interval=0.001)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)

    assert process.returncode == 128 + signal.SIGTERM
    assert snapshot(app.data_dir) == before
    assert app.started_at() == started


# ---------------------------------------------------------------- verify and list


def test_verify_finds_a_changed_or_missing_file_and_alerts(make_app, s3, smtp_server, tmp_path):
    app = make_app()
    (app.data_dir / "file").write_text("data")
    env = push_env(app, tmp_path, s3, smtp_server, PUSH_LOGS="true", DATA_FORMAT="archive")
    assert run_agent(env, "source", "run").returncode == 0
    assert run_agent(env, "verify", "--all").returncode == 0
    [gen] = os.listdir(tmp_path / "store" / "data")

    archive = tmp_path / "store" / "data" / gen / "data.tar.zst"
    damaged = bytearray(archive.read_bytes())
    damaged[100] ^= 0xFF
    archive.write_bytes(bytes(damaged))
    s3.client().delete_object(
        Bucket=S3_BUCKET,
        Key=f"{S3_PREFIX}/test-source/logs/{gen}/{str(app.logs_dir / 'app.log').lstrip('/')}",
    )
    result = run_agent(env, "verify", "--latest")

    assert result.returncode == 1
    assert "data.tar.zst" in result.stderr and "app.log is missing" in result.stderr
    [mail] = smtp_server.wait_for(1)
    body = mail.get_content()
    assert "source store" in body and "data.tar.zst" in body
    assert f"logs/{gen}" in body and "missing" in body


def test_list_shows_every_store_and_when_each_generation_was_verified(make_app, s3, tmp_path):
    app = make_app()
    (app.data_dir / "file").write_text("data")
    env = push_env(app, tmp_path, s3, LOG_PATHS="")
    assert run_agent(env, "source", "run").returncode == 0
    assert run_agent(env, "source", "backup").returncode == 0  # one waits in the handover
    (tmp_path / "handover" / "data" / "2026-01-01T00-00-00Z").mkdir()  # an incomplete one

    rows = json.loads(run_agent(env, "list", "--json").stdout)
    table = run_agent(env, "list")

    by_store = {(r["store"], r["generation"]): r for r in rows}
    pushed = [r for r in rows if r["store"] == "sink store"]
    assert len(pushed) == 1 and pushed[0]["complete"] and pushed[0]["last_verified"]
    gen = pushed[0]["generation"]
    assert by_store[("source store", gen)]["size"] == pushed[0]["size"] > 0
    assert not by_store[("handover", "2026-01-01T00-00-00Z")]["complete"]
    waiting = [r for r in rows if r["store"] == "handover" and r["complete"]]
    assert len(waiting) == 1 and waiting[0]["last_verified"] == ""
    assert table.returncode == 0 and "never" in table.stdout and gen in table.stdout


def test_verify_on_the_sink_checks_its_store_for_every_source(site):
    from tests.generations import make_generation
    from tests.sshd import share_tree

    make_generation(site.handover, "2026-11-01T02-00-00Z", size=100_000)
    share_tree(site.handover)
    assert site.pull("data").returncode == 0
    assert run_agent(site.env, "verify").returncode == 0
    stored = site.sink_store / "test-source" / "data" / "2026-11-01T02-00-00Z" / "data.tar.zst"
    stored.write_bytes(b"changed")

    result = run_agent(site.env, "verify")

    assert result.returncode == 1
    assert "data.tar.zst: 7 bytes" in result.stderr
    [mail] = site.mail.wait_for(1)
    assert "verify" in mail["Subject"]
