"""Step 1 against a real Docker engine, real containers and named volumes."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import NEVER_READY, WAIT, agent_env, run_agent
from tests.trees import extract, snapshot

pytestmark = pytest.mark.docker


def make_tree(root: Path) -> None:
    """A tree with what an archive must keep: modes, owners, mtimes, links, odd names."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "dir" / "a.txt").write_text("alpha\n" * 1000)
    (root / "dir" / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    os.chmod(root / "dir" / "a.txt", 0o640)
    os.chown(root / "dir" / "a.txt", 1234, 5678)
    os.link(root / "dir" / "a.txt", root / "hardlink")
    os.symlink("dir/a.txt", root / "symlink")
    os.symlink("/nonexistent/target", root / "dangling")
    (root / "name with spaces").write_text("s")
    (root / "new\nline").write_text("n")
    with open(os.path.join(os.fsencode(root), b"bad-\xff-utf8"), "wb") as handle:
        handle.write(b"invalid utf-8 name")
    os.utime(root / "dir" / "sub" / "b.bin", ns=(1_700_000_000_123_456_789,) * 2)


def test_backup_round_trips_data_and_logs_and_restarts_the_app(make_app, tmp_path):
    app = make_app()
    make_tree(app.data_dir)
    before = snapshot(app.data_dir)
    started_before = app.started_at()

    result = run_agent(agent_env(app, tmp_path / "handover"), "source", "backup")

    assert result.returncode == 0, result.stderr
    assert app.reload() == "running"
    assert app.started_at() != started_before, "the application was not stopped during the copy"
    [gen_dir] = (tmp_path / "handover" / "data").iterdir()
    manifest = json.loads((gen_dir / "MANIFEST.json").read_text())
    assert manifest["kind"] == "data" and manifest["generation"] == gen_dir.name
    assert manifest["downtime_seconds"] > 0
    extract(gen_dir / "data.tar.zst", tmp_path / "restored")
    assert snapshot(tmp_path / "restored" / str(app.data_dir).lstrip("/")) == before

    [logs_dir] = (tmp_path / "handover" / "logs").iterdir()
    assert logs_dir.name == gen_dir.name
    logs_manifest = json.loads((logs_dir / "MANIFEST.json").read_text())
    [entry] = logs_manifest["files"]
    assert entry["path"] == str(app.logs_dir / "app.log").lstrip("/")
    assert (logs_dir / entry["path"]).stat().st_size == entry["size"] > 0
    assert not (tmp_path / "handover" / ".staging").exists()


def archive_member(gen_dir: Path, tmp_path: Path, app_dir: Path, name: str) -> bytes:
    extract(gen_dir / "data.tar.zst", tmp_path / "x")
    return (tmp_path / "x" / str(app_dir).lstrip("/") / name).read_bytes()


def only_generation(handover: Path, kind: str = "data") -> Path:
    [gen_dir] = (handover / kind).iterdir()
    return gen_dir


# On SIGTERM this application rewrites a file with the same size and an mtime in the same
# second as before — the write a second-resolution comparison would miss.
FLUSH_ON_STOP = f"""
trap 'printf AFTER-STOP-CONTENT > /data/file; touch -d @1700000000.5 /data/file; exit 0' TERM
{NEVER_READY}
while true; do {WAIT}; done
"""


def test_a_same_size_same_second_rewrite_after_the_bulk_pass_is_in_the_generation(
    make_app, tmp_path
):
    app = make_app(FLUSH_ON_STOP)
    (app.data_dir / "file").write_bytes(b"BEFORE-STOPCONTENT")
    os.utime(app.data_dir / "file", ns=(1_700_000_000_000_000_000,) * 2)

    result = run_agent(agent_env(app, tmp_path / "handover"), "source", "backup")

    assert result.returncode == 0, result.stderr
    gen_dir = only_generation(tmp_path / "handover")
    assert archive_member(gen_dir, tmp_path, app.data_dir, "file") == b"AFTER-STOP-CONTENT"


def test_pause_mode_pauses_instead_of_stopping(make_app, tmp_path, docker_client):
    app = make_app()
    started_before = app.started_at()
    since = int(time.time()) - 1
    result = run_agent(
        agent_env(app, tmp_path / "handover", QUIESCE_MODE="pause"), "source", "backup"
    )
    until = int(time.time()) + 1

    assert result.returncode == 0, result.stderr
    assert app.reload() == "running" and app.started_at() == started_before
    events = docker_client.events(
        since=since, until=until, decode=True, filters={"container": app.container.id}
    )
    actions = [e["Action"] for e in events if e.get("Type") == "container"]
    quiescing = [a for a in actions if a in ("pause", "unpause", "kill", "stop", "die")]
    assert quiescing == ["pause", "unpause"]
    assert only_generation(tmp_path / "handover")


def test_pre_command_output_is_collected_and_post_command_runs_after_the_restart(
    make_app, tmp_path
):
    app = make_app(
        extra_labels={
            "backup.pre-command": "echo 'dump of the database' > /data/dump.sql",
            "backup.post-command": "rm /data/dump.sql",
        }
    )

    result = run_agent(agent_env(app, tmp_path / "handover"), "source", "backup")

    assert result.returncode == 0, result.stderr
    gen_dir = only_generation(tmp_path / "handover")
    assert archive_member(gen_dir, tmp_path, app.data_dir, "dump.sql") == b"dump of the database\n"
    assert not (app.data_dir / "dump.sql").exists()


def test_a_generation_left_in_the_handover_is_alerted_and_kept(make_app, tmp_path, smtp_server):
    app = make_app()
    env = agent_env(app, tmp_path / "handover", smtp_server)
    assert run_agent(env, "source", "backup").returncode == 0
    first = only_generation(tmp_path / "handover").name
    assert smtp_server.messages == []

    result = run_agent(env, "source", "backup")

    assert result.returncode == 0, result.stderr
    [mail] = smtp_server.wait_for(1)
    # a warning from a run that goes on and succeeds: its subject does not say "failed"
    assert mail["Subject"] == (
        "[backup-agent] test-source: source backup: generations from "
        "an earlier run still wait in the handover"
    )
    assert "previous transport failed" in mail.get_content()
    assert f"data/{first}" in mail.get_content()
    generations = sorted(p.name for p in (tmp_path / "handover" / "data").iterdir())
    assert len(generations) == 2 and generations[0] == first


def test_the_waiting_count_alert_counts_data_and_logs_each_on_its_own(
    make_app, tmp_path, smtp_server
):
    app = make_app()
    env = agent_env(
        app,
        tmp_path / "handover",
        smtp_server,
        HANDOVER_ALERT_AGE_HOURS="100",
        HANDOVER_ALERT_COUNT="2",
    )
    for _ in range(3):  # two pulls missed: two generations of each kind wait, not too many
        assert run_agent(env, "source", "backup").returncode == 0
    assert len(only_generations(tmp_path / "handover", "logs")) == 3
    assert smtp_server.messages == []

    assert run_agent(env, "source", "backup").returncode == 0  # the third missed pull

    [mail] = smtp_server.wait_for(1)
    assert "3 data and 3 logs generations from earlier runs" in mail.get_content()


def only_generations(handover: Path, kind: str) -> list[str]:
    return sorted(p.name for p in (handover / kind).iterdir())


def test_only_the_configured_compose_project_is_stopped(make_app, tmp_path):
    shop = make_app(extra_labels={"com.docker.compose.project": "shop"})
    other = make_app(
        stop_label=False, extra_labels={shop.label: "true", "com.docker.compose.project": "other"}
    )
    shop_before, other_before = shop.started_at(), other.started_at()

    result = run_agent(
        agent_env(shop, tmp_path / "handover", COMPOSE_PROJECT="shop"), "source", "backup"
    )

    assert result.returncode == 0, result.stderr
    assert shop.started_at() != shop_before
    assert other.started_at() == other_before and other.reload() == "running"


def test_direct_mode_archives_while_stopped_without_a_mirror(make_app, tmp_path):
    app = make_app()
    make_tree(app.data_dir)
    before = snapshot(app.data_dir)

    result = run_agent(
        agent_env(app, tmp_path / "handover", COLLECT_MODE="direct"), "source", "backup"
    )

    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "handover" / ".mirror").exists()
    extract(only_generation(tmp_path / "handover") / "data.tar.zst", tmp_path / "restored")
    assert snapshot(tmp_path / "restored" / str(app.data_dir).lstrip("/")) == before
    assert app.reload() == "running"


def test_a_foreign_containers_commands_never_run(make_app, tmp_path):
    """Only containers this run selects (or that name this agent) get pre- and post-commands:
    another stack's container with the same labels is left alone, even with a failing one."""
    app = make_app()
    foreign = make_app(
        stop_label=False,
        extra_labels={
            "backup.pre-command": "touch /data/pre-ran; exit 3",
            "backup.post-command": "touch /data/post-ran",
        },
    )

    result = run_agent(agent_env(app, tmp_path / "handover"), "source", "backup")

    assert result.returncode == 0, result.stderr
    assert not (foreign.data_dir / "pre-ran").exists()
    assert not (foreign.data_dir / "post-ran").exists()
    assert foreign.reload() == "running"


def test_commands_run_in_a_container_that_names_this_agent_without_being_stopped(
    make_app, tmp_path
):
    app = make_app()
    # A source id of its own: every agent of the other tests is `test-source`, and would run
    # this container's command too (tests run in parallel).
    source_id = f"named-{uuid.uuid4().hex[:8]}"
    database = make_app(
        stop_label=False,
        extra_labels={
            "backup.agent": source_id,
            "backup.pre-command": "echo dumped > /data/dump.sql",
        },
    )
    started_before = database.started_at()

    result = run_agent(
        agent_env(app, tmp_path / "handover", SOURCE_ID=source_id), "source", "backup"
    )

    assert result.returncode == 0, result.stderr
    assert (database.data_dir / "dump.sql").read_text() == "dumped\n"
    assert database.started_at() == started_before


def test_a_pre_stop_command_runs_after_the_pre_copy_and_what_it_writes_is_collected(
    make_app, tmp_path
):
    app = make_app(
        extra_labels={
            "backup.pre-command": "echo before-the-bulk-pass > /data/order",
            "backup.pre-stop-command": "echo right-before-the-stop >> /data/order",
        }
    )
    started_before = app.started_at()

    result = run_agent(agent_env(app, tmp_path / "handover"), "source", "backup")

    assert result.returncode == 0, result.stderr
    assert app.started_at() != started_before
    gen_dir = only_generation(tmp_path / "handover")
    assert (
        archive_member(gen_dir, tmp_path, app.data_dir, "order")
        == b"before-the-bulk-pass\nright-before-the-stop\n"
    )
    assert result.stderr.index("pre-copy done") < result.stderr.index("pre-stop-command in")


def test_a_failing_pre_stop_command_aborts_the_backup_before_anything_is_stopped(
    make_app, tmp_path
):
    app = make_app(extra_labels={"backup.pre-stop-command": "exit 4"})
    started_before = app.started_at()

    result = run_agent(agent_env(app, tmp_path / "handover"), "source", "backup")

    assert result.returncode == 1
    assert "pre-stop commands" in result.stderr and "exited with 4" in result.stderr
    assert app.started_at() == started_before and app.reload() == "running"
    assert not (tmp_path / "handover" / "data").exists() or not any(
        (tmp_path / "handover" / "data").iterdir()
    )
