"""Out of space, on real small filesystems (tmpfs): a failed run removes what it wrote, so the
filesystem is not left full, and its alert says how much space is free."""

from __future__ import annotations

import os
import shutil

import pytest

from agent.core import manifest
from tests.conftest import run_agent
from tests.generations import make_generation
from tests.integration.test_failures import STEP_BULK, env_for, the_alert

pytestmark = pytest.mark.docker

MiB = 1 << 20
GEN = "2026-11-01T00-00-00Z"


def free_space_line(body: str) -> str:
    [line] = [line for line in body.splitlines() if line.startswith("Free space: ")]
    return line


def test_a_bulk_pass_that_fills_the_handover_leaves_no_partial_mirror(
    make_app, make_tmpfs, smtp_server
):
    app = make_app()
    (app.data_dir / "big.bin").write_bytes(os.urandom(6 * MiB))
    handover = make_tmpfs("handover", "4m")
    started_before = app.started_at()

    result = run_agent(env_for(app, handover, smtp_server), "source", "backup")

    assert result.returncode == 1, result.stderr
    assert app.reload() == "running" and app.started_at() == started_before
    subject, body = the_alert(smtp_server)
    assert subject.endswith(f"failed at {STEP_BULK}")
    assert "No space left on device" in body
    assert not (handover / ".mirror" / "data").exists()
    assert not (handover / ".staging").exists()
    assert shutil.disk_usage(handover).free > 3.9 * MiB, "the partial copy still takes space"
    assert f"handover {handover}: 4.0 MiB free of 4.0 MiB" in free_space_line(body)
    [error] = [line for line in body.splitlines() if line.startswith("Error: ")]
    assert str(handover / ".mirror" / "data") in error.partition("; the partial mirror")[2]

    (app.data_dir / "big.bin").unlink()
    again = run_agent(env_for(app, handover), "source", "backup")

    assert again.returncode == 0, again.stderr
    assert len(os.listdir(handover / "data")) == 1


def test_a_failed_copy_into_the_source_store_leaves_no_partial_copy(
    tmp_path, make_tmpfs, s3, smtp_server
):
    store = make_tmpfs("store", "1m")  # another filesystem: 2.c copies, verifies, deletes
    handover = tmp_path / "handover"
    make_generation(handover, GEN, size=2 * MiB)
    data = tmp_path / "app-data"
    data.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "SOURCE_ID": "test-source",
        "DATA_PATHS": str(data),
        "HANDOVER_DIR": str(handover),
        "SOURCE_STORE_DIR": str(store),
        "SMTP_HOST": smtp_server.host,
        "SMTP_PORT": str(smtp_server.port),
        "SMTP_SECURITY": "none",
        "ALERT_TO": "ops@example.org",
        **s3.env(),
    }

    result = run_agent(env, "source", "push")

    assert result.returncode == 1, result.stderr
    subject, body = the_alert(smtp_server)
    assert subject.endswith(f"failed at 2.c move {GEN} to the source store")
    assert "No space left on device" in body
    assert os.listdir(store / ".incoming") == []
    assert shutil.disk_usage(store).free > 0.9 * MiB, "the partial copy still takes space"
    assert f"source store {store}: 1.0 MiB free of 1.0 MiB" in free_space_line(body)
    assert (handover / "data" / GEN / manifest.NAME).exists(), "the handover keeps its copy"
