"""`backup-agent cron` and `health` as a container runs them: a real application, real
schedules (a sixth cron field gives seconds), real signals."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.conftest import agent_env, run_agent, start_agent, wait_until

pytestmark = pytest.mark.docker

# A pre-command that makes each backup take a while, so ticks pass while it runs.
SLOW = {"backup.pre-command": "sleep 2.5"}


def test_cron_runs_the_schedule_and_skips_ticks_of_a_job_still_running(make_app, tmp_path):
    app = make_app(extra_labels=SLOW)
    (app.data_dir / "file").write_text("data")
    env = agent_env(app, tmp_path / "handover", CRON_BACKUP="* * * * * *")

    process = start_agent(env, "cron")
    wait_until(
        lambda: (
            len(list((tmp_path / "handover" / "data").glob("*"))) >= 2
            if (tmp_path / "handover" / "data").exists()
            else False
        ),
        timeout=60,
    )
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    assert "cron: backup started" in stdout  # the log goes to standard output
    assert "skipped" in stdout and "tick(s) of backup while it was still running" in stdout
    assert app.reload() == "running"
    status = json.loads((tmp_path / "handover" / ".state" / "cron.json").read_text())
    assert status["jobs"]["backup"]["last_success"]
    health = run_agent(env, "health")
    assert health.returncode == 0, health.stdout
    assert health.stdout.startswith("healthy: backup last succeeded")


def test_sigterm_during_a_scheduled_backup_starts_the_app_again_and_exits_cleanly(
    make_app, tmp_path
):
    app = make_app(extra_labels=SLOW)
    env = agent_env(app, tmp_path / "handover", CRON_BACKUP="0 0 1 1 *", CRON_AT_START="backup")
    record = tmp_path / "handover" / ".state" / "quiesced.json"

    process = start_agent(env, "cron")
    wait_until(lambda: record.exists() or process.poll() is not None, timeout=60, interval=0.005)
    assert app.reload() != "running" or record.exists()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stdout + stderr
    assert "cron: backup ended with exit code 143" in stdout and "cron: stopped" in stdout
    assert app.reload() == "running"
    assert not record.exists()


def test_health_reports_a_failed_last_run(make_app, tmp_path):
    app = make_app(extra_labels={"backup.pre-command": "exit 7"})
    env = agent_env(app, tmp_path / "handover", CRON_BACKUP="0 0 1 1 *", CRON_AT_START="backup")
    assert run_agent(env, "health").returncode == 1  # no status yet: cron never ran

    process = start_agent(env, "cron")
    status = tmp_path / "handover" / ".state" / "cron.json"
    wait_until(lambda: status.exists() and "backup" in status.read_text(), timeout=60)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)

    health = run_agent(env, "health")
    assert health.returncode == 1
    assert "unhealthy: backup: the last run" in health.stdout
    assert "failed with exit code 1" in health.stdout


def test_a_bad_schedule_stops_cron_at_start_with_exit_2(make_app, tmp_path):
    app = make_app()
    started = app.started_at()
    env = agent_env(app, tmp_path / "handover", CRON_RUN="every night", STOP_TIMEOUT="-3")

    begun = time.monotonic()
    result = run_agent(env, "cron")

    assert result.returncode == 2
    assert time.monotonic() - begun < 30
    assert "CRON_RUN: 'every night' is not allowed" in result.stderr
    assert "STOP_TIMEOUT" in result.stderr  # every problem at once
    assert "Traceback" not in result.stderr
    assert app.started_at() == started
