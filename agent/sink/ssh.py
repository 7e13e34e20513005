"""A thin adapter over the OpenSSH client and rsync: the sink talking to one source's gateway.

The sink logs in with its key and its CA-signed certificate, pins the source's host key
(known_hosts, strict checking) and never asks for anything interactively. Everything the
source sends is bounded before the sink parses it: the `list` output (LIST_LIMIT), each
manifest (manifest.MAX_SIZE, refused by rsync before it travels).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.config import SinkConfig, SourceEndpoint
from agent.core import generation, manifest
from agent.core.manifest import Manifest
from agent.runtime import processes
from agent.sink.incoming import PARTIAL_DIR

logger = logging.getLogger(__name__)

LIST_LIMIT = 1 << 20  # about 15 000 waiting generations
_ANSWER_LIMIT = 64 * 1024
_SSH_FAILED = 255
_SOME_FILES_MISSING = (23, 24)  # rsync: "partial transfer due to error", "vanished source files"
_SSHD_NOISE = "Could not chdir to home directory"
_GATEWAY_REFUSAL = "backup-agent gateway: "


class SshError(Exception):
    """The source could not be reached or refused; the message names the cause and the fix."""


@dataclass(frozen=True)
class TransferStats:
    bytes_received: int = 0
    bytes_sent: int = 0

    def __add__(self, other: TransferStats) -> TransferStats:
        return TransferStats(
            self.bytes_received + other.bytes_received, self.bytes_sent + other.bytes_sent
        )


@dataclass(frozen=True)
class Gateway:
    config: SinkConfig
    source: SourceEndpoint
    user: str

    def ssh_argv(self) -> list[str]:
        c = self.config
        return [
            "ssh",
            "-p",
            str(self.source.port),
            "-i",
            str(c.ssh_key),
            "-o",
            f"CertificateFile={c.ssh_cert}",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={c.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={c.connect_timeout}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "LogLevel=ERROR",
            "-T",
            "-l",
            self.user,
        ]

    def _fail(self, what: str, process: processes.Outcome) -> SshError:
        # sshd's note about the gateway users' missing home directory is noise; the gateway's
        # own one-line refusal is the message when there is one.
        lines = [
            line
            for line in process.stderr.strip().splitlines()
            if line.strip() and not line.startswith(_SSHD_NOISE)
        ]
        refusals = [line for line in lines if line.startswith(_GATEWAY_REFUSAL)]
        message = " ".join(refusals[-1:] or lines[-2:]) or f"exit {process.returncode}"
        where = f"{self.user}@{self.source.host}:{self.source.port}"
        if process.returncode != _SSH_FAILED:
            return SshError(f"source {self.source.id} ({where}) refused {what}: {message}")
        if "Permission denied" in process.stderr:
            cert = self.config.ssh_cert
            return SshError(
                f"source {self.source.id} ({where}) refused the sink's certificate "
                f"({message}){self._certificate_problem()}; check SINK_SSH_CERT with "
                f"`ssh-keygen -L -f {cert}`: Valid must include now, Principals "
                f"must include {self.user}, the Signing CA must be the user CA in "
                "the source's TrustedUserCAKeys, a source-address must include "
                "the sink's address, and it must certify SINK_SSH_KEY"
            )
        pinned = f"[{self.source.host}]:{self.source.port}"
        if "IDENTIFICATION HAS CHANGED" in process.stderr:
            found = re.search(r"SHA256:[A-Za-z0-9+/=]+", process.stderr)
            return SshError(
                f"source {self.source.id} ({where}) is not the host pinned in "
                f"SINK_KNOWN_HOSTS: its host key ({found[0] if found else 'unknown'}) differs "
                "from the pinned one. Someone may be intercepting the connection (a "
                "man-in-the-middle attack); nothing was sent. Only if the source's host key "
                "was replaced on purpose: compare the new fingerprint out of band (on the "
                f"source: `ssh-keygen -lf` of its host key), then pin it for {pinned} in "
                "SINK_KNOWN_HOSTS"
            )
        if "Host key verification failed" in process.stderr:
            fix = (
                f"pin the host key of {pinned} in SINK_KNOWN_HOSTS (compare its fingerprint "
                "with the source's out of band)"
            )
        else:
            fix = (
                f"check {self.source.id}'s host and port in SINK_SOURCES and that its sshd "
                "is running"
            )
        return SshError(
            f"cannot reach source {self.source.id} at {where} over SSH ({message}); {fix}"
        )

    def _certificate_problem(self) -> str:
        """What `ssh-keygen -L` shows is wrong with the certificate, as `: <finding>`, or ''."""
        try:
            shown = processes.run(
                ["ssh-keygen", "-L", "-f", str(self.config.ssh_cert)],
                _ANSWER_LIMIT,
                env={**os.environ, "TZ": "UTC"},
            )
        except (OSError, processes.OutputTooLarge):
            return ""
        if "is not a certificate" in shown.stderr:
            return f": {self.config.ssh_cert} is not a certificate (a plain public key?)"
        if shown.returncode != 0:
            return f": ssh-keygen cannot read it ({shown.stderr.strip()[-200:]})"
        finding = certificate_problem(shown.stdout, self.user, datetime.now(UTC))
        return f": {finding}" if finding else ""

    def command(self, *words: str, limit: int = _ANSWER_LIMIT, stdin: bytes | None = None) -> str:
        """Run a gateway command (given `stdin`); return its output. Raise SshError, also when
        the output is longer than `limit` bytes."""
        try:
            process = processes.run(
                [*self.ssh_argv(), self.source.host, shlex.join(words)], limit, stdin=stdin
            )
        except processes.OutputTooLarge:
            raise SshError(
                f"source {self.source.id} sent more than {limit} bytes for "
                f"`{words[0]}`; the sink reads no more (is the source's forced "
                "command `backup-agent gateway`?)"
            ) from None
        if process.returncode != 0:
            raise self._fail(" ".join(words), process)
        return process.stdout

    def list(self) -> list[str]:
        """Return the ids of the complete generations the source offers, oldest first."""
        try:
            listed = json.loads(self.command("list", limit=LIST_LIMIT))
            ids = [entry["generation"] for entry in listed]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise SshError(f"source {self.source.id} sent an unreadable list ({exc})") from None
        for gen in ids:
            generation.parse(gen)
        return sorted(ids)

    def ack(self, gen: str, report: bytes | None = None) -> str:
        """Acknowledge `gen` (with the sink's `report` of a chunked generation: see
        chunks.pulled); return the gateway's line saying what the source did with it."""
        generation.parse(gen)
        return self.command("ack", gen, stdin=report).strip()

    def fetch_packs(self, root: str, names: builtins.list[str], target: Path) -> TransferStats:
        """rsync the packs `names` (`<2 hex>/<id>.pack`) from the gateway's `root` (see
        chunks.pulled) into `target`, resuming partial files left there (PARTIAL_DIR); a pack
        that is not there is not an error (the caller checks what arrived). Raise SshError."""
        target.mkdir(parents=True, exist_ok=True)
        listing = target.parent / f".{target.name}.files-from"
        listing.write_bytes(b"".join(name.encode() + b"\0" for name in names))
        try:
            return self._rsync(
                [
                    f"--files-from={listing}",
                    "--from0",
                    "--times",
                    "--partial",
                    f"--partial-dir={PARTIAL_DIR}",
                    "--stats",
                ],
                f"{root}/",
                f"{target}/",
                tolerate=_SOME_FILES_MISSING,
            )
        finally:
            listing.unlink(missing_ok=True)

    def fetch_manifest(self, gen: str, target: Path) -> tuple[Manifest, TransferStats]:
        """rsync the manifest of `gen`, alone, into `target` (new, or left by an earlier try)
        and return it. Raise SshError, or InvalidManifest (also for one larger than
        manifest.MAX_SIZE: rsync refuses to fetch it)."""
        generation.parse(gen)
        target.mkdir(parents=True, exist_ok=True)
        (target / manifest.NAME).unlink(missing_ok=True)
        stats = self._rsync(
            ["--times", f"--max-size={manifest.MAX_SIZE}"],
            f"{gen}/{manifest.NAME}",
            str(target / manifest.NAME),
        )
        if not (target / manifest.NAME).exists():
            raise manifest.InvalidManifest(
                f"the {manifest.NAME} of {gen} on {self.source.id} is larger than "
                f"{manifest.MAX_SIZE} bytes; the sink does not fetch it"
            )
        return manifest.read(target, manifest.MAX_SIZE), stats

    def fetch(
        self, gen: str, target: Path, basis: Path | None, links: bool, checksum: bool
    ) -> TransferStats:
        """rsync the generation `gen` but its manifest (see fetch_manifest) into `target`,
        resuming a partial transfer left there (PARTIAL_DIR), with `basis` (the newest
        generation already stored) as the reference, so unchanged files are hardlinked rather
        than sent and grown files travel as deltas.

        links     symbolic links come over as links made harmless (`--munge-links`: they
                  point nowhere), for the verification to find and refuse them; otherwise
                  rsync leaves them out
        checksum  compare files by their content instead of size and time (after a failed
                  verification: a bad copy can have the size and time of the right file)"""
        generation.parse(gen)
        options = [
            "--recursive",
            "--perms",
            "--times",
            "--hard-links",
            "--delete",
            "--partial",
            f"--partial-dir={PARTIAL_DIR}",
            f"--exclude=/{manifest.NAME}",
            "--stats",
        ]
        if links:
            options += ["--links", "--munge-links"]
        if checksum:
            options.append("--checksum")
        if basis is not None:
            options.append(f"--link-dest={basis}")
        return self._rsync(options, f"{gen}/", f"{target}/")

    def _rsync(
        self,
        options: builtins.list[str],
        remote: str,
        local: str,
        tolerate: tuple[int, ...] = (),
    ) -> TransferStats:
        # rsync's own children (its receiver, ssh) do not inherit processes.run's death signal:
        # ssh asks for one of its own (util-linux's setpriv), the receiver ends with ssh.
        rsh = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
        argv = [
            "rsync",
            *options,
            "--rsh",
            shlex.join([*rsh, *self.ssh_argv()]),
            f"{self.source.host}:{remote}",
            local,
        ]
        process = processes.run(argv)
        if process.returncode != 0 and process.returncode not in tolerate:
            raise self._fail(f"the rsync of {remote}", process)
        return _stats(process.stdout)


def certificate_problem(listing: str, user: str, now: datetime) -> str:
    """Given what `ssh-keygen -L` (in UTC) shows of a certificate, return what makes it unfit
    for logging in as `user` at `now`, as far as the sink can tell, or ''."""
    fields: dict[str, list[str]] = {}
    label = ""
    for line in listing.splitlines():
        item = re.fullmatch(r" {16}(\S.*)", line)
        field = re.fullmatch(r" {8}(\w[\w ]*): ?(.*)", line)
        if field:
            label = field[1]
            fields[label] = [field[2]] if field[2] and field[2] != "(none)" else []
        elif item and label:
            fields[label].append(item[1])
    valid = " ".join(fields.get("Valid", []))
    after = re.search(r"(?:from|after) (\S+)", valid)
    before = re.search(r"(?:to|before) (\d\S+)", valid)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S")
    if before and before[1] <= stamp:
        return f"it expired on {before[1]} UTC"
    if after and after[1] > stamp:
        return f"it is not valid before {after[1]} UTC"
    principals = fields.get("Principals", [])
    if user not in principals:
        return f"it has no principal {user} (it names {', '.join(principals) or 'none'})"
    for option in fields.get("Critical Options", []):
        if option.startswith("source-address "):
            return f"it may be used only from {option.split(' ', 1)[1]}"
    return ""


def _stats(output: str) -> TransferStats:
    values = {}
    for line in output.splitlines():
        key, _, value = line.partition(":")
        number = value.strip().split(" ")[0].replace(",", "")
        if number.isdigit():
            values[key.strip()] = int(number)
    return TransferStats(values.get("Total bytes received", 0), values.get("Total bytes sent", 0))
