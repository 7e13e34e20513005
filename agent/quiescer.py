"""The app quiescer: stops (or pauses) the application's containers through the Docker API and
starts them again.

Before it stops anything it writes a record of what it is about to stop, so a run that was
killed is repaired by the next one (`reconcile`). It restarts exactly the containers this run
stopped, in reverse order.

`QUIESCE_MODE` chooses the quiescer (`open_quiescer`): `stop` and `pause` are the Docker one
here; `signal` (SIGSTOP of the application's processes from a sidecar, `quiescer_signal`) and
`scale` (Kubernetes workloads scaled to 0, `quiescer_scale`) have the same interface:
`select`, `quiesce`, `resume`, `reconcile`, `run_label_commands`, `nothing_selected`, `verb`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container

from agent.config import LabelSelector, SourceConfig
from agent.interrupts import InterruptGuard
from agent.manifest import fsync_dir
from agent.steps import Job

logger = logging.getLogger(__name__)

COMPOSE_PROJECT_LABEL = "com.docker.compose.project"


class DockerUnavailable(Exception):
    pass


class CommandFailed(Exception):
    pass


def connect(docker_host: str, stop_timeout: int) -> docker.DockerClient:
    """Return a client for the engine at `docker_host`. Raise DockerUnavailable with the cause
    and the fix when it cannot be reached."""
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=max(60, stop_timeout + 30))
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        raise DockerUnavailable(
            f"cannot reach the Docker engine at {docker_host} ({exc}); mount the Docker socket "
            "into the agent's container or set DOCKER_HOST") from None
    return client


class AppQuiescer(Protocol):
    """What `application_stopped` and its callers need of a quiescer, whatever its mode."""

    @property
    def verb(self) -> str: ...

    def select(self, selector: LabelSelector, project: str) -> list[Any]: ...

    def nothing_selected(self, selector: LabelSelector) -> str: ...

    def quiesce(self, selected: list[Any]) -> None: ...

    def resume(self) -> None: ...

    def reconcile(self) -> list[str]: ...

    def run_label_commands(self, label: str, project: str) -> list[str]: ...


TARGETS = {"stop": "the Docker engine", "pause": "the Docker engine",
           "signal": "the application's processes", "scale": "the Kubernetes API"}


def open_quiescer(config: SourceConfig, record_path: Path) -> AppQuiescer:
    """Return the quiescer of `config.quiesce_mode`, keeping its crash-safe record at
    `record_path`. Raise DockerUnavailable (or the mode's own error) naming the cause and the
    fix when what it works through cannot be reached."""
    if config.quiesce_mode == "signal":
        from agent.quiescer_signal import SignalQuiescer
        return SignalQuiescer(record_path, config.signal_processes, config.stop_timeout)
    if config.quiesce_mode == "scale":
        from agent.quiescer_scale import ScaleQuiescer
        return ScaleQuiescer(record_path, config.k8s_namespace, config.k8s_workloads,
                             config.stop_timeout)
    return Quiescer(connect(config.docker_host, config.stop_timeout), record_path,
                    config.quiesce_mode, config.stop_timeout)


def write_record(path: Path, body: dict[str, Any]) -> None:
    """Write a quiescer's record atomically and durably (temp file, fsync, rename, fsync of
    the directory): it must be on disk before anything is stopped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(body, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_record(path: Path, modes: tuple[str, ...]) -> dict[str, Any] | None:
    """Return the record a killed run left at `path`, or None. Raise RuntimeError (the record
    is kept) if another QUIESCE_MODE wrote it: only that mode knows how to undo it."""
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    mode = record.get("mode", "stop")
    if mode not in modes:
        raise RuntimeError(f"{path} was left by a run with QUIESCE_MODE={mode}, which was "
                           f"interrupted with the application quiesced; run the agent once with "
                           f"QUIESCE_MODE={mode} to bring the application back, then switch")
    return record


@dataclass(frozen=True)
class Stopped:
    id: str
    name: str


class Quiescer:
    """Stops or pauses containers and remembers them, on disk first, then in memory."""

    def __init__(self, client: docker.DockerClient, record_path: Path, mode: str,
                 stop_timeout: int) -> None:
        self.client = client
        self.record_path = record_path
        self.mode = mode
        self.stop_timeout = stop_timeout
        self.stopped: list[Stopped] = []
        self._settle_until = 0.0

    @property
    def verb(self) -> str:
        return "pause" if self.mode == "pause" else "stop"

    def nothing_selected(self, selector: LabelSelector) -> str:
        return f"no running container has the label {selector.docker_filter()}"

    # -- selecting

    def _filters(self, label: str, project: str) -> dict[str, object]:
        labels = [label] + ([f"{COMPOSE_PROJECT_LABEL}={project}"] if project else [])
        return {"label": labels, "status": "running"}

    def select(self, selector: LabelSelector, project: str) -> list[Container]:
        """Return the running containers with the stop label (in this compose project, if
        given), in a stable order, never the agent's own container."""
        own = _own_container_id()
        found = self.client.containers.list(filters=self._filters(selector.docker_filter(), project))
        return sorted((c for c in found if c.id != own), key=lambda c: c.name)

    # -- commands before and after the stop

    def run_label_commands(self, label: str, project: str) -> list[str]:
        """Run, in every running container that has `label`, the label's value as a shell
        command (`sh -c`). Return the names of the containers. Raise CommandFailed naming the
        container, the exit code and the end of the output when one fails."""
        done = []
        containers = self.client.containers.list(filters=self._filters(label, project))
        for container in sorted(containers, key=lambda c: c.name):
            command = container.labels[label]
            logger.info("running %s in %s: %s", label, container.name, command)
            result = container.exec_run(["sh", "-c", command])
            output = (result.output or b"").decode(errors="replace").strip()
            if result.exit_code != 0:
                raise CommandFailed(f"{label} in container {container.name} exited with "
                                    f"{result.exit_code}: {output[-500:]}")
            done.append(container.name)
        return done

    # -- stop and start

    @property
    def _stop_grace(self) -> float:
        """How long the engine may still be stopping a container after it was asked to."""
        return self.stop_timeout + 5.0

    def quiesce(self, containers: list[Container]) -> None:
        """Write the record of `containers`, then stop (or pause) them one by one. Whatever was
        stopped before a failure is remembered, so `resume` starts it again."""
        self._write_record([Stopped(c.id, c.name) for c in containers])
        for container in containers:
            self.stopped.append(Stopped(container.id, container.name))
            self._settle_until = time.time() + self._stop_grace
            if self.mode == "pause":
                container.pause()
            else:
                container.stop(timeout=self.stop_timeout)
            self._settle_until = 0.0
            logger.info("%s container %s", "paused" if self.mode == "pause" else "stopped",
                        container.name)

    def resume(self) -> None:
        """Start (or unpause) every container this run stopped, in reverse order, trying all of
        them even if one fails. A container whose stop was interrupted is still being stopped
        by the engine: wait for that to finish, then start it. Remove the record once all are
        running. Raise RuntimeError naming those that could not be started."""
        failures = []
        for entry in reversed(self.stopped):
            try:
                _start(self.client, entry, self._settle_until)
            except docker.errors.DockerException as exc:
                failures.append(f"{entry.name}: {exc}")
        if failures:
            raise RuntimeError("could not start again: " + "; ".join(failures))
        self.stopped = []
        self._settle_until = 0.0
        self.record_path.unlink(missing_ok=True)

    def reconcile(self) -> list[str]:
        """Start again every container in a record left by an earlier, killed run; remove the
        record. Return their names. The engine may still be finishing a stop the killed run
        asked for, so containers still running are watched until the record is older than the
        stops could take. Raise RuntimeError if one cannot be started (the record is kept for
        the next try)."""
        record = read_record(self.record_path, ("stop", "pause"))
        if record is None:
            return []
        written = self.record_path.stat().st_mtime
        entries = [Stopped(e["id"], e["name"]) for e in record["containers"]]
        logger.warning("an earlier run was interrupted with the application quiesced; "
                       "starting %s again", ", ".join(e.name for e in entries) or "nothing")
        self.stopped = entries
        grace = max(self._stop_grace, record.get("stop_timeout", 0) + 5.0)
        self._settle_until = written + len(entries) * grace
        self.resume()
        return [e.name for e in entries]

    def _write_record(self, entries: list[Stopped]) -> None:
        write_record(self.record_path, {"mode": self.mode, "stop_timeout": self.stop_timeout,
                                        "containers": [e.__dict__ for e in entries]})


def _start(client: docker.DockerClient, entry: Stopped, settle_until: float) -> None:
    """Start (or unpause) the container unless it runs. Until `settle_until` (epoch seconds) a
    running container may be one the engine is still stopping: wait for it to stop first."""
    try:
        container = client.containers.get(entry.id)
        remaining = settle_until - time.time()
        if container.status == "running" and remaining > 0:
            try:
                client.api.wait(entry.id, timeout=remaining, condition="not-running")
            except requests.exceptions.RequestException:
                pass
            container.reload()
    except docker.errors.NotFound:
        logger.warning("container %s no longer exists; nothing to start", entry.name)
        return
    status = container.status
    if status == "paused":
        container.unpause()
    elif status != "running":
        container.start()
    else:
        return
    logger.info("started container %s again", entry.name)


def _own_container_id() -> str | None:
    """The id of the container this agent runs in, if any (from /proc/self/mountinfo)."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if "/containers/" in line and "/hostname" in line:
            part = line.split("/containers/", 1)[1].split("/", 1)[0]
            if len(part) == 64:
                return part
    return None


@dataclass
class Window:
    """When the application was stopped, and for how long."""

    stopped_at: datetime
    downtime: float = 0.0


@contextmanager
def application_stopped(quiescer: AppQuiescer, selector: LabelSelector, project: str,
                        guard: InterruptGuard, job: Job) -> Iterator[Window]:
    """1.a stop the application for the block; 1.c start it again whatever happens."""
    window = Window(datetime.now(UTC))
    started = time.monotonic()
    try:
        with job.step("1.a stop the application"):
            selected = quiescer.select(selector, project)
            if not selected:
                logger.warning("%s; going on without stopping anything",
                               quiescer.nothing_selected(selector))
            window.stopped_at = datetime.now(UTC)
            quiescer.quiesce(selected)
        yield window
    finally:
        with guard.shielded(), job.step("1.c start the application"):
            quiescer.resume()
        window.downtime = time.monotonic() - started
        logger.info("application downtime: %.2f s", window.downtime)
