"""The `signal` quiescer: freezes the application's processes with SIGSTOP and thaws them with
SIGCONT, for a source agent that shares the application's PID namespace — a sidecar in a Pod
with `shareProcessNamespace: true`, or a container run with `--pid container:<app>` — or runs
on the host. No Docker or Kubernetes API is needed.

The processes are those whose command line matches SIGNAL_PROCESSES; never the agent itself,
its parents or its children, and never PID 1 of the agent's own PID namespace (the kernel does
not let a process stop its namespace's init). Before the first SIGSTOP a record names each
process by pid *and* start time (`/proc/<pid>/stat` field 22), so SIGCONT never reaches a
process that took over a recycled pid, and a run that was killed is repaired by the next one
(`reconcile`). Processes are stopped parents first and continued children first, so no parent
sees a stopped child.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import LabelSelector
from agent.quiesce.record import read_record, write_record

logger = logging.getLogger(__name__)

MODE = "signal"
# A process that forks while its siblings are being stopped is caught by another look; one
# that keeps appearing after this many looks is an error.
_ROUNDS = 5


@dataclass(frozen=True)
class Process:
    pid: int
    start: int  # clock ticks after boot: with the pid, names the process for good
    name: str  # the start of its command line, for the logs

    def __str__(self) -> str:
        return f"{self.pid} ({self.name})"


@dataclass(frozen=True)
class Stat:
    state: str
    ppid: int
    start: int


def parse_stat(text: str) -> Stat:
    """Given the text of /proc/<pid>/stat, return its state (field 3), parent (4) and start time
    (22). The command name (field 2) may hold spaces and parentheses: fields are counted from
    its last `)`. Raise ValueError if the text is not such a line."""
    head, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or "(" not in head or len(fields) < 20:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    return Stat(fields[0], int(fields[1]), int(fields[19]))


class ProcessTable:
    """The processes visible in a /proc (the caller's PID namespace)."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root

    def pids(self) -> list[int]:
        return sorted(int(entry.name) for entry in self.root.iterdir() if entry.name.isdigit())

    def stat(self, pid: int) -> Stat | None:
        try:
            return parse_stat((self.root / str(pid) / "stat").read_text())
        except (OSError, ValueError):
            return None  # gone, or not readable

    def cmdline(self, pid: int) -> str:
        try:
            raw = (self.root / str(pid) / "cmdline").read_bytes()
        except OSError:
            return ""
        return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")

    def namespace(self) -> str:
        """The caller's PID namespace, e.g. `pid:[4026531836]`."""
        return os.readlink(self.root / "self" / "ns" / "pid")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def descendants(stats: dict[int, Stat], roots: set[int]) -> set[int]:
    """Given every process's stat, return `roots` and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def family(stats: dict[int, Stat], own: int) -> set[int]:
    """Given every process's stat and the agent's pid, return the pids never to stop: the
    agent, its ancestors and its descendants."""
    ancestors = {own}
    pid = own
    while pid in stats and stats[pid].ppid > 0 and stats[pid].ppid not in ancestors:
        pid = stats[pid].ppid
        ancestors.add(pid)
    return ancestors | descendants(stats, {own})


class SignalQuiescer:
    """Stops processes with SIGSTOP and remembers them, on disk first, then in memory."""

    verb = "freeze (SIGSTOP)"

    def __init__(
        self, record_path: Path, pattern: str, stop_timeout: int, table: ProcessTable | None = None
    ) -> None:
        self.record_path = record_path
        self.pattern = re.compile(pattern)
        self.stop_timeout = stop_timeout
        self.table = table or ProcessTable()
        self.stopped: list[Process] = []

    def nothing_selected(self, selector: LabelSelector) -> str:
        return f"no process matches SIGNAL_PROCESSES {self.pattern.pattern!r}"

    # -- selecting

    def select(self, selector: LabelSelector | None = None, project: str = "") -> list[Process]:
        """Return the running processes whose command line matches the pattern, and their
        descendants, oldest first (parents before children), without the agent's own family.
        `selector` and `project` (Docker labels) do not apply here. Raise RuntimeError if PID 1
        matches: it cannot be stopped from inside its namespace."""
        stats = {pid: s for pid in self.table.pids() if (s := self.table.stat(pid)) is not None}
        excluded = family(stats, os.getpid())
        chosen: dict[int, str] = {}
        for pid, stat in stats.items():
            if pid in excluded or stat.state in ("Z", "X"):
                continue
            command = self.table.cmdline(pid)
            if not command or not self.pattern.search(command):
                continue
            if pid == 1:
                raise RuntimeError(
                    f"process 1 ({command[:60]}) matches SIGNAL_PROCESSES, but the first process "
                    "of a PID namespace ignores SIGSTOP from inside it: run the application "
                    "under an init (`docker run --init`, tini) or in a Pod with "
                    "shareProcessNamespace: true, or narrow SIGNAL_PROCESSES"
                )
            chosen[pid] = command
        for pid in descendants(stats, set(chosen)) - excluded - set(chosen):
            if stats[pid].state not in ("Z", "X"):
                chosen[pid] = self.table.cmdline(pid)
        found = [Process(pid, stats[pid].start, command[:60]) for pid, command in chosen.items()]
        return sorted(found, key=lambda p: (p.start, p.pid))

    def run_label_commands(
        self,
        label: str,
        selector: LabelSelector | None = None,
        project: str = "",
        source_id: str = "",
    ) -> list[str]:
        """Pre- and post-commands are Docker labels: there are none to run in this mode."""
        return []

    # -- stop and continue

    def quiesce(self, processes: list[Process]) -> None:
        """Write the record, then SIGSTOP the processes and wait until each is stopped; look
        again for matching processes forked meanwhile and stop those too. Whatever was signalled
        before a failure is remembered, so `resume` continues it. Raise RuntimeError naming the
        processes that did not stop within STOP_TIMEOUT or kept appearing."""
        batch = processes
        for _ in range(_ROUNDS):
            known = {(p.pid, p.start) for p in self.stopped}
            batch = [p for p in batch if (p.pid, p.start) not in known]
            if not batch:
                return
            self._write_record(self.stopped + batch)
            for process in batch:
                self.stopped.append(process)
                if self._signal(process, signal.SIGSTOP):
                    logger.info("stopped process %s", process)
            self._wait_stopped(batch)
            batch = self.select()
        raise RuntimeError(
            "processes matching SIGNAL_PROCESSES keep appearing while the others "
            f"are stopped: {', '.join(map(str, batch))}"
        )

    def _wait_stopped(self, processes: list[Process]) -> None:
        deadline = time.monotonic() + max(self.stop_timeout, 1)
        waiting = list(processes)
        while waiting:
            waiting = [p for p in waiting if self._state(p) not in (None, "T", "t", "Z", "X")]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"not stopped after {self.stop_timeout} s (STOP_TIMEOUT): "
                    + ", ".join(map(str, waiting))
                )
            time.sleep(0.01)

    def _state(self, process: Process) -> str | None:
        """The process's state letter, or None if it is gone (or its pid now names another)."""
        stat = self.table.stat(process.pid)
        return stat.state if stat is not None and stat.start == process.start else None

    def _signal(self, process: Process, signum: int) -> bool:
        """Send `signum` to the process if it still is the one recorded. Return whether it was
        sent. A pidfd pins the process while its start time is checked, so a pid recycled in
        between is never signalled."""
        try:
            fd = os.pidfd_open(process.pid)
        except ProcessLookupError:
            return False
        except OSError:  # no pidfd (kernel < 5.3): check, then signal by pid
            fd = -1
        try:
            state = self._state(process)
            if state is None:
                logger.info("process %s is gone; nothing to signal", process)
                return False
            if fd >= 0:
                signal.pidfd_send_signal(fd, signum)
            else:
                os.kill(process.pid, signum)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            if signum == signal.SIGCONT and state not in ("T", "t"):
                return False  # never stopped (the SIGSTOP was refused too): nothing to undo
            raise RuntimeError(
                f"may not send {signal.Signals(signum).name} to process {process}: give the "
                "agent the KILL capability, or run it as the application's user"
            ) from None
        finally:
            if fd >= 0:
                os.close(fd)

    def resume(self) -> None:
        """SIGCONT every process this run stopped, children first, trying all of them even if
        one fails. Remove the record once all are continued. Raise RuntimeError naming those
        that could not be continued."""
        failures = []
        for process in reversed(self.stopped):
            try:
                if self._signal(process, signal.SIGCONT):
                    logger.info("continued process %s", process)
            except (OSError, RuntimeError) as exc:
                failures.append(f"{process}: {exc}")
        if failures:
            raise RuntimeError("could not continue: " + "; ".join(failures))
        self.stopped = []
        self.record_path.unlink(missing_ok=True)

    def reconcile(self) -> list[str]:
        """SIGCONT every process in a record left by an earlier, killed run that is still the
        process recorded; remove the record. Return their names. A record from another PID
        namespace or boot names processes that are gone: it is dropped with a warning. Raise
        RuntimeError if one cannot be continued (the record is kept for the next try)."""
        record = read_record(self.record_path, (MODE,))
        if record is None:
            return []
        processes = [
            Process(int(e["pid"]), int(e["start"]), str(e["name"])) for e in record["processes"]
        ]
        if (record.get("namespace"), record.get("boot_id")) != (self.table.namespace(), _boot_id()):
            logger.warning(
                "an earlier run was interrupted with processes stopped in another PID "
                "namespace or before a reboot (%s); they are not here, dropping the "
                "record",
                ", ".join(map(str, processes)),
            )
            self.record_path.unlink()
            return []
        logger.warning(
            "an earlier run was interrupted with the application quiesced; continuing %s",
            ", ".join(map(str, processes)) or "nothing",
        )
        self.stopped = processes
        self.resume()
        return [str(p) for p in processes]

    def _write_record(self, processes: list[Process]) -> None:
        body: dict[str, Any] = {
            "mode": MODE,
            "namespace": self.table.namespace(),
            "boot_id": _boot_id(),
            "processes": [p.__dict__ for p in processes],
        }
        write_record(self.record_path, body)
