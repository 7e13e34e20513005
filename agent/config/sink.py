"""The sink agent's configuration and the SSH gateway's (the source side of a pull): parsing and
the checks of the files and directories they name."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config.monitoring import MonitorConfig, parse_monitor
from agent.config.parsing import SOURCE_ID_RE, Parser, directory_problem, named
from agent.config.settings import SINK
from agent.config.shared import MailConfig, parse_identities, parse_mail
from agent.core.retention import Policy


@dataclass(frozen=True)
class GatewayConfig:
    handover_dir: Path
    source_store_dir: Path
    source_keep: Policy
    data_user: str
    log_user: str
    rrsync: str


@dataclass(frozen=True)
class SourceEndpoint:
    id: str
    host: str
    port: int


@dataclass(frozen=True)
class SinkConfig:
    store_dir: Path
    sources: tuple[SourceEndpoint, ...]
    ssh_key: Path
    ssh_cert: Path
    known_hosts: Path
    data_user: str
    log_user: str
    connect_timeout: int
    concurrency: int
    sink_keep: Policy
    mail: MailConfig
    log_level: str
    log_format: str
    decrypt_identities: tuple[Any, ...] = ()
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def state_dir(self) -> Path:
        """The sink agent's own files: its lock, its ledger of verifications, the cron status."""
        return self.store_dir / ".state"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "agent.lock"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "verified.json"


ENDPOINT_RE = re.compile(
    r"^(?P<id>[^=]+)=(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*"
    r"[A-Za-z0-9])?)(:(?P<port>\d{1,5}))?$"
)
MAX_CONCURRENCY = 64  # sources pulled at once: each holds an ssh or rsync, and its files
USER_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_.-]{0,31}$")


def parse_sources(text: str) -> tuple[SourceEndpoint, ...]:
    """Given `id=host[:port],...`, return the endpoints. Raise ValueError if one is malformed
    or an id repeats."""
    endpoints = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        match = ENDPOINT_RE.match(item)
        port = int(match["port"] or 22) if match else 0
        if not match or not SOURCE_ID_RE.match(match["id"]) or not 0 < port < 65536:
            raise ValueError(item)
        endpoints.append(SourceEndpoint(match["id"], match["host"].strip("[]"), port))
    if len({e.id for e in endpoints}) != len(endpoints):
        raise ValueError("an id repeats")
    return tuple(endpoints)


def _ssh_users(p: Parser) -> tuple[str, str]:
    allowed = "use a login name (letters, digits, `_`, `.`, `-`)"
    return (
        p.pattern("SSH_DATA_USER", USER_RE, allowed),
        p.pattern("SSH_LOG_USER", USER_RE, allowed),
    )


def parse_gateway(values: Mapping[str, str]) -> GatewayConfig:
    """The settings the SSH gateway needs. Raise ConfigError listing every invalid setting."""
    p = Parser(values)
    data_user, log_user = _ssh_users(p)
    config = GatewayConfig(
        handover_dir=p.path("HANDOVER_DIR"),
        source_store_dir=p.path("SOURCE_STORE_DIR"),
        source_keep=p.policy("SOURCE_KEEP"),
        data_user=data_user,
        log_user=log_user,
        rrsync=p.path("RRSYNC").as_posix(),
    )
    p.finish()
    return config


def parse_sink(values: Mapping[str, str]) -> SinkConfig:
    """The sink agent's configuration. Raise ConfigError listing every invalid setting."""
    config, p = _parse_sink(values)
    p.finish()
    return config


def load_sink(values: Mapping[str, str]) -> SinkConfig:
    """As parse_sink, and the files and directories it names are checked too (without creating
    anything). Raise ConfigError listing every problem of either kind at once."""
    config, p = _parse_sink(values)
    p.problems += sink_path_problems(config, named(p))
    p.finish()
    return config


def _parse_sink(values: Mapping[str, str]) -> tuple[SinkConfig, Parser]:
    p = Parser(values)
    data_user, log_user = _ssh_users(p)
    key = p.path("SINK_SSH_KEY")
    cert_text = p.raw("SINK_SSH_CERT")
    config = SinkConfig(
        store_dir=p.path("SINK_STORE_DIR"),
        sources=p.check(
            "SINK_SOURCES",
            parse_sources,
            "use comma-separated `id=host` or `id=host:port`, ids unique",
            (),
        ),
        ssh_key=key,
        ssh_cert=p.path("SINK_SSH_CERT") if cert_text else Path(f"{key}-cert.pub"),
        known_hosts=p.path("SINK_KNOWN_HOSTS"),
        data_user=data_user,
        log_user=log_user,
        connect_timeout=p.integer("SSH_CONNECT_TIMEOUT", 1, 600),
        concurrency=p.integer("SINK_CONCURRENCY", 1, MAX_CONCURRENCY),
        sink_keep=p.policy("SINK_KEEP"),
        mail=parse_mail(p),
        monitor=parse_monitor(p, SINK),
        log_level=p.choice("LOG_LEVEL", ("INFO", "DEBUG", "WARNING", "ERROR")),
        log_format=p.choice("LOG_FORMAT", ("plain", "json")),
        decrypt_identities=parse_identities(p),
    )
    return config, p


def sink_path_problems(config: SinkConfig, skip: Collection[str] = ()) -> list[str]:
    """Return a problem for each of the key, certificate and known_hosts files that cannot be
    read and for a sink store that cannot be written (or created: nothing is created here);
    settings named in `skip` are not looked at."""
    problems = []
    for env, path in (
        ("SINK_SSH_KEY", config.ssh_key),
        ("SINK_SSH_CERT", config.ssh_cert),
        ("SINK_KNOWN_HOSTS", config.known_hosts),
    ):
        derived = env == "SINK_SSH_CERT" and path == Path(f"{config.ssh_key}-cert.pub")
        if env in skip or (derived and "SINK_SSH_KEY" in skip):
            continue
        if not os.access(path, os.R_OK):
            problems.append(f"{env}: {path} is not a readable file; mount the secret there")
        elif os.path.getsize(path) == 0:
            problems.append(f"{env}: {path} is empty; mount the secret there")
    if "SINK_STORE_DIR" not in skip:
        problems += directory_problem("SINK_STORE_DIR", config.store_dir)
    return problems
