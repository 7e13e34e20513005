#!/usr/bin/env python3
"""Benchmark of the log transport (step 3, `backup-agent sink pull-logs`): what a second pull of
logs that only grew costs on the wire, next to a plain full copy.

    python bench/pull.py [--size-mib 100] [--append-mib 1]

(run from the repository root, as root: it starts a real sshd with a user CA and the gateway
as its ForceCommand, run by the gateway user `logBackupSource`, with the fixtures' helpers in
tests/sshd.py). It

1. hands over a log generation of --size-mib MiB of text logs (`app.log` and six rotated
   `app.log.N`), and pulls it (`sink pull-logs`): the first pull, a full copy;
2. hands over a second log generation: the same logs (copied keeping their mtimes, as the
   source agent's `cp --archive` does) with --append-mib MiB appended to `app.log`;
3. copies that second generation with a plain `rsync -a --stats` over the same SSH into an
   empty directory (no basis): the baseline of a full copy;
4. pulls it (`sink pull-logs`, rsync with `--link-dest` on the first generation).

Bytes on the wire are counted by a TCP relay between the sink and sshd (everything SSH sends,
encrypted, both ways, for all of the job's SSH sessions: list, rsync, ack); the rsync figures
are rsync's `--stats` (the agent logs "N bytes received"). Target: the second pull moves
<= 2 MiB on the wire. It prints the table and writes it to bench/results/pull.md (the agent's
log to bench/results/pull-agent.log). Everything it creates (sshd, relay, temporary
directories) is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.generations import seal  # noqa: E402
from tests.sshd import (  # noqa: E402
    SshCA,
    SshdServer,
    install_gateway_agent,
    make_client_key,
    make_shared_dir,
    share_tree,
    start_sshd,
)

RESULTS = ROOT / "bench" / "results" / "pull.md"
AGENT_LOG = RESULTS.with_name("pull-agent.log")
MiB = 1 << 20
TARGET_WIRE = 2 * MiB
SOURCE_ID = "bench-source"
LOG_USER = "logBackupSource"
GEN1, GEN2 = "2026-11-28T02-00-00Z", "2026-11-29T02-00-00Z"
LOG_DIR = "srv/app/logs"
ROTATED = 6


# ---------------------------------------------------------------- counting the wire


class CountingRelay:
    """A TCP relay on 127.0.0.1 in front of sshd that counts the bytes each way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.to_source = 0
        self.to_sink = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst, up in ((client, server, True), (server, client, False)):
                thread = threading.Thread(target=self._pipe, args=(src, dst, up), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.to_source += len(data)
                    else:
                        self.to_sink += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def take(self) -> tuple[int, int]:
        """Return (bytes to the source, bytes to the sink) since the last call, once every
        connection so far has ended."""
        for thread in self._threads:
            thread.join(timeout=10)
        with self._lock:
            counts = (self.to_source, self.to_sink)
            self.to_source = self.to_sink = 0
        return counts

    def close(self) -> None:
        self.listener.close()


# ---------------------------------------------------------------- the logs


def text_log(rng: random.Random, size: int, start: int) -> bytes:
    """`size` bytes (about) of access-log lines, numbered from `start`."""
    paths = ["orders", "cart", "users", "search", "static/app.js", "health", "checkout"]
    lines = []
    total, i = 0, start
    while total < size:
        line = (
            f"2026-11-28T{i // 3_600_000 % 24:02d}:{i // 60_000 % 60:02d}:"
            f"{i // 1000 % 60:02d}.{i % 1000:03d}Z INFO web-{rng.randrange(4)} "
            f"GET /api/{rng.choice(paths)}/{rng.randrange(10**6)} "
            f"status={rng.choice((200, 200, 200, 201, 304, 404))} "
            f"ms={rng.randrange(1, 900)} req={rng.getrandbits(64):016x}\n"
        )
        lines.append(line)
        total += len(line)
        i += 1
    return "".join(lines).encode()


def first_generation(handover: Path, size: int) -> None:
    rng = random.Random(1)
    directory = handover / "logs" / GEN1 / LOG_DIR
    directory.mkdir(parents=True)
    current = size * 4 // 10
    (directory / "app.log").write_bytes(text_log(rng, current, 0))
    for n in range(1, ROTATED + 1):
        (directory / f"app.log.{n}").write_bytes(
            text_log(rng, (size - current) // ROTATED, n * 10**7)
        )
    seal(handover / "logs" / GEN1, GEN1, "logs", SOURCE_ID)
    share_tree(handover)


def second_generation(handover: Path, kept: Path, append: int) -> None:
    """The first generation's logs, copied keeping mtimes, with `append` bytes appended."""
    directory = handover / "logs" / GEN2
    subprocess.run(["cp", "--archive", str(kept), str(directory)], check=True)
    (directory / "MANIFEST.json").unlink()
    with open(directory / LOG_DIR / "app.log", "ab") as log:
        log.write(text_log(random.Random(2), append, 5 * 10**8))
    seal(directory, GEN2, "logs", SOURCE_ID)
    share_tree(handover)


# ---------------------------------------------------------------- measuring


@dataclass
class Transfer:
    name: str
    seconds: float
    fetch_seconds: float | None
    rsync_received: int
    rsync_sent: int | None
    wire_to_source: int
    wire_to_sink: int

    @property
    def wire(self) -> int:
        return self.wire_to_source + self.wire_to_sink


def pull(env: dict[str, str], relay: CountingRelay, name: str, log: list[str]) -> Transfer:
    relay.take()
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "agent", "sink", "pull-logs"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - started
    log.append(f"## {name}\n{process.stderr}")
    if process.returncode != 0:
        raise RuntimeError(f"{name}: sink pull-logs exited {process.returncode}:\n{process.stderr}")
    received = int(re.search(r"(\d+) bytes received", process.stderr)[1])
    fetch = re.search(
        r"3\.a fetch logs generation \S+ from \S+: done in ([\d.]+) s", process.stderr
    )
    return Transfer(name, seconds, float(fetch[1]), received, None, *relay.take())


def plain_rsync(rsh: str, relay: CountingRelay, gen: str, target: Path) -> Transfer:
    relay.take()
    started = time.monotonic()
    process = subprocess.run(
        ["rsync", "-a", "--stats", "--rsh", rsh, f"{LOG_USER}@127.0.0.1:{gen}/", f"{target}/"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"plain rsync exited {process.returncode}: {process.stderr}")
    stats = {
        k.strip(): int(v.split()[0].replace(",", ""))
        for k, _, v in (line.partition(":") for line in process.stdout.splitlines())
        if k.strip() in ("Total bytes sent", "Total bytes received")
    }
    return Transfer(
        "plain `rsync -a` of generation 2 into an empty directory (no basis)",
        seconds,
        None,
        stats["Total bytes received"],
        stats["Total bytes sent"],
        *relay.take(),
    )


# ---------------------------------------------------------------- the report


def mib(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / MiB:.2f} MiB" if n >= 100 * 1024 else f"{n / 1024:.1f} KiB"


def report(
    args: argparse.Namespace, rows: list[Transfer], sizes: tuple[int, int], load: str
) -> str:
    _first, baseline, second = rows
    verdict = "PASS" if second.wire <= TARGET_WIRE else "FAIL"

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    if git("status", "--porcelain", "--", "agent"):
        commit += " + uncommitted changes in agent/"
    rsync = re.search(
        r"version (\S+)",
        subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout,
    )
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.split(",")[0]
    versions = f"rsync {rsync[1] if rsync else '?'}, {ssh}"
    lines = [
        "# Pull benchmark (step 3: `backup-agent sink pull-logs`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `python bench/pull.py "
        f"--size-mib {args.size_mib} --append-mib {args.append_mib}` on {os.cpu_count()} "
        f"cores, Linux {platform.release()}, Python {platform.python_version()}, {versions}; "
        f"agent at commit {commit}; load average {load} at the start.",
        "",
        f"- Generation 1: {mib(sizes[0])} of text access logs in `{LOG_DIR}/` (`app.log` 40 %, "
        f"{ROTATED} rotated `app.log.N`). Generation 2: the same files, copied keeping their "
        f"mtimes (as the source agent's `cp --archive`), with {mib(sizes[1] - sizes[0])} of new "
        "lines appended to `app.log`.",
        "- One sshd on loopback with a user CA, `ForceCommand backup-agent gateway` run as "
        "`logBackupSource`, rsync handed to `rrsync -ro`; the sink authenticates with an "
        "ed25519 key and its certificate. Both sides on this machine.",
        "- Bytes on the wire: counted by a TCP relay between the sink and sshd, each way, for "
        "every SSH session of the job (a pull is four: `list`, the manifest's rsync, the "
        "files' rsync, `ack`); SSH-encrypted, "
        "so they include SSH's handshakes and framing. rsync bytes: rsync's `--stats` (the "
        "agent's \"bytes received\" log line; the plain rsync's own stats).",
        "- Wall time: the whole `sink pull-logs` job (four SSH logins, each starting the "
        "gateway's Python) or the plain rsync; fetch: the agent's `3.a fetch` step line.",
        "",
        "## Against the target",
        "",
        "| measurement | bytes on the wire | baseline: full copy without basis | ratio | target "
        "| result |",
        "|---|---|---|---|---|---|",
        f"| second pull (generation 2, basis generation 1) | {mib(second.wire)} | "
        f"{mib(baseline.wire)} | {second.wire / baseline.wire:.4f} | <= {mib(TARGET_WIRE)} "
        f"| **{verdict}** |",
        "",
        "## All transfers",
        "",
        "| transfer | wall time | fetch step | rsync bytes received | rsync bytes sent "
        "| wire: source → sink | wire: sink → source | wire: total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fetch = f"{row.fetch_seconds:.2f} s" if row.fetch_seconds is not None else ""
        sent = mib(row.rsync_sent) if row.rsync_sent is not None else "(not logged)"
        lines.append(
            f"| {row.name} | {row.seconds:.2f} s | {fetch} | {mib(row.rsync_received)} "
            f"| {sent} | {mib(row.wire_to_sink)} "
            f"| {mib(row.wire_to_source)} | {mib(row.wire)} |"
        )
    lines += ["", f"Overall: **{verdict}**", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--append-mib", type=int, default=1)
    args = parser.parse_args()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    work.chmod(0o755)  # the gateway users must reach what is inside
    server: SshdServer | None = None
    relay: CountingRelay | None = None
    log: list[str] = []
    try:
        handover = make_shared_dir(work / "handover")
        store = make_shared_dir(work / "store")
        env_file = work / "gateway.env"
        env_file.write_text(f"HANDOVER_DIR={handover}\nSOURCE_STORE_DIR={store}\n")
        agent = install_gateway_agent(work / "agent")
        ca_dir = work / "ca"
        ca_dir.mkdir(mode=0o700)
        ca = SshCA(ca_dir)
        server = start_sshd(
            work / "sshd", ca, agent.command("--env-file", env_file, "gateway"), env_file=env_file
        )
        relay = CountingRelay(server.port)
        key = make_client_key(work / "sink")
        cert = ca.sign(key, [LOG_USER], identity="bench-sink")
        known_hosts = work / "sink" / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{relay.port} {server.host_key_line}\n")
        sink_store = work / "sink-store"
        env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "SINK_SOURCES": f"{SOURCE_ID}=127.0.0.1:{relay.port}",
            "SINK_SSH_KEY": str(key.private),
            "SINK_SSH_CERT": str(cert),
            "SINK_KNOWN_HOSTS": str(known_hosts),
            "SINK_STORE_DIR": str(sink_store),
        }
        options = server.ssh_options(key, cert, known_hosts)
        options[options.index("-p") + 1] = str(relay.port)  # through the relay, as the sink
        rsh = shlex.join(["ssh", *options])

        print(f"writing {args.size_mib} MiB of logs ...", flush=True)
        first_generation(handover, args.size_mib * MiB)
        size1 = sum(p.stat().st_size for p in (handover / "logs" / GEN1).rglob("app.log*"))
        print("first pull ...", flush=True)
        rows = [pull(env, relay, "first pull (generation 1, no basis)", log)]
        kept = sink_store / SOURCE_ID / "logs" / GEN1
        assert (kept / "MANIFEST.json").is_file() and not (handover / "logs" / GEN1).exists()

        second_generation(handover, kept, args.append_mib * MiB)
        size2 = sum(p.stat().st_size for p in (handover / "logs" / GEN2).rglob("app.log*"))
        print("plain rsync of the second generation (baseline) ...", flush=True)
        baseline = plain_rsync(rsh, relay, GEN2, work / "plain-copy")
        print("second pull ...", flush=True)
        second = pull(env, relay, "second pull (generation 2, `--link-dest` generation 1)", log)
        assert (sink_store / SOURCE_ID / "logs" / GEN2 / "MANIFEST.json").is_file()
        assert not (handover / "logs" / GEN2).exists()
        rows += [baseline, second]

        text = report(args, rows, (size1, size2), load)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        AGENT_LOG.write_text("\n".join(log))
        print(text)
        return 0 if second.wire <= TARGET_WIRE else 1
    finally:
        if relay is not None:
            relay.close()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
