"""Step 2 in pull mode and step 3 against a real sshd with a user CA, the real gateway as its
ForceCommand (run as the gateway users), real rsync and rrsync, and keys and certificates
made by ssh-keygen: `backup-agent sink pull-data` / `pull-logs` as the sink runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.core import manifest
from tests.conftest import MailBox, bytes_below, run_agent, start_agent, wait_until
from tests.generations import SOURCE, make_generation, seal, write_generation
from tests.sshd import (
    ClientKey,
    SshdServer,
    free_port,
    make_client_key,
    make_shared_dir,
    share_tree,
)
from tests.trees import snapshot

DATA_USER, LOG_USER = "dataBackupSource", "logBackupSource"
GEN1, GEN2, GEN3 = "2026-11-01T02-00-00Z", "2026-11-02T02-00-00Z", "2026-11-03T02-00-00Z"
MiB = 1 << 20


@dataclass
class Site:
    """One source (handover, source store, sshd with the gateway) and one sink (key,
    certificate for both gateway users, pinned host key, sink store, mail)."""

    handover: Path
    source_store: Path
    sink_store: Path
    server: SshdServer
    key: ClientKey
    cert: Path
    mail: MailBox
    env: dict[str, str] = field(default_factory=dict)

    def offer(self, kind: str, gen: str, files: dict[str, bytes]) -> Path:
        """A complete generation in the handover, shared with the gateway users' group as the
        source agent's Handover.publish leaves it in a setgid handover."""
        directory = write_generation(self.handover, kind, gen, files)
        share_tree(self.handover)
        return directory

    def pull(self, kind: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run_agent({**self.env, **extra}, "sink", f"pull-{kind}", timeout=60)

    def stored(self, kind: str, source: str = SOURCE) -> list[str]:
        """The generations in the sink store (complete or not)."""
        directory = self.sink_store / source / kind
        return sorted(os.listdir(directory)) if directory.is_dir() else []

    def waiting(self, kind: str) -> list[str]:
        directory = self.handover / kind
        return sorted(os.listdir(directory)) if directory.is_dir() else []

    def in_source_store(self, kind: str = "data") -> list[str]:
        directory = self.source_store / kind
        return sorted(os.listdir(directory)) if directory.is_dir() else []

    def ssh(self, user: str, *command: str) -> subprocess.CompletedProcess[str]:
        """Run `command` on the gateway as `user`, with the sink's key and certificate."""
        return self.server.ssh(user, self.key, self.cert, *command)


def sink_env(
    site_store: Path, server: SshdServer, key: ClientKey, cert: Path, mail: MailBox
) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "SINK_SOURCES": f"{SOURCE}=127.0.0.1:{server.port}",
        "SINK_SSH_KEY": str(key.private),
        "SINK_SSH_CERT": str(cert),
        "SINK_KNOWN_HOSTS": str(server.known_hosts),
        "SINK_STORE_DIR": str(site_store),
        "SSH_CONNECT_TIMEOUT": "5",
        "SMTP_HOST": mail.host,
        "SMTP_PORT": str(mail.port),
        "SMTP_SECURITY": "none",
        "ALERT_TO": "ops@example.org",
    }


@pytest.fixture
def site(sshd_server, ssh_ca, gateway_agent, gateway_tmp_path, tmp_path, smtp_server) -> Site:
    handover = make_shared_dir(gateway_tmp_path / "handover")
    source_store = make_shared_dir(gateway_tmp_path / "store")
    env_file = gateway_tmp_path / "gateway.env"
    env_file.write_text(f"HANDOVER_DIR={handover}\nSOURCE_STORE_DIR={source_store}\n")
    server = sshd_server(
        gateway_agent.command("--env-file", env_file, "gateway"), env_file=env_file
    )
    key = make_client_key(tmp_path / "sink")
    cert = ssh_ca.sign(key, [DATA_USER, LOG_USER], identity="backup-sink")
    sink_store = tmp_path / "sink-store"
    return Site(
        handover,
        source_store,
        sink_store,
        server,
        key,
        cert,
        smtp_server,
        sink_env(sink_store, server, key, cert, smtp_server),
    )


def bytes_received(result: subprocess.CompletedProcess[str]) -> int:
    [number] = re.findall(r"(\d+) bytes received", result.stderr)
    return int(number)


# ---------------------------------------------------------------- 1. the pull works


def test_a_pull_of_data_is_verified_stored_and_acknowledged_into_the_source_store(site):
    content = make_generation(site.handover, GEN1, size=300_000)
    share_tree(site.handover)

    result = site.pull("data")

    assert result.returncode == 0, result.stderr
    stored = site.sink_store / SOURCE / "data" / GEN1
    assert (stored / "data.tar.zst").read_bytes() == content
    assert manifest.read(stored).generation == GEN1
    assert sorted(os.listdir(stored)) == ["MANIFEST.json", "data.tar.zst"]
    assert site.waiting("data") == []
    assert site.in_source_store() == [GEN1]
    assert (site.source_store / "data" / GEN1 / "data.tar.zst").read_bytes() == content
    assert not list((site.sink_store / ".incoming").rglob("*.zst"))
    assert site.mail.messages == []


def test_a_pull_of_logs_is_verified_stored_and_frees_the_handover(site):
    files = {"var/log/app.log": os.urandom(200_000), "var/log/nginx/access.log": b"GET /\n" * 999}
    site.offer("logs", GEN1, files)

    result = site.pull("logs")

    assert result.returncode == 0, result.stderr
    stored = site.sink_store / SOURCE / "logs" / GEN1
    for name, content in files.items():
        assert (stored / name).read_bytes() == content
    assert site.waiting("logs") == []
    assert site.in_source_store("logs") == []
    assert site.mail.messages == []


# ---------------------------------------------------------------- 2. credentials


@pytest.fixture(
    params=[
        "expired certificate",
        "certificate for another principal",
        "plain key without certificate",
    ]
)
def bad_credentials(request, site, ssh_ca) -> tuple[str, Path]:
    if request.param == "expired certificate":
        return request.param, ssh_ca.sign_expired(site.key, [DATA_USER, LOG_USER])
    if request.param == "certificate for another principal":
        return request.param, ssh_ca.sign(site.key, ["someoneElse"])
    return request.param, site.key.public  # a plain public key where the certificate belongs


def test_a_sink_without_a_valid_certificate_is_refused_with_one_clear_line_and_an_alert(
    site, bad_credentials
):
    what, cert = bad_credentials
    site.offer("data", GEN1, {"data.tar.zst": b"x" * 1000})
    before = snapshot(site.handover)

    result = site.pull("data", SINK_SSH_CERT=str(cert))

    assert result.returncode == 1, (what, result.stderr)
    assert "Traceback" not in result.stderr
    [mail] = site.mail.wait_for(1)
    assert f"{SOURCE}: sink pull-data failed at list the data generations" in mail["Subject"]
    [error] = [
        line.removeprefix("Error: ")
        for line in mail.get_content().splitlines()
        if line.startswith("Error: ")
    ]
    assert SOURCE in error and "SINK_SSH_CERT" in error, error
    assert "Could not chdir" not in error
    assert error in result.stderr.replace("\n", " ")  # the same one line in the job's log
    assert site.stored("data") == []
    assert snapshot(site.handover) == before
    assert site.in_source_store() == []


# ---------------------------------------------------------------- 3.-5. the gateway refuses


@pytest.mark.parametrize("user", [DATA_USER, LOG_USER])
def test_an_upload_through_the_gateway_is_refused(site, tmp_path, user):
    site.offer("data", GEN1, {"data.tar.zst": b"original"})
    site.offer("logs", GEN1, {"var/log/app.log": b"original"})
    before = snapshot(site.handover)
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "data.tar.zst").write_bytes(b"planted")
    rsh = site.server.rsync_rsh(site.key, site.cert)

    for source, target in (
        (upload / "data.tar.zst", "x"),
        (upload / "data.tar.zst", f"{GEN1}/"),
        (f"{upload}/", f"{GEN1}/"),
    ):
        result = subprocess.run(
            ["rsync", "-r", "-e", rsh, str(source), f"{user}@127.0.0.1:{target}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode != 0, result
        assert "read-only" in result.stderr, result.stderr

    assert snapshot(site.handover) == before


@pytest.mark.parametrize(
    "path", ["../../../../etc/passwd", "/etc/passwd", f"../logs/{GEN1}/", "../.state/"]
)
def test_a_read_outside_the_users_part_of_the_handover_is_refused(site, tmp_path, path):
    site.offer("logs", GEN1, {"var/log/app.log": b"the log user's"})
    (site.handover / ".state").mkdir()
    (site.handover / ".state" / "quiesced.json").write_text("{}")
    share_tree(site.handover)
    target = tmp_path / "got"

    result = subprocess.run(
        [
            "rsync",
            "-r",
            "-e",
            site.server.rsync_rsh(site.key, site.cert),
            f"{DATA_USER}@127.0.0.1:{path}",
            f"{target}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode != 0, result
    assert not target.exists() or not any(target.rglob("*")), list(target.rglob("*"))


@pytest.mark.parametrize(
    "command",
    [
        "sh -c id",
        "cat /etc/passwd",
        "list; id",
        "list && id",
        f"ack {GEN1} extra",
        "list $(id)",
        "",
        "rsync --server; id",
    ],
)
def test_an_arbitrary_command_is_refused_with_a_message(site, command):
    site.offer("data", GEN1, {"data.tar.zst": b"payload"})
    before = snapshot(site.handover)

    result = site.ssh(DATA_USER, *([command] if command else []))

    assert result.returncode == 1, result
    assert "backup-agent gateway: refused:" in result.stderr
    assert "uid=" not in result.stdout + result.stderr and "root:" not in result.stdout
    assert snapshot(site.handover) == before
    assert site.in_source_store() == []


@pytest.mark.parametrize(
    "user,gen",
    [
        (DATA_USER, "../../etc"),
        (DATA_USER, "2026-13-01T00-00-00Z"),
        (DATA_USER, GEN2),
        (DATA_USER, GEN3),
        (LOG_USER, GEN1),
        (DATA_USER, f"{GEN1}/.."),
        (DATA_USER, "-rf"),
    ],
    ids=[
        "traversal",
        "impossible date",
        "absent",
        "incomplete",
        "other kind",
        "dot-dot suffix",
        "option",
    ],
)
def test_an_invalid_or_absent_ack_is_refused_and_the_handover_is_unchanged(site, user, gen):
    site.offer("data", GEN1, {"data.tar.zst": b"payload"})
    (site.handover / "data" / GEN3).mkdir()  # being written: no manifest yet
    (site.handover / "data" / GEN3 / "data.tar.zst").write_bytes(b"half")
    share_tree(site.handover)
    before = snapshot(site.handover)

    result = site.ssh(user, "ack", gen)

    assert result.returncode == 1, result
    assert "backup-agent gateway: refused:" in result.stderr
    assert snapshot(site.handover) == before
    assert site.in_source_store() == []


# ---------------------------------------------------------------- 6.-9. the transfer


def test_an_interrupted_transfer_resumes_and_no_partial_generation_reaches_the_store(site):
    size = 128 * MiB
    directory = site.handover / "data" / GEN1
    directory.mkdir(parents=True)
    with open(directory / "data.tar.zst", "wb") as handle:
        for _ in range(size // (4 * MiB)):
            handle.write(os.urandom(4 * MiB))
    seal(directory, GEN1, "data")
    share_tree(site.handover)
    incoming = site.sink_store / ".incoming" / SOURCE / "data" / GEN1

    def partial_bytes() -> int:
        assert site.stored("data") == [], "a partial generation reached the sink store"
        return bytes_below(incoming)

    job = start_agent(site.env, "sink", "pull-data", start_new_session=True)
    try:
        wait_until(lambda: partial_bytes() > 8 * MiB or job.poll() is not None, timeout=30)
        assert job.poll() is None, "the transfer ended before it could be interrupted"
        os.killpg(job.pid, signal.SIGTERM)
        _, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    assert job.returncode == 128 + signal.SIGTERM, stderr
    [mail] = site.mail.wait_for(1)
    assert "2.a fetch data generation" in mail["Subject"] and "SIGTERM" in mail.get_content()
    assert site.stored("data") == []
    kept = incoming / ".rsync-partial" / "data.tar.zst"
    assert kept.is_file(), (sorted(incoming.rglob("*")), stderr)
    kept_size = kept.stat().st_size
    assert 0 < kept_size < size
    assert site.waiting("data") == [GEN1] and site.in_source_store() == []

    resumed = site.pull("data")

    assert resumed.returncode == 0, resumed.stderr
    stored = site.sink_store / SOURCE / "data" / GEN1
    assert sorted(os.listdir(stored)) == ["MANIFEST.json", "data.tar.zst"]
    assert site.waiting("data") == [] and site.in_source_store() == [GEN1]
    assert bytes_received(resumed) < size - kept_size // 2  # the kept part did not travel again


def test_a_file_changed_after_its_manifest_fails_verification_and_is_not_acknowledged(site):
    directory = site.offer("data", GEN1, {"data.tar.zst": os.urandom(100_000)})
    (directory / "data.tar.zst").write_bytes(os.urandom(100_000))  # same size, other bytes

    result = site.pull("data")

    assert result.returncode == 1, result.stderr
    [mail] = site.mail.wait_for(1)
    assert f"failed at verify data generation {GEN1} of {SOURCE}" in mail["Subject"]
    assert "sha256" in mail.get_content() and "stays in" in mail.get_content()
    assert site.stored("data") == []
    assert site.waiting("data") == [GEN1]
    assert site.in_source_store() == []


def test_a_second_pull_of_a_grown_log_moves_only_the_new_bytes(site):
    log = os.urandom(8 * MiB)
    rotated = os.urandom(2 * MiB)
    site.offer("logs", GEN1, {"var/log/app.log": log, "var/log/app.log.1": rotated})
    first = site.pull("logs")
    assert first.returncode == 0, first.stderr
    old = site.sink_store / SOURCE / "logs" / GEN1
    appended = os.urandom(32 * 1024)
    new_dir = site.offer(
        "logs", GEN2, {"var/log/app.log": log + appended, "var/log/app.log.1": rotated}
    )
    # the source copies logs keeping their mtimes: the rotated log is the same file
    mtime = (old / "var/log/app.log.1").stat().st_mtime_ns
    os.utime(new_dir / "var/log/app.log.1", ns=(mtime, mtime))
    seal(new_dir, GEN2, "logs")  # the manifest is written last
    share_tree(site.handover)

    second = site.pull("logs")

    assert second.returncode == 0, second.stderr
    new = site.sink_store / SOURCE / "logs" / GEN2
    assert (new / "var/log/app.log").read_bytes() == log + appended
    assert bytes_received(first) > 10 * MiB
    assert bytes_received(second) < 200 * 1024, bytes_received(second)
    assert (new / "var/log/app.log.1").stat().st_ino == (old / "var/log/app.log.1").stat().st_ino
    assert site.waiting("logs") == []


def test_an_unreachable_source_does_not_stop_the_others(site):
    content = make_generation(site.handover, GEN1, size=50_000)
    share_tree(site.handover)
    down = free_port()
    env = {
        **site.env,
        "SINK_SOURCES": f"down-source=127.0.0.1:{down},{SOURCE}=127.0.0.1:{site.server.port}",
    }

    result = run_agent(env, "sink", "pull-data", timeout=60)

    assert result.returncode == 1, result.stderr
    assert (site.sink_store / SOURCE / "data" / GEN1 / "data.tar.zst").read_bytes() == content
    assert site.in_source_store() == [GEN1]
    [mail] = site.mail.wait_for(1, timeout=30)
    assert "down-source: sink pull-data failed at list the data generations" in mail["Subject"]
    assert f"127.0.0.1:{down}" in mail.get_content()
    assert site.stored("data", "down-source") == []


# ---------------------------------------------------------------- with the source agent


@pytest.mark.docker
def test_what_the_source_agent_hands_over_is_pulled_and_acknowledged_whatever_the_log_modes(
    site, docker_client, tmp_path
):
    app = tmp_path / "app"
    (app / "data").mkdir(parents=True)
    (app / "data" / "orders.db").write_bytes(os.urandom(100_000))
    private = app / "logs" / "private"
    private.mkdir(parents=True)
    (app / "logs" / "app.log").write_text("started\n")
    (app / "logs" / "secret.log").write_text("token=...\n")
    (private / "audit.log").write_text("login\n")
    for path, mode in (
        (app / "logs" / "secret.log", 0o600),
        (private, 0o700),
        (app / "logs", 0o750),
    ):
        os.chown(path, 999, 999)  # the application's own user, as in its volume
        os.chmod(path, mode)
    env = {
        "PATH": os.environ["PATH"],
        "SOURCE_ID": SOURCE,
        "DATA_PATHS": str(app / "data"),
        "LOG_PATHS": str(app / "logs"),
        "HANDOVER_DIR": str(site.handover),
        "SOURCE_STORE_DIR": str(site.source_store),
        "STOP_LABEL": "backup.test-pull-nothing-to-stop=true",
    }
    backup = run_agent(env, "source", "backup", umask=0o022)  # not the 002 of the README
    assert backup.returncode == 0, backup.stderr
    [gen] = site.waiting("data")

    data, logs = site.pull("data"), site.pull("logs")

    assert (data.returncode, logs.returncode) == (0, 0), data.stderr + logs.stderr
    stored = site.sink_store / SOURCE / "logs" / gen / str(app).lstrip("/")
    assert (stored / "logs" / "secret.log").read_text() == "token=...\n"
    assert (stored / "logs" / "private" / "audit.log").read_text() == "login\n"
    assert site.waiting("data") == [] and site.waiting("logs") == []
    assert site.in_source_store() == [gen]
    assert site.mail.messages == []


def test_an_ack_the_source_cannot_carry_out_is_alerted_and_retried_without_fetching_again(site):
    site.source_store.chmod(0o755)  # the gateway users may not write to the source store
    make_generation(site.handover, GEN1, size=100_000)
    share_tree(site.handover)

    failed = site.pull("data")

    assert failed.returncode == 1, failed.stderr
    [mail] = site.mail.wait_for(1)
    assert f"failed at acknowledge data generation {GEN1}" in mail["Subject"]
    [error] = [line for line in mail.get_content().splitlines() if line.startswith("Error: ")]
    assert "Permission denied" in error and "SOURCE_STORE_DIR" in error, error
    assert "Traceback" not in error and "Could not chdir" not in error, error
    assert site.stored("data") == [GEN1]  # verified: kept
    assert site.waiting("data") == [GEN1] and site.in_source_store() == []

    site.source_store.chmod(0o2775)
    retried = site.pull("data")

    assert retried.returncode == 0, retried.stderr
    assert bytes_received(retried) == 0 and "fetch" not in retried.stderr
    assert site.waiting("data") == [] and site.in_source_store() == [GEN1]


def test_the_sink_logs_which_store_retention_pruned_on_the_sink_and_on_the_source(site):
    with open(site.handover.parent / "gateway.env", "a") as env_file:
        env_file.write("SOURCE_KEEP_LAST=1\n")  # the gateway's `ack` rotates the source store
    for gen in (GEN1, GEN2):
        make_generation(site.handover, gen, size=1000)
    for path in (site.handover / "data" / GEN1).iterdir():  # written a day before GEN2
        os.utime(path, (path.stat().st_atime - 86400, path.stat().st_mtime - 86400))
    share_tree(site.handover)

    result = site.pull(
        "data", SINK_KEEP_LAST="1", SINK_KEEP_DAILY="0", SINK_KEEP_WEEKLY="0", SINK_KEEP_MONTHLY="0"
    )

    assert result.returncode == 0, result.stderr
    assert site.stored("data") == [GEN2] and site.in_source_store() == [GEN2]
    lines = [line for line in result.stderr.splitlines() if "retention" in line]
    sink = f"sink store {site.sink_store / SOURCE}"
    source = f"source store {site.source_store}"
    assert [line for line in lines if sink in line and f"removed 1: {GEN1}" in line], lines
    assert [
        line for line in lines if SOURCE in line and source in line and f"removed 1: {GEN1}" in line
    ], lines


def test_a_gateway_env_file_the_gateway_users_cannot_read_is_one_clear_line(site):
    (site.handover.parent / "gateway.env").chmod(0o600)  # root's alone
    make_generation(site.handover, GEN1, size=1000)
    share_tree(site.handover)

    result = site.pull("data")

    assert result.returncode == 1, result.stderr
    [mail] = site.mail.wait_for(1)
    [error] = [line for line in mail.get_content().splitlines() if line.startswith("Error: ")]
    assert "gateway.env" in error and "cannot read" in error and "0640" in error, error
    assert "PermissionError" not in error and "Traceback" not in result.stderr, error
    assert site.waiting("data") == [GEN1]
