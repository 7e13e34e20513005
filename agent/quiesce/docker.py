"""The Docker quiescer (`QUIESCE_MODE` `stop` and `pause`): stops or pauses the application's
containers through the Docker API and starts them again.

Before it stops anything it writes a record of what it is about to stop, so a run that was
killed is repaired by the next one (`reconcile`). It restarts exactly the containers this run
stopped, in reverse order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container

from agent.config import LabelSelector
from agent.quiesce.record import read_record, write_record

logger = logging.getLogger(__name__)

COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
# A container with this label, valued with a SOURCE_ID, receives that agent's pre-, pre-stop and
# post-commands even when the agent does not stop it (e.g. a database that is dumped instead).
AGENT_LABEL = "backup.agent"


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
            "into the agent's container or set DOCKER_HOST"
        ) from None
    return client


@dataclass(frozen=True)
class Stopped:
    id: str
    name: str


class DockerQuiescer:
    """Stops or pauses containers and remembers them, on disk first, then in memory."""

    def __init__(
        self, client: docker.DockerClient, record_path: Path, mode: str, stop_timeout: int
    ) -> None:
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

    def _filters(self, labels: list[str], project: str) -> dict[str, str | list[str] | bool]:
        labels = labels + ([f"{COMPOSE_PROJECT_LABEL}={project}"] if project else [])
        return {"label": labels, "status": "running"}

    def select(self, selector: LabelSelector, project: str) -> list[Container]:
        """Return the running containers with the stop label (in this compose project, if
        given), in a stable order, never the agent's own container."""
        own = _own_container_id()
        found = self.client.containers.list(
            filters=self._filters([selector.docker_filter()], project)
        )
        return sorted((c for c in found if c.id != own), key=_name)

    # -- commands before and after the stop

    def run_label_commands(
        self, label: str, selector: LabelSelector, project: str, source_id: str
    ) -> list[str]:
        """Run the value of `label` as a shell command (`sh -c`) in each running container
        of this run that has it: those the stop label selects (in this compose project, if
        given) and those whose AGENT_LABEL names `source_id`; never in another stack's
        containers. Return the names of the containers. Raise CommandFailed naming the
        container, the exit code and the end of the output when one fails."""
        chosen = {
            c.id: c
            for c in self.client.containers.list(
                filters=self._filters([label, selector.docker_filter()], project)
            )
        }
        chosen.update(
            (c.id, c)
            for c in self.client.containers.list(
                filters=self._filters([label, f"{AGENT_LABEL}={source_id}"], "")
            )
        )
        done = []
        for container in sorted(chosen.values(), key=_name):
            command = container.labels[label]
            logger.info("running %s in %s: %s", label, container.name, command)
            result = container.exec_run(["sh", "-c", command])
            # not streamed: the whole output, as bytes (None when there was none)
            raw = result.output if isinstance(result.output, bytes) else b""
            output = raw.decode(errors="replace").strip()
            if result.exit_code != 0:
                raise CommandFailed(
                    f"{label} in container {container.name} exited with "
                    f"{result.exit_code}: {output[-500:]}"
                )
            done.append(_name(container))
        return done

    # -- stop and start

    @property
    def _stop_grace(self) -> float:
        """How long the engine may still be stopping a container after it was asked to."""
        return self.stop_timeout + 5.0

    def quiesce(self, containers: list[Container]) -> None:
        """Write the record of `containers`, then stop (or pause) them one by one. Whatever was
        stopped before a failure is remembered, so `resume` starts it again."""
        self._write_record([_stopped(c) for c in containers])
        for container in containers:
            self.stopped.append(_stopped(container))
            self._settle_until = time.time() + self._stop_grace
            if self.mode == "pause":
                container.pause()
            else:
                container.stop(timeout=self.stop_timeout)
            self._settle_until = 0.0
            logger.info(
                "%s container %s", "paused" if self.mode == "pause" else "stopped", container.name
            )

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
        logger.warning(
            "an earlier run was interrupted with the application quiesced; starting %s again",
            ", ".join(e.name for e in entries) or "nothing",
        )
        self.stopped = entries
        grace = max(self._stop_grace, record.get("stop_timeout", 0) + 5.0)
        self._settle_until = written + len(entries) * grace
        self.resume()
        return [e.name for e in entries]

    def _write_record(self, entries: list[Stopped]) -> None:
        write_record(
            self.record_path,
            {
                "mode": self.mode,
                "stop_timeout": self.stop_timeout,
                "containers": [e.__dict__ for e in entries],
            },
        )


def _name(container: Container) -> str:
    """A listed container's name (the API always gives one)."""
    return container.name or ""


def _stopped(container: Container) -> Stopped:
    assert container.id is not None, "a listed container has an id"
    return Stopped(container.id, _name(container))


def _start(client: docker.DockerClient, entry: Stopped, settle_until: float) -> None:
    """Start (or unpause) the container unless it runs. Until `settle_until` (epoch seconds) a
    running container may be one the engine is still stopping: wait for it to stop first."""
    try:
        container = client.containers.get(entry.id)
        remaining = settle_until - time.time()
        if container.status == "running" and remaining > 0:
            with contextlib.suppress(requests.exceptions.RequestException):
                client.api.wait(entry.id, timeout=math.ceil(remaining), condition="not-running")
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
