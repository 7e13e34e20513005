"""QUIESCE_MODE=signal against real processes: a real application container, and the agent
either on the host (which sees the container's processes) or in a container of its own that
shares the application's PID namespace (`--pid container:<app>`, what a Pod with
`shareProcessNamespace: true` gives a sidecar).

Every test asserts on outcomes: the application's process states as the kernel reports them
(`T` while stopped), its log growing or not, the container never restarted, the exit code and
what was handed over.
"""

from __future__ import annotations

import os
import signal
import site
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, App, agent_env, run_agent, start_agent, wait_until

pytestmark = pytest.mark.docker

# Incompressible data archived at zstd level 19 (COLLECT_MODE=direct, so while the application
# is stopped) keeps it stopped for a few seconds: the window the tests look through.
SLOW_COPY = {"COLLECT_MODE": "direct", "ZSTD_LEVEL": "19"}


@dataclass
class Tagged:
    """An application whose processes are found by a tag at the start of its command line."""

    app: App
    tag: str

    @property
    def pattern(self) -> str:
        return f"^bash -c # {self.tag}"

    def states(self) -> dict[int, str]:
        """The state letter of every process of the application, as the host sees them: the
        script's shell and its children (the `sleep` it waits for)."""
        stats = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            stats[int(entry.name)] = (stat.rpartition(")")[2].split(), cmdline)
        shells = {
            pid
            for pid, (_, cmd) in stats.items()
            if cmd.startswith(f"bash\0-c\0# {self.tag}\n".encode())
        }
        return {
            pid: fields[0]
            for pid, (fields, _) in stats.items()
            if pid in shells or int(fields[1]) in shells
        }

    def stopped(self) -> bool:
        """Every process is stopped (a child that ended just before lingers as a zombie)."""
        states = set(self.states().values())
        return "T" in states and states <= {"T", "Z"}

    def running(self) -> bool:
        states = self.states()
        return bool(states) and "T" not in states.values()

    def log_size(self) -> int:
        return (self.app.logs_dir / "app.log").stat().st_size

    def assert_frozen_for(self, seconds: float) -> None:
        before = self.log_size()
        time.sleep(seconds)
        assert self.stopped(), self.states()
        assert self.log_size() == before, "the application wrote while it was stopped"

    def assert_alive(self) -> None:
        wait_until(self.running, timeout=60)
        before = self.log_size()
        wait_until(lambda: self.log_size() > before, timeout=60)


# The application of these tests has children, as most do: the `sleep` its shell waits for
# (the stop must reach them too).
WITH_CHILDREN = """
trap 'exit 0' TERM
i=0
while true; do
  i=$((i+1))
  echo "line $i $(date +%s.%N)" >> /logs/app.log
  sleep 0.2 & wait $!
done
"""


@pytest.fixture
def tagged_app(make_app) -> Iterator[Callable[..., Tagged]]:
    def factory(user: int | None = None, **kwargs: object) -> Tagged:
        tag = f"app-{uuid.uuid4().hex[:10]}"
        app = make_app(
            f"# {tag}\n{WITH_CHILDREN}", user=None if user is None else f"{user}:{user}", **kwargs
        )
        random = app.data_dir / "random.bin"
        random.write_bytes(os.urandom(8 << 20))
        if user is not None:  # the application's own files, readable by it alone
            for path in (app.data_dir, app.logs_dir, random):
                os.chown(path, user, user)
            random.chmod(0o600)
        tagged = Tagged(app, tag)
        wait_until(lambda: tagged.running() and (app.logs_dir / "app.log").exists(), timeout=60)
        return tagged

    yield factory


def signal_env(tagged: Tagged, handover: Path, **extra: str) -> dict[str, str]:
    return agent_env(
        tagged.app,
        handover,
        **{"QUIESCE_MODE": "signal", "SIGNAL_PROCESSES": tagged.pattern, **SLOW_COPY, **extra},
    )


def generations(handover: Path, kind: str) -> list[str]:
    directory = handover / kind
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


# ---------------------------------------------------------------- the agent on the host


def test_signal_mode_freezes_the_processes_for_the_copy_and_continues_them(tagged_app, tmp_path):
    tagged = tagged_app()
    started_before = tagged.app.started_at()
    handover = tmp_path / "handover"
    agent = start_agent(signal_env(tagged, handover), "source", "backup")
    try:
        wait_until(tagged.stopped, timeout=30)
        assert agent.poll() is None
        tagged.assert_frozen_for(0.5)
        _, stderr = agent.communicate(timeout=120)
    finally:
        agent.kill()
        agent.communicate()

    assert agent.returncode == 0, stderr
    tagged.assert_alive()
    assert tagged.app.reload() == "running" and tagged.app.started_at() == started_before
    [gen] = generations(handover, "data")
    assert generations(handover, "logs") == [gen]
    assert not (handover / ".state" / "quiesced.json").exists()


def test_a_run_killed_while_the_processes_are_stopped_is_repaired_by_the_next_run(
    tagged_app, tmp_path
):
    tagged = tagged_app()
    handover = tmp_path / "handover"
    agent = start_agent(signal_env(tagged, handover), "source", "backup")
    try:
        wait_until(tagged.stopped, timeout=30)
        agent.send_signal(signal.SIGKILL)
        agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.communicate()
    assert agent.returncode == -signal.SIGKILL
    # Nobody continues them: the record of the killed run says which processes they are.
    tagged.assert_frozen_for(1.0)
    assert (handover / ".state" / "quiesced.json").exists()

    result = run_agent(
        signal_env(tagged, handover, COLLECT_MODE="mirror", ZSTD_LEVEL="1"), "source", "backup"
    )

    assert result.returncode == 0, result.stderr
    assert "an earlier run was interrupted with the application quiesced" in result.stderr
    tagged.assert_alive()
    assert len(generations(handover, "data")) == 1
    assert not (handover / ".state" / "quiesced.json").exists()


def test_cron_continues_at_its_start_what_a_killed_run_left_stopped(tagged_app, tmp_path):
    # A sidecar's container restarts after its agent was killed: `cron` repairs that at its
    # start, not at the next tick (here: next year).
    tagged = tagged_app()
    handover = tmp_path / "handover"
    env = signal_env(tagged, handover)
    agent = start_agent(env, "source", "backup")
    try:
        wait_until(tagged.stopped, timeout=30)
        agent.send_signal(signal.SIGKILL)
        agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.communicate()
    tagged.assert_frozen_for(0.5)

    cron = start_agent({**env, "CRON_BACKUP": "0 0 1 1 *"}, "cron", "--role", "source")
    try:
        tagged.assert_alive()
        assert not (handover / ".state" / "quiesced.json").exists()
        cron.send_signal(signal.SIGTERM)
        stdout, stderr = cron.communicate(timeout=30)
    finally:
        cron.kill()
        cron.communicate()

    assert cron.returncode == 0, stderr
    assert "cron: reconcile ended with exit code 0" in stdout + stderr
    assert generations(handover, "data") == []


def test_a_record_of_the_signal_mode_is_left_to_the_signal_mode(tagged_app, tmp_path):
    # Only the mode that wrote a record knows how to undo it: a run in another mode says so,
    # fails before it stops anything, and keeps the record for the right one.
    tagged = tagged_app()
    handover = tmp_path / "handover"
    env = signal_env(tagged, handover)
    agent = start_agent(env, "source", "backup")
    try:
        wait_until(tagged.stopped, timeout=30)
        agent.send_signal(signal.SIGKILL)
        agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.communicate()

    other = run_agent({**env, "QUIESCE_MODE": "stop"}, "source", "backup")

    assert other.returncode == 1, other.stderr
    assert "run the agent once with QUIESCE_MODE=signal" in other.stderr
    tagged.assert_frozen_for(0.5)
    assert tagged.app.reload() == "running"  # the Docker mode touched no container

    result = run_agent(env, "source", "reconcile")

    assert result.returncode == 0, result.stderr
    tagged.assert_alive()
    assert not (handover / ".state" / "quiesced.json").exists()


def test_sigterm_while_the_processes_are_stopped_continues_them(tagged_app, tmp_path):
    tagged = tagged_app()
    handover = tmp_path / "handover"
    agent = start_agent(signal_env(tagged, handover), "source", "backup")
    try:
        wait_until(tagged.stopped, timeout=30)
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.communicate()

    assert agent.returncode == 128 + signal.SIGTERM, stderr
    tagged.assert_alive()
    assert generations(handover, "data") == []
    assert not (handover / ".state" / "quiesced.json").exists()


def test_the_agent_never_stops_itself_even_when_the_pattern_matches_it(tagged_app, tmp_path):
    tagged = tagged_app()
    handover = tmp_path / "handover"
    # The pattern matches the agent's own command line too — and only this test's agent: its
    # --env-file names this test's directory (other agents may run on the same host).
    own = f"agent-{uuid.uuid4().hex[:8]}.env"
    env = signal_env(
        tagged,
        handover,
        SIGNAL_PROCESSES=f"{tagged.pattern}|{own}",
        COLLECT_MODE="mirror",
        ZSTD_LEVEL="1",
    )

    result = run_agent(env, "--env-file", str(tmp_path / own), "source", "backup", timeout=60)

    assert result.returncode == 0, result.stderr
    assert "stopped process" in result.stderr and "-m agent" not in "\n".join(
        line for line in result.stderr.splitlines() if "stopped process" in line
    )
    tagged.assert_alive()


# ---------------------------------------------------------------- the agent as a sidecar


def python_mounts() -> tuple[str, dict[str, dict[str, str]]]:
    """The host's Python with the agent's dependencies, to run in a container of the base image
    (same Debian release): the interpreter's prefix, or, for the system Python, its
    site-packages directories."""
    prefixes = {sys.prefix, sys.base_prefix}
    if not prefixes & {"/usr", "/usr/local"}:
        return sys.executable, {p: {"bind": p, "mode": "ro"} for p in prefixes}
    return "python3", {
        p: {"bind": p, "mode": "ro"} for p in site.getsitepackages() if Path(p).is_dir()
    }


@pytest.fixture
def sidecar(docker_client, base_image, tmp_path):
    """Run the agent's code (this checkout) in a container of its own that shares the PID
    namespace and the volumes of the application's container; its /backup is tmp_path/backup."""
    made = []
    backup = tmp_path / "backup"
    backup.mkdir()

    def run(tagged: Tagged, *args: str, security: dict[str, object] | None = None, **extra: str):
        python, mounts = python_mounts()
        env = {
            "SOURCE_ID": "test-source",
            "DATA_PATHS": "/data",
            "LOG_PATHS": "/logs",
            "HANDOVER_DIR": "/backup/handover",
            "SOURCE_STORE_DIR": "/backup/store",
            "QUIESCE_MODE": "signal",
            "SIGNAL_PROCESSES": tagged.pattern,
            "STOP_TIMEOUT": "5",
            "PYTHONDONTWRITEBYTECODE": "1",
            **SLOW_COPY,
            **extra,
        }
        container = docker_client.containers.run(
            base_image,
            [python, "-m", "agent", *args],
            detach=True,
            environment=env,
            pid_mode=f"container:{tagged.app.container.id}",
            volumes_from=[tagged.app.container.id],
            working_dir=str(ROOT),
            volumes={
                **mounts,
                str(ROOT): {"bind": str(ROOT), "mode": "ro"},
                str(backup): {"bind": "/backup"},
            },
            name=f"bt-sidecar-{uuid.uuid4().hex[:10]}",
            **(security or {}),
        )
        made.append(container)
        return container

    run.handover = backup / "handover"
    yield run
    for container in made:
        container.remove(force=True)


def test_a_sidecar_in_the_apps_pid_namespace_freezes_it_and_a_killed_one_is_repaired(
    tagged_app, sidecar
):
    # The application runs under an init (as in a Pod, where `pause` is PID 1): its shell is
    # not PID 1 of the namespace, so it can be stopped from inside.
    tagged = tagged_app(init=True)
    started_before = tagged.app.started_at()

    first = sidecar(tagged, "source", "backup")
    wait_until(tagged.stopped, timeout=60)
    tagged.assert_frozen_for(0.5)
    first.kill()  # SIGKILL, while the application is stopped
    assert first.wait(timeout=30)["StatusCode"] == 137
    tagged.assert_frozen_for(1.0)

    second = sidecar(tagged, "source", "backup")
    status = second.wait(timeout=180)["StatusCode"]
    logs = second.logs().decode(errors="replace")

    assert status == 0, logs
    assert "an earlier run was interrupted with the application quiesced" in logs
    tagged.assert_alive()
    assert tagged.app.reload() == "running" and tagged.app.started_at() == started_before
    assert len(generations(sidecar.handover, "data")) == 1
    assert not (sidecar.handover / ".state" / "quiesced.json").exists()


def test_a_sidecar_refuses_to_stop_pid_1_of_its_namespace_and_touches_nothing(tagged_app, sidecar):
    # Without an init the application's shell is PID 1, which ignores SIGSTOP from inside
    # its namespace: the agent says so instead of pretending the application is stopped.
    tagged = tagged_app()

    agent = sidecar(tagged, "source", "backup", COLLECT_MODE="mirror", ZSTD_LEVEL="1")
    status = agent.wait(timeout=120)["StatusCode"]
    logs = agent.logs().decode(errors="replace")

    assert status == 1, logs
    assert "process 1 (bash -c" in logs and "ignores SIGSTOP from inside it" in logs
    assert "1.a stop the application" in logs
    tagged.assert_alive()
    assert generations(sidecar.handover, "data") == []


def manifest_security() -> dict[str, object]:
    """The securityContext of the sidecar agent in k8s/source-sidecar.yaml, as Docker options."""
    for document in yaml.safe_load_all((ROOT / "k8s" / "source-sidecar.yaml").read_text()):
        if document and document["kind"] == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                if container.get("command", [])[:2] == ["backup-agent", "cron"]:
                    context = container["securityContext"]
                    assert context["capabilities"]["drop"] == ["ALL"]
                    return {
                        "user": str(context["runAsUser"]),
                        "cap_drop": ["ALL"],
                        "cap_add": context["capabilities"]["add"],
                        "security_opt": []
                        if context.get("allowPrivilegeEscalation", True)
                        else ["no-new-privileges"],
                    }
    raise AssertionError("no sidecar agent in k8s/source-sidecar.yaml")


def test_a_sidecar_with_the_k8s_manifests_capabilities_freezes_an_app_of_another_user(
    tagged_app, sidecar
):
    # The capabilities k8s/source-sidecar.yaml gives the agent (all others dropped) are enough
    # to signal another user's processes and to read files only that user may read.
    tagged = tagged_app(init=True, user=4242)
    assert (tagged.app.data_dir / "random.bin").stat().st_mode & 0o777 == 0o600

    agent = sidecar(tagged, "source", "backup", security=manifest_security())
    wait_until(tagged.stopped, timeout=60)
    tagged.assert_frozen_for(0.3)
    status = agent.wait(timeout=180)["StatusCode"]
    logs = agent.logs().decode(errors="replace")

    assert status == 0, logs
    tagged.assert_alive()
    [gen] = generations(sidecar.handover, "data")
    assert (sidecar.handover / "data" / gen / "data.tar.zst").stat().st_size > 8 << 20


def test_a_sidecar_without_the_kill_capability_says_so_and_leaves_nothing_stopped(
    tagged_app, sidecar
):
    tagged = tagged_app(init=True, user=4242)
    security = manifest_security()
    security["cap_add"] = [c for c in security["cap_add"] if c != "KILL"]

    agent = sidecar(tagged, "source", "backup", security=security)
    status = agent.wait(timeout=120)["StatusCode"]
    logs = agent.logs().decode(errors="replace")

    assert status == 1, logs
    assert "may not send SIGSTOP to process" in logs and "KILL capability" in logs
    tagged.assert_alive()
    assert generations(sidecar.handover, "data") == []
    # Nothing was stopped, so nothing is left for the next run to repair.
    assert not (sidecar.handover / ".state" / "quiesced.json").exists()
