"""Many sources for one sink, all real: per source a handover, a source store and an sshd on a
loopback port of its own with the gateway as its ForceCommand (tests/sshd.py), and for the
sink one key, one certificate for both gateway users and one known_hosts pinning every source.
What tests/integration/test_pull_fanout.py and bench/fanout.py pull from."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.sshd import (
    ClientKey,
    GatewayAgent,
    SshCA,
    SshdServer,
    make_client_key,
    make_shared_dir,
    share_tree,
    start_sshd,
)

DATA_USER, LOG_USER = "dataBackupSource", "logBackupSource"


@dataclass
class FleetSource:
    id: str
    handover: Path
    source_store: Path
    server: SshdServer

    def share(self) -> None:
        """Give what was written into the handover to the gateway users' group."""
        share_tree(self.handover)

    def waiting(self, kind: str = "data") -> list[str]:
        directory = self.handover / kind
        return sorted(os.listdir(directory)) if directory.is_dir() else []

    def in_source_store(self, kind: str = "data") -> list[str]:
        directory = self.source_store / kind
        return sorted(os.listdir(directory)) if directory.is_dir() else []


@dataclass
class Fleet:
    sources: list[FleetSource]
    key: ClientKey
    cert: Path
    known_hosts: Path

    def sink_env(self, sink_store: Path, **extra: str) -> dict[str, str]:
        """The sink agent's environment for pulling every source of the fleet into
        `sink_store`; `extra` adds or overrides settings."""
        return {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "SINK_SOURCES": ",".join(f"{s.id}=127.0.0.1:{s.server.port}" for s in self.sources),
            "SINK_SSH_KEY": str(self.key.private),
            "SINK_SSH_CERT": str(self.cert),
            "SINK_KNOWN_HOSTS": str(self.known_hosts),
            "SINK_STORE_DIR": str(sink_store),
            "SSH_CONNECT_TIMEOUT": "10",
            **extra,
        }

    def stop(self) -> None:
        for source in self.sources:
            source.server.stop()


def start_fleet(
    directory: Path,
    ids: list[str],
    ca: SshCA,
    agent: GatewayAgent,
    wrap: Callable[[str], str] = lambda command: command,
) -> Fleet:
    """Start one sshd per source id below `directory` (which the gateway users can reach: a
    `gateway_tmp_path`); `wrap` turns the gateway's command line into the ForceCommand. The
    caller stops the fleet (also when this raises, the servers started so far are stopped)."""
    sources: list[FleetSource] = []
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        for source_id in ids:
            home = directory / source_id
            home.mkdir(mode=0o755)
            handover = make_shared_dir(home / "handover")
            source_store = make_shared_dir(home / "store")
            env_file = home / "gateway.env"
            env_file.write_text(f"HANDOVER_DIR={handover}\nSOURCE_STORE_DIR={source_store}\n")
            server = start_sshd(
                home / "sshd",
                ca,
                wrap(agent.command("--env-file", env_file, "gateway")),
                env_file=env_file,
            )
            sources.append(FleetSource(source_id, handover, source_store, server))
    except BaseException:
        for source in sources:
            source.server.stop()
        raise
    sink = directory / "sink"
    key = make_client_key(sink)
    cert = ca.sign(key, [DATA_USER, LOG_USER], identity="backup-sink")
    known_hosts = sink / "known_hosts"
    known_hosts.write_text("".join(s.server.known_hosts.read_text() for s in sources))
    return Fleet(sources, key, cert, known_hosts)
