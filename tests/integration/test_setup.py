"""tools/setup.sh, the set-up step of `make demo` and `make test`: quiet when everything is
there, and one clear line (no trace) with exit 1 when it cannot do its work."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

SETUP = ROOT / "tools" / "setup.sh"


def setup(
    env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, "bash", str(SETUP)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_set_up_is_quiet_when_everything_is_there():
    setup()  # whatever this machine still lacked
    again = setup()
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""


def test_set_up_as_another_user_than_root_is_one_line():
    result = setup(prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    assert result.returncode == 1
    assert result.stderr == (
        "setup: must run as root: it installs Debian packages and starts "
        "dockerd (run it with sudo)\n"
    )


def test_set_up_on_a_host_without_apt_is_one_line(tmp_path: Path):
    for tool in ("bash", "id", "dirname"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    result = setup(env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.startswith("setup: no apt-get: this set-up is for Debian hosts")
    assert result.stderr.count("\n") == 1


def test_a_docker_engine_that_does_not_answer_is_one_line(tmp_path: Path):
    result = setup(env={"DOCKER_HOST": f"unix://{tmp_path}/docker.sock"})
    assert result.returncode == 1
    assert result.stderr == (
        f"setup: the Docker engine at DOCKER_HOST=unix://{tmp_path}/"
        "docker.sock does not answer: start it, or unset DOCKER_HOST to "
        "use (and start) the local one\n"
    )
