"""A thin adapter over the OpenSSH client and rsync: the sink talking to one source's gateway.

The sink logs in with its key and its CA-signed certificate, pins the source's host key
(known_hosts, strict checking) and never asks for anything interactively.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent import generation
from agent.config import SinkConfig, SourceEndpoint

logger = logging.getLogger(__name__)

_SSH_FAILED = 255
_SSHD_NOISE = "Could not chdir to home directory"
_GATEWAY_REFUSAL = "backup-agent gateway: "


class SshError(Exception):
    """The source could not be reached or refused; the message names the cause and the fix."""


@dataclass(frozen=True)
class TransferStats:
    bytes_received: int = 0
    bytes_sent: int = 0


@dataclass(frozen=True)
class Gateway:
    config: SinkConfig
    source: SourceEndpoint
    user: str

    def ssh_argv(self) -> list[str]:
        c = self.config
        return ["ssh", "-p", str(self.source.port), "-i", str(c.ssh_key),
                "-o", f"CertificateFile={c.ssh_cert}", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={c.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", f"ConnectTimeout={c.connect_timeout}",
                "-o", "ServerAliveInterval=15", "-o", "LogLevel=ERROR", "-T",
                "-l", self.user]

    def _fail(self, what: str, process: subprocess.CompletedProcess[str]) -> SshError:
        # sshd's note about the gateway users' missing home directory is noise; the gateway's
        # own one-line refusal is the message when there is one.
        lines = [line for line in process.stderr.strip().splitlines()
                 if line.strip() and not line.startswith(_SSHD_NOISE)]
        refusals = [line for line in lines if line.startswith(_GATEWAY_REFUSAL)]
        message = " ".join(refusals[-1:] or lines[-2:]) or f"exit {process.returncode}"
        where = f"{self.user}@{self.source.host}:{self.source.port}"
        if process.returncode == _SSH_FAILED:
            return SshError(f"cannot reach source {self.source.id} at {where} over SSH "
                            f"({message}); {self._fix(process.stderr)}")
        return SshError(f"source {self.source.id} ({where}) refused {what}: {message}")

    def _fix(self, stderr: str) -> str:
        """What to check, from what ssh said."""
        if "Permission denied" in stderr:
            return (f"the source refused the sink's key: SINK_SSH_CERT must be a certificate of "
                    f"SINK_SSH_KEY signed by the source's user CA, valid now, for the principal "
                    f"{self.user} (`ssh-keygen -L -f` shows it)")
        if "Host key verification failed" in stderr or "IDENTIFICATION HAS CHANGED" in stderr:
            return (f"pin the host key of [{self.source.host}]:{self.source.port} in "
                    "SINK_KNOWN_HOSTS")
        return (f"check {self.source.id}'s host and port in SINK_SOURCES and that its sshd "
                "is running")

    def command(self, *words: str) -> str:
        """Run a gateway command; return its output. Raise SshError."""
        process = subprocess.run([*self.ssh_argv(), self.source.host, shlex.join(words)],
                                 capture_output=True, text=True, check=False)
        if process.returncode != 0:
            raise self._fail(" ".join(words), process)
        return process.stdout

    def list(self) -> list[str]:
        """Return the ids of the complete generations the source offers, oldest first."""
        try:
            listed = json.loads(self.command("list"))
            ids = [entry["generation"] for entry in listed]
        except (ValueError, KeyError, TypeError) as exc:
            raise SshError(f"source {self.source.id} sent an unreadable list ({exc})") from None
        for gen in ids:
            generation.parse(gen)
        return sorted(ids)

    def ack(self, gen: str) -> None:
        generation.parse(gen)
        self.command("ack", gen)

    def fetch(self, gen: str, target: Path, basis: Path | None) -> TransferStats:
        """rsync the generation `gen` into `target`, resuming a partial transfer left there,
        with `basis` (the newest generation already stored) as the reference, so unchanged
        files are hardlinked rather than sent and grown files travel as deltas."""
        generation.parse(gen)
        target.mkdir(parents=True, exist_ok=True)
        argv = ["rsync", "--recursive", "--links", "--perms", "--times", "--hard-links",
                "--delete", "--partial", "--partial-dir=.rsync-partial", "--stats",
                "--rsh", shlex.join(self.ssh_argv())]
        if basis is not None:
            argv.append(f"--link-dest={basis}")
        argv += [f"{self.source.host}:{gen}/", f"{target}/"]
        process = _run_to_the_end(argv)
        if process.returncode != 0:
            raise self._fail(f"the rsync of {gen}", process)
        return _stats(process.stdout)


def _run_to_the_end(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` and return its outcome. If this process is interrupted meanwhile (SIGTERM
    and SIGINT become exceptions), stop the child with SIGTERM and wait for it, reading its
    output, so that rsync keeps the partial file (`--partial`) for the next run to resume —
    subprocess.run would SIGKILL it and close its pipes; then re-raise."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            stdout, stderr = process.communicate()
        except BaseException:
            process.terminate()
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _stats(output: str) -> TransferStats:
    values = {}
    for line in output.splitlines():
        key, _, value = line.partition(":")
        number = value.strip().split(" ")[0].replace(",", "")
        if number.isdigit():
            values[key.strip()] = int(number)
    return TransferStats(values.get("Total bytes received", 0), values.get("Total bytes sent", 0))
