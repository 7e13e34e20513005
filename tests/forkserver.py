"""Runs of the agent killed at a chosen point, for the tests that kill it at many points.

Such a test runs the agent a few hundred times, and most of each run's CPU is Python starting
and importing the agent (about half a CPU-second; the file system work it is killed in is far
less). So these runs are forked from one server process that imported the agent once. Each
run is still a process of its own: its own pid, environment, working directory, standard
output and error, SIGKILLed by the kernel, and what it left on disk is what the test checks.

The kills are deterministic: before it runs the agent's `__main__`, the forked child installs
an audit hook that counts the file system changes it makes (Python's audit events for
rename, mkdir, rmdir, remove, chmod, chown, utime) and SIGKILLs the child just before the
`at`-th one (counting only those naming `on`, if given), so "killed at point N" means the
first N - 1 changes happened and no other. `at=0` runs the agent to its end.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the commands the kill tests run (restore, source reconcile) import when they start.
PRELOAD = (
    "agent.cli",
    "agent.recovery.jobs",
    "agent.recovery.restore",
    "agent.source.jobs",
    "agent.quiesce.docker",
    "agent.swap.journal",
    "agent.chunks.reader",
    "agent.chunks.unpack",
)

SERVER = r"""
import importlib, json, os, runpy, signal, sys, traceback

for name in sys.argv[1:]:
    importlib.import_module(name)

CHANGES = {"os.rename", "os.mkdir", "os.rmdir", "os.remove", "os.chmod", "os.chown", "os.utime"}


def child(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    at, needle, seen = request["at"], request["on"], [0]

    def hook(event, args):
        if event in CHANGES and (not needle or any(needle in str(a) for a in args[:2])):
            seen[0] += 1
            if seen[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)

    if at:
        sys.addaudithook(hook)
    sys.argv = ["backup-agent", *request["args"]]
    code = 0
    try:
        runpy.run_module("agent", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(json.dumps({"returncode": code}), flush=True)
"""


class ForkServer:
    """A Python that imported `PRELOAD` and forks one agent run per request, in turn."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, *PRELOAD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )

    def run(
        self, env: dict[str, str], args: list[str], at: int = 0, on: str = "", timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run `backup-agent *args` with `env` (killed at point `at`, as the module says) and
        return what a subprocess.run with capture_output would."""
        assert self.process.stdin is not None and self.process.stdout is not None
        with tempfile.TemporaryDirectory(prefix="agent-run-") as directory:
            out, err = Path(directory) / "stdout", Path(directory) / "stderr"
            request = {
                "cwd": str(ROOT),
                "env": env,
                "args": args,
                "at": at,
                "on": on,
                "stdout": str(out),
                "stderr": str(err),
            }
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            if not ready:
                self.close()
                raise subprocess.TimeoutExpired(["backup-agent", *args], timeout)
            reply = self.process.stdout.readline()
            if not reply:
                raise RuntimeError(f"the fork server ended (exit {self.process.wait()})")
            return subprocess.CompletedProcess(
                ["backup-agent", *args],
                json.loads(reply)["returncode"],
                out.read_text(errors="replace"),
                err.read_text(errors="replace"),
            )

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


_server: ForkServer | None = None


def killed_run(
    env: dict[str, str], at: int, *args: str, on: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run the agent, killed just before its `at`-th file system change (counting only those
    naming `on`, if given); at=0: not killed."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = ForkServer()
        atexit.register(_server.close)
    return _server.run(env, list(args), at, on)


def forked_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the agent to its end, forked like killed_run (for the runs between the kills)."""
    return killed_run(env, 0, *args)
