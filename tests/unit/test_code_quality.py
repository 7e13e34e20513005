"""The code-quality gates, run with the tests (CI runs only `make test`): ruff's lint and format
checks over the code, tests, tools and benchmarks, and mypy --strict over the agent, as
configured in pyproject.toml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("agent", "tests", "tools", "bench")


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def tool(name: str) -> list[str]:
    """The tool's command (as a module of this Python: its script may not be on PATH); the
    `test` extra installs it (tools/setup.sh)."""
    if importlib.util.find_spec(name) is None:
        pytest.fail(f"{name} is not installed; install the test extra: pip install -e '.[test]'")
    return [sys.executable, "-m", name]


def test_ruff_finds_nothing():
    result = run(*tool("ruff"), "check", "--no-cache", *CHECKED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted():
    result = run(*tool("ruff"), "format", "--check", "--no-cache", *CHECKED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing_in_the_agent():
    result = run(*tool("mypy"), "--no-incremental", "--cache-dir", "/dev/null")
    assert result.returncode == 0, result.stdout + result.stderr
