"""The documented set-ups, followed literally: the shell blocks of a page under docs/ marked
`<!-- tested: NAME -->` run as they stand, in order, as one `bash -eu -o pipefail` script,
against the real components (sshd, rsync and rrsync, the Docker engine, SeaweedFS). Only the
variables the blocks declare with a default are given — temporary directories, a loopback
address, a free port, the test's S3 endpoint and identity — and `backup-agent` on PATH is
this checkout's. The document stays the single source of the commands.

    docs/pull-setup.md         pull-setup: users, gateway, source agent on the host, sink, pulls
    docs/push-setup.md         push-setup: settings and the first `source run`
    docs/disaster-recovery.md  disaster-recovery, manifest-check, unpack-by-hand: the host is gone
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core import manifest
from tests.conftest import NEVER_READY, S3_BUCKET, S3_PREFIX, WAIT, wait_until
from tests.sshd import GATEWAY_USERS, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
PULL_SETUP = ROOT / "docs" / "pull-setup.md"
PUSH_SETUP = ROOT / "docs" / "push-setup.md"
DISASTER_RECOVERY = ROOT / "docs" / "disaster-recovery.md"


def marked_blocks(doc: Path, name: str) -> list[str]:
    """The fenced shell blocks of `doc` that follow a `<!-- tested: name -->` line."""
    mark = re.escape(f"<!-- tested: {name} -->")
    return re.findall(mark + r"\n```(?:sh|bash)\n(.*?)\n```", doc.read_text(), re.S)


def run_recipe(
    doc: Path,
    name: str,
    places: dict[str, str],
    env: dict[str, str],
    cwd: Path,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run the page's tested blocks as one script, `places` set as shell variables before it
    (not exported, as a reader's would be: the agent sees only what the page's files say).
    The commands are echoed (`-x`), so a failure shows which one failed."""
    script = "\n".join(
        [
            *(f"{key}={shlex.quote(value)}" for key, value in places.items()),
            *marked_blocks(doc, name),
        ]
    )
    return subprocess.run(
        ["bash", "-eux", "-o", "pipefail", "-c", script],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _directives(text: str) -> dict[str, str]:
    """sshd_config keyword → value (keywords lower-cased, comments left out)."""
    pairs = (
        line.split(None, 1)
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.lower(): value.strip() for key, value in pairs}


def test_the_documented_sshd_config_says_what_deploy_sshd_config_says():
    [heredoc] = [
        block for block in marked_blocks(PULL_SETUP, "pull-setup") if 'sshd_config" <<EOF' in block
    ]
    documented = _directives(heredoc.split("<<EOF\n", 1)[1].split("\nEOF", 1)[0])
    deployed = _directives((ROOT / "deploy" / "sshd" / "sshd_config").read_text())

    assert set(documented) - {"listenaddress"} == set(deployed)
    placed = {key for key, value in documented.items() if "$" in value}
    assert {k: v for k, v in documented.items() if k not in placed} == {
        k: v for k, v in deployed.items() if k not in placed
    }


@pytest.fixture
def recipe_etc() -> Iterator[Path]:
    """A directory for the gateway's configuration that sshd's StrictModes accepts: every
    directory above it is root's and writable by no one else (so not below /tmp)."""
    directory = Path(tempfile.mkdtemp(prefix="backup-agent-recipe-", dir="/run"))
    directory.chmod(0o755)  # like /etc: the gateway users read their principals files below
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _stop_sshd(pidfile: Path) -> None:
    """Stop the gateway sshd the recipe started, by the pid it wrote."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    pidfile.unlink(missing_ok=True)


def _log(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else f"(no {path})"


def _remove_users(users: tuple[str, ...]) -> None:
    for user in users:
        subprocess.run(["userdel", user], capture_output=True, check=False)


@pytest.mark.parametrize("users", ["default names", "other names"])
def test_the_pull_setup_page_followed_literally_ends_in_verified_pulls(
    users, make_app, gateway_agent, gateway_tmp_path, recipe_etc, tmp_path
):
    project = f"shop-{uuid.uuid4().hex[:8]}"  # the agent leaves other tests' containers alone
    app = make_app(extra_labels={"com.docker.compose.project": project})
    (app.data_dir / "orders.db").write_bytes(os.urandom(300_000))
    (app.data_dir / "uploads").mkdir()
    (app.data_dir / "uploads" / "logo.png").write_bytes(b"\x89PNG" + os.urandom(5000))
    names = (
        GATEWAY_USERS
        if users == "default names"
        else (f"bkData{uuid.uuid4().hex[:6]}", f"bkLogs{uuid.uuid4().hex[:6]}")
    )
    created = () if users == "default names" else names
    pidfile = recipe_etc / "sshd.pid"
    work = gateway_tmp_path / "work"  # the users run `backup-agent --version` from here
    work.mkdir(mode=0o755)
    sink_store = tmp_path / "sink-store"
    env = {
        "PATH": f"{gateway_agent.executable.parent}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        **{k: v for k, v in os.environ.items() if k == "DOCKER_HOST"},
    }
    places = {
        "SOURCE_ID": "shop",
        "DATA_USER": names[0],
        "LOG_USER": names[1],
        "BACKUP_AGENT": str(gateway_agent.executable),
        "HANDOVER_DIR": str(gateway_tmp_path / "backup" / "handover"),
        "SOURCE_STORE_DIR": str(gateway_tmp_path / "backup" / "store"),
        "GW_ETC": str(recipe_etc / "etc"),
        "GW_LISTEN": "127.0.0.1",
        "GW_PORT": str(free_port()),
        "GW_PIDFILE": str(pidfile),
        "GW_LOG": str(recipe_etc / "sshd.log"),
        "SOURCE_HOST": "127.0.0.1",
        "SINK_ADDRESS": "127.0.0.1",
        "SINK_ETC": str(tmp_path / "sink-etc"),
        "SINK_STORE_DIR": str(sink_store),
        # a volume's mount point is /var/lib/docker/volumes/<name>/_data
        "DB_VOLUME": app.data_dir.parent.name,
        "LOG_VOLUME": app.logs_dir.parent.name,
        "STOP_LABEL": f"{app.label}=true",
        "COMPOSE_PROJECT": project,
    }
    try:
        result = run_recipe(PULL_SETUP, "pull-setup", places, env, work)
        assert result.returncode == 0, (result.stderr[-4000:], _log(recipe_etc / "sshd.log"))

        # the data generation: verified on the sink, acknowledged into the source store
        [gen] = os.listdir(sink_store / "shop" / "data")
        stored = sink_store / "shop" / "data" / gen
        assert manifest.read(stored).paths == (str(app.data_dir),)
        members = subprocess.run(
            f"zstd -dc {stored / 'data.tar.zst'} | tar -t",
            shell=True,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        root = str(app.data_dir).lstrip("/")  # var/lib/docker/volumes/<volume>/_data
        assert f"{root}/orders.db" in members and f"{root}/uploads/logo.png" in members
        restored = tmp_path / "unpacked"
        restored.mkdir()
        subprocess.run(
            f"zstd -dc {stored / 'data.tar.zst'} | tar -x -C {restored}", shell=True, check=True
        )
        assert (restored / root / "orders.db").read_bytes() == (
            app.data_dir / "orders.db"
        ).read_bytes()
        assert os.listdir(Path(places["SOURCE_STORE_DIR"]) / "data") == [gen]
        assert os.listdir(Path(places["HANDOVER_DIR"]) / "data") == []
        # the log generation: pulled, and the handover freed
        [log_gen] = os.listdir(sink_store / "shop" / "logs")
        log = sink_store / "shop" / "logs" / log_gen / str(app.logs_dir).lstrip("/") / "app.log"
        assert log.read_bytes() and (app.logs_dir / "app.log").read_bytes().startswith(
            log.read_bytes()
        )
        assert os.listdir(Path(places["HANDOVER_DIR"]) / "logs") == []
        assert '"generation"' in result.stdout and "sink store" in result.stdout
        assert app.reload() == "running"

        if created:  # what step 1 says of a locked account
            subprocess.run(["usermod", "--lock", names[0]], check=True)
            (app.data_dir / "orders.db").write_bytes(b"changed")
            subprocess.run(
                [
                    "backup-agent",
                    "--env-file",
                    f"{places['GW_ETC']}/source.env",
                    "source",
                    "backup",
                ],
                env=env,
                check=True,
                capture_output=True,
            )
            locked = subprocess.run(
                [
                    "backup-agent",
                    "--env-file",
                    f"{places['SINK_ETC']}/sink.env",
                    "sink",
                    "pull-data",
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            assert locked.returncode == 1
            assert "Permission denied (publickey)" in locked.stderr, locked.stderr
            wait_until(
                lambda: "because account is locked" in _log(recipe_etc / "sshd.log"), timeout=30
            )
    finally:
        _stop_sshd(pidfile)
        _remove_users(created)


APP = f"trap 'exit 0' TERM; {NEVER_READY}; while true; do {WAIT}; done"


def _agent_command(directory: Path) -> Path:
    """A `backup-agent` in `directory` that runs this checkout with the test's Python; return
    the directory (for PATH)."""
    directory.mkdir()
    command = directory / "backup-agent"
    command.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT))} "
        f'exec {shlex.quote(sys.executable)} -m agent "$@"\n'
    )
    command.chmod(0o755)
    return directory


def _fill_volume(mountpoint: Path) -> dict[str, bytes]:
    """A PostgreSQL-like volume: its root owned by uid 999 with mode 0700, files below."""
    files = {
        "base/16384/2619": os.urandom(200_000),
        "PG_VERSION": b"16\n",
        "pg_wal/000000010000000000000001": os.urandom(50_000),
    }
    for name, content in files.items():
        (mountpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (mountpoint / name).write_bytes(content)
    for path in [mountpoint, *mountpoint.rglob("*")]:
        os.chown(path, 999, 999)
    mountpoint.chmod(0o700)
    return files


def _assert_volume_holds(mountpoint: Path, files: dict[str, bytes]) -> None:
    root = mountpoint.stat()
    assert (root.st_uid, root.st_gid, root.st_mode & 0o7777) == (999, 999, 0o700)
    for name, content in files.items():
        assert (mountpoint / name).read_bytes() == content, name
        assert (mountpoint / name).stat().st_uid == 999


def test_push_setup_then_the_disaster_recovery_runbook_bring_the_application_back(
    docker_client, base_image, s3, tmp_path
):
    tag = uuid.uuid4().hex[:8]
    project, label = f"shop-{tag}", f"backup.test-{tag}"
    volume_name = f"bt-{tag}-db"
    by_hand_volume = f"bt-{tag}-by-hand"
    containers = []

    def start_app() -> object:
        containers.append(
            docker_client.containers.run(
                base_image,
                ["bash", "-c", APP],
                name=f"bt-app-{tag}-{len(containers)}",
                detach=True,
                labels={label: "true", "com.docker.compose.project": project},
                volumes={volume_name: {"bind": "/var/lib/postgresql/data"}},
            )
        )
        return containers[-1]

    volume = docker_client.volumes.create(volume_name)
    mountpoint = Path(volume.attrs["Mountpoint"])
    files = _fill_volume(mountpoint)
    app = start_app()
    key, secret = s3.identities["test-source"]
    places = {
        "SOURCE_ID": "test-source",
        "AGENT_ETC": str(tmp_path / "etc"),
        "HANDOVER_DIR": str(tmp_path / "backup" / "handover"),
        "SOURCE_STORE_DIR": str(tmp_path / "backup" / "store"),
        "DB_VOLUME": volume_name,
        "STOP_LABEL": f"{label}=true",
        "COMPOSE_PROJECT": project,
        "S3_ENDPOINT_URL": s3.endpoint,
        "S3_BUCKET": S3_BUCKET,
        "S3_PREFIX": S3_PREFIX,
    }
    env = {
        "PATH": f"{_agent_command(tmp_path / 'bin')}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        **{k: v for k, v in os.environ.items() if k == "DOCKER_HOST"},
    }
    work = tmp_path / "work"
    work.mkdir()
    try:
        pushed = run_recipe(
            PUSH_SETUP,
            "push-setup",
            {**places, "S3_ACCESS_KEY_ID": key, "S3_SECRET_ACCESS_KEY": secret},
            env,
            work,
        )
        assert pushed.returncode == 0, pushed.stderr[-4000:]
        assert "sink store" in pushed.stdout and "never" not in pushed.stdout, pushed.stdout
        [gen] = os.listdir(tmp_path / "backup" / "store" / "data")

        # the host is gone: the application, its volume, the handover, the source store
        app.remove(force=True)
        volume.remove(force=True)
        shutil.rmtree(tmp_path / "backup")

        recovered = run_recipe(DISASTER_RECOVERY, "disaster-recovery", places, env, work)

        assert recovered.returncode == 0, recovered.stderr[-4000:]
        assert "going on without stopping anything" in recovered.stderr
        assert (
            f"restored data generation {gen} from s3://{S3_BUCKET}/{S3_PREFIX}/test-source"
            in recovered.stdout
        ), recovered.stdout
        volume = docker_client.volumes.get(volume_name)
        _assert_volume_holds(Path(volume.attrs["Mountpoint"]), files)
        app = start_app()  # step 5
        assert app.exec_run(["cat", "/var/lib/postgresql/data/PG_VERSION"]).output == b"16\n"

        checked = run_recipe(DISASTER_RECOVERY, "manifest-check", {**places, "GEN": gen}, env, work)
        assert checked.returncode == 0, checked.stderr[-4000:]
        assert checked.stdout.strip() == "INDEX.zst: OK", checked.stdout
        one_liner = marked_blocks(DISASTER_RECOVERY, "manifest-check")[0].splitlines()[-1]
        archive = work / gen / "INDEX.zst"
        intact = archive.read_bytes()
        archive.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
        damaged = subprocess.run(
            ["bash", "-o", "pipefail", "-c", one_liner],
            cwd=work / gen,
            capture_output=True,
            text=True,
            check=False,
        )
        assert damaged.returncode != 0 and "INDEX.zst: FAILED" in damaged.stdout, damaged
        archive.write_bytes(intact)

        by_hand = run_recipe(
            DISASTER_RECOVERY,
            "unpack-by-hand",
            {**places, "DB_VOLUME": by_hand_volume, "TAR_IMAGE": base_image},
            env,
            work / gen,
        )
        assert by_hand.returncode == 0, by_hand.stderr[-4000:]
        _assert_volume_holds(
            Path(docker_client.volumes.get(by_hand_volume).attrs["Mountpoint"]), files
        )
    finally:
        for argv in (
            ["docker", "rm", "-f", *(c.id for c in containers)],
            ["docker", "volume", "rm", "-f", volume_name, by_hand_volume],
        ):
            subprocess.run(argv, capture_output=True, check=False)
