"""Start-up validation as a user meets it: the real command, the real environment and real
directories. One run names every problem, and nothing is created before the configuration is
valid."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import run_agent


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "SOURCE_ID": "test-source",
        "DATA_PATHS": str(tmp_path / "no-such-volume"),
        "HANDOVER_DIR": str(tmp_path / "handover"),
        "SOURCE_STORE_DIR": str(tmp_path / "store"),
    }
    env.update(extra)
    return env


def problems(stderr: str) -> set[str]:
    """The setting each listed problem names."""
    return {line.strip().split(":")[0] for line in stderr.splitlines() if line.startswith("  ")}


def test_one_run_names_secret_file_value_and_path_problems_together(tmp_path):
    env = base_env(
        tmp_path,
        SMTP_PASSWORD_FILE=str(tmp_path / "missing-secret"),
        QUIESCE_MODE="freeze",
        ALERT_TO="not-an-address",
        SMTP_HOST="mail",
        S3_CA_BUNDLE=str(tmp_path / "missing-ca.pem"),
    )

    result = run_agent(env, "source", "backup")

    assert result.returncode == 2, result.stderr
    assert problems(result.stderr) == {
        "SMTP_PASSWORD_FILE",
        "QUIESCE_MODE",
        "ALERT_TO",
        "DATA_PATHS",
        "S3_CA_BUNDLE",
    }, result.stderr
    assert f"cannot read '{tmp_path / 'missing-secret'}'" in result.stderr
    assert f"{tmp_path / 'no-such-volume'} is not a directory" in result.stderr


def test_an_invalid_configuration_creates_no_directory(tmp_path):
    result = run_agent(
        base_env(tmp_path, HANDOVER_DIR=str(tmp_path / "deep" / "handover")), "source", "backup"
    )

    assert result.returncode == 2, result.stderr
    assert problems(result.stderr) == {"DATA_PATHS"}, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_handover_that_cannot_be_created_is_named_with_the_other_problems(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    result = run_agent(
        base_env(tmp_path, HANDOVER_DIR=str(blocker / "handover"), STOP_TIMEOUT="-1"),
        "source",
        "backup",
    )

    assert result.returncode == 2, result.stderr
    assert problems(result.stderr) == {"HANDOVER_DIR", "STOP_TIMEOUT", "DATA_PATHS"}
    assert f"HANDOVER_DIR: {blocker / 'handover'} is not a writable directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_valid_configuration_runs_and_creates_its_directories(tmp_path):
    (tmp_path / "no-such-volume").mkdir()

    result = run_agent(
        base_env(tmp_path, QUIESCE_MODE="signal", SIGNAL_PROCESSES="^no-such-process-anywhere$"),
        "source",
        "backup",
    )

    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "handover" / "data").iterdir())) == 1


def test_the_sink_names_value_and_path_problems_together_and_creates_nothing(tmp_path):
    env = {
        "PATH": os.environ["PATH"],
        "SINK_SOURCES": "shop=host:99999",
        "SINK_STORE_DIR": str(tmp_path / "sink"),
        "SINK_SSH_KEY": str(tmp_path / "missing-key"),
        "SINK_KNOWN_HOSTS_FILE": str(tmp_path / "missing-known-hosts-secret"),
    }

    result = run_agent(env, "sink", "pull-data")

    assert result.returncode == 2, result.stderr
    assert problems(result.stderr) == {
        "SINK_SOURCES",
        "SINK_KNOWN_HOSTS_FILE",
        "SINK_SSH_KEY",
        "SINK_SSH_CERT",
    }, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
