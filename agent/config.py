"""Every setting, declared once, and the typed configuration of each role.

A setting is read from the environment, from an optional `.env` file (the environment wins),
or from a secret file named by `NAME_FILE`. `parse_*` functions are pure: they take the raw
values and return a dataclass or raise `ConfigError` listing every invalid setting at once.
`check_paths` is the one function here that looks at the filesystem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from dotenv import dotenv_values

from agent.retention import Policy
from agent.stores import S3Settings

T = TypeVar("T")

SOURCE = "source"
SINK = "sink"
ALL_ROLES = (SOURCE, SINK)


class ConfigError(Exception):
    """Invalid configuration: one message per invalid setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str
    roles: tuple[str, ...] = ALL_ROLES
    secret: bool = False
    required: bool = False


SETTINGS: tuple[Setting, ...] = (
    # --- the source agent ---
    Setting("SOURCE_ID", "", "Name of this source: letters, digits, `.`, `_`, `-` (at most 64). "
            "Names its generations in every store.", (SOURCE,), required=True),
    Setting("DATA_PATHS", "", "Comma-separated absolute directories holding the application's data "
            "(the volumes the agent shares with the application).", (SOURCE,), required=True),
    Setting("LOG_PATHS", "", "Comma-separated absolute directories holding the application's logs; "
            "empty: no log generations.", (SOURCE,)),
    Setting("HANDOVER_DIR", "/backup/handover", "The transport handover point: finished generations, "
            "the mirror (`.mirror`), staging (`.staging`) and the agent's state (`.state`).", (SOURCE,)),
    Setting("STOP_LABEL", "backup.stop-during-backup=true", "Containers with this label (`key` or "
            "`key=value`) are stopped (or paused) while the data is collected.", (SOURCE,)),
    Setting("COMPOSE_PROJECT", "", "When set, only containers of this compose project are stopped "
            "or receive pre/post commands, so two stacks on one host leave each other alone.", (SOURCE,)),
    Setting("QUIESCE_MODE", "stop", "`stop` the application's containers, or `pause` them "
            "(freezes processes; the application cannot flush on shutdown); `signal`: SIGSTOP the "
            "processes matching SIGNAL_PROCESSES (a sidecar sharing the application's process "
            "namespace; no Docker API); `scale`: scale the Kubernetes workloads K8S_WORKLOADS to "
            "0 and back.", (SOURCE,)),
    Setting("STOP_TIMEOUT", "10", "Seconds to wait for the application to stop: Docker waits this "
            "long before killing a container; `signal`: for the processes to reach the stopped "
            "state; `scale`: at least this long (longer when their "
            "terminationGracePeriodSeconds is) for the workloads' pods to be gone.", (SOURCE,)),
    Setting("SIGNAL_PROCESSES", "", "`signal` mode: a regular expression searched in each "
            "process's command line (`/proc/<pid>/cmdline`, arguments joined by spaces); the "
            "matching processes and their children are stopped, never the agent itself, its "
            "parents or children, or PID 1.", (SOURCE,)),
    Setting("K8S_NAMESPACE", "", "`scale` mode: the namespace of K8S_WORKLOADS; empty: the pod's "
            "own namespace in a cluster, else the kubeconfig context's (KUBECONFIG).", (SOURCE,)),
    Setting("K8S_WORKLOADS", "", "`scale` mode: comma-separated `deployment/<name>` or "
            "`statefulset/<name>` scaled to 0 while the data is collected and back afterwards; the "
            "replica count is kept in their annotation `backup-agent/replicas` until then.",
            (SOURCE,)),
    Setting("COLLECT_MODE", "mirror", "`mirror`: keep a mirror in the handover, updated while the "
            "application runs, so the stop only covers the changes; `direct`: no mirror, archive "
            "while stopped (downtime grows with data size; needs only the archive's disk space).",
            (SOURCE,)),
    Setting("PRE_COMMAND_LABEL", "backup.pre-command", "A container label whose value is a shell "
            "command run inside that container before the application is stopped (e.g. a database "
            "dump); a failure aborts the backup before anything is stopped.", (SOURCE,)),
    Setting("POST_COMMAND_LABEL", "backup.post-command", "A container label whose value is a shell "
            "command run inside that container after the application is started again.", (SOURCE,)),
    Setting("ZSTD_LEVEL", "1", "zstd compression level of data archives, 1-19. 1 (about 5 % "
            "larger than 3, a quarter less CPU) because the archive is made beside the running "
            "application.", (SOURCE,)),
    Setting("ZSTD_THREADS", "0", "zstd worker threads; 0 uses every core.", (SOURCE,)),
    Setting("ENCRYPT_RECIPIENTS", "", "Age public keys (`age1...`) or SSH public keys "
            "(`ssh-ed25519 ...`, `ssh-rsa ...`), separated by commas or newlines (`#` comments "
            "allowed), usually as ENCRYPT_RECIPIENTS_FILE; set: data archives are stored "
            "encrypted in the age format (`data.tar.zst.age`). Empty: not encrypted.", (SOURCE,)),
    Setting("ENCRYPT_LOGS", "false", "`true`: log generations are encrypted too, each file as "
            "`<name>.age` (needs ENCRYPT_RECIPIENTS); the sink's rsync then cannot send deltas "
            "of a log, so every changed log travels whole.", (SOURCE,)),
    Setting("DECRYPT_IDENTITY", "", "An age secret key (`AGE-SECRET-KEY-1...`) or an "
            "unencrypted SSH private key, usually as DECRYPT_IDENTITY_FILE; only where a restore "
            "runs: `restore` of encrypted generations needs it, `verify` then also checks their "
            "plaintext.", secret=True),
    Setting("SOURCE_STORE_DIR", "/backup/store", "The source store: data generations kept on the "
            "source after a verified transport (`<dir>/data/<generation>/`).", (SOURCE,)),
    Setting("SOURCE_KEEP_LAST", "3", "Source store retention: the newest N generations (>= 1).",
            (SOURCE,)),
    Setting("SOURCE_KEEP_DAILY", "0", "Source store retention: the newest generation of each "
            "of the last N days that have one.", (SOURCE,)),
    Setting("SOURCE_KEEP_WEEKLY", "0", "Source store retention: the same per ISO week.", (SOURCE,)),
    Setting("SOURCE_KEEP_MONTHLY", "0", "Source store retention: the same per month.", (SOURCE,)),
    # --- push transport (source) ---
    Setting("S3_ENDPOINT_URL", "", "S3 endpoint, e.g. `https://minio.example:9000`; empty: AWS.",
            (SOURCE,)),
    Setting("S3_REGION", "us-east-1", "S3 region.", (SOURCE,)),
    Setting("S3_BUCKET", "", "Bucket of the sink store; required to push.", (SOURCE,)),
    Setting("S3_PREFIX", "backups", "Key prefix: generations go to "
            "`<prefix>/<source-id>/{data,logs}/<generation>/`.", (SOURCE,)),
    Setting("AWS_ACCESS_KEY_ID", "", "S3 access key of this source's identity; empty: boto3's "
            "default chain (instance or pod role).", (SOURCE,)),
    Setting("AWS_SECRET_ACCESS_KEY", "", "S3 secret key.", (SOURCE,), secret=True),
    Setting("AWS_SESSION_TOKEN", "", "S3 session token, for temporary credentials.", (SOURCE,),
            secret=True),
    Setting("S3_ADDRESSING_STYLE", "path", "`path` (MinIO, SeaweedFS, Ceph), `virtual` or "
            "`auto`.", (SOURCE,)),
    Setting("S3_CA_BUNDLE", "", "A CA bundle file to trust for the S3 endpoint's TLS.", (SOURCE,)),
    Setting("S3_PART_SIZE_MB", "16", "Multipart part size in MiB, 5-5120.", (SOURCE,)),
    Setting("S3_CONCURRENCY", "4", "Parts uploaded at once, 1-64.", (SOURCE,)),
    Setting("S3_RETRY_SECONDS", "300", "How long a failing S3 call is retried (exponential "
            "backoff with jitter) before the push gives up.", (SOURCE,)),
    Setting("VERIFY", "checksum", "How a pushed generation is verified before anything is moved "
            "or rotated: `checksum` (the store's SHA-256, or a read-back where it has none), "
            "`download` (read back and hash), `off`.", (SOURCE,)),
    Setting("PUSH_LOGS", "false", "`true`: push log generations too (sites without a sink agent).",
            (SOURCE,)),
    Setting("HANDOVER_ALERT_AGE_HOURS", "0", "Alert when a generation has waited in the handover "
            "longer than this many hours (the transport did not take it); 0: alert on any "
            "generation left from an earlier run (push sites). Pull sites: a little more than the "
            "sink's pull interval.", (SOURCE,)),
    Setting("HANDOVER_ALERT_COUNT", "0", "Also alert when more than this many generations wait "
            "in the handover; 0: no count limit.", (SOURCE,)),
    Setting("RRSYNC", "/usr/bin/rrsync", "The gateway hands rsync to this `rrsync -ro` (ships with "
            "Debian's rsync).", (SOURCE,)),
    # --- pull transport (sink) and the SSH users on the source ---
    Setting("SSH_DATA_USER", "dataBackupSource", "The source's SSH user for data (step 2, pull)."),
    Setting("SSH_LOG_USER", "logBackupSource", "The source's SSH user for logs (step 3)."),
    Setting("SINK_STORE_DIR", "/backup/sink", "The sink store: `<dir>/<source-id>/{data,logs}/"
            "<generation>/`; transfers land in `<dir>/.incoming` first.", (SINK,)),
    Setting("SINK_SOURCES", "", "Comma-separated sources to pull, each `id=host` or "
            "`id=host:port`; the id must be the source's SOURCE_ID.", (SINK,), required=True),
    Setting("SINK_SSH_KEY", "/run/secrets/sink_ssh_key", "Path of the sink's SSH private key.",
            (SINK,)),
    Setting("SINK_SSH_CERT", "", "Path of its certificate, signed by the user CA the sources "
            "trust; empty: `<SINK_SSH_KEY>-cert.pub`.", (SINK,)),
    Setting("SINK_KNOWN_HOSTS", "/run/secrets/known_hosts", "A known_hosts file with the pinned "
            "host key of every source (`[host]:port ssh-ed25519 ...`).", (SINK,)),
    Setting("SSH_CONNECT_TIMEOUT", "10", "Seconds to wait for a source's SSH server.", (SINK,)),
    # --- retention of the sink store (push: rotated by the source; pull: by the sink) ---
    Setting("SINK_KEEP_LAST", "7", "Sink store retention: the newest N generations (>= 1)."),
    Setting("SINK_KEEP_DAILY", "7", "Sink store retention: the newest generation of each of the "
            "last N days that have one."),
    Setting("SINK_KEEP_WEEKLY", "4", "Sink store retention: the same per ISO week."),
    Setting("SINK_KEEP_MONTHLY", "6", "Sink store retention: the same per month."),
    Setting("DOCKER_HOST", "unix:///var/run/docker.sock", "The Docker Engine API the agent talks to "
            "(the mounted socket, or a socket proxy such as `tcp://docker-proxy:2375`).", (SOURCE,)),
    # --- the cron entrypoint (`backup-agent cron`) ---
    Setting("CRON_RUN", "", "Cron expression (UTC) for `source run`: backup, then push. Empty: "
            "not scheduled.", (SOURCE,)),
    Setting("CRON_BACKUP", "", "Cron expression (UTC) for `source backup` alone (pull sites).",
            (SOURCE,)),
    Setting("CRON_PUSH", "", "Cron expression (UTC) for `source push` alone.", (SOURCE,)),
    Setting("CRON_PULL_LOGS", "", "Cron expression (UTC) for `sink pull-logs`.", (SINK,)),
    Setting("CRON_PULL_DATA", "", "Cron expression (UTC) for `sink pull-data`.", (SINK,)),
    Setting("CRON_VERIFY", "", "Cron expression (UTC) for `verify --latest` of this role's "
            "stores."),
    Setting("CRON_AT_START", "", "Comma-separated jobs (`run`, `backup`, `push`, `pull-logs`, "
            "`pull-data`, `verify`) run once when `cron` starts, before the schedule."),
    # --- alerts and logging (every role) ---
    Setting("SMTP_HOST", "", "Mail server for alerts; empty: alerts are only logged."),
    Setting("SMTP_PORT", "25", "Mail server port (25, 587 for STARTTLS, 465 for TLS)."),
    Setting("SMTP_SECURITY", "starttls", "`starttls`, `tls` (implicit TLS) or `none`."),
    Setting("SMTP_USER", "", "Login for the mail server; empty: no login."),
    Setting("SMTP_PASSWORD", "", "Password for the mail server.", secret=True),
    Setting("SMTP_TIMEOUT", "30", "Seconds to wait for the mail server."),
    Setting("ALERT_FROM", "", "Sender address of alerts; empty: `backup-agent@<hostname>`."),
    Setting("ALERT_TO", "", "Comma-separated recipients of alerts; required when `SMTP_HOST` is set."),
    Setting("LOG_LEVEL", "INFO", "`DEBUG`, `INFO`, `WARNING` or `ERROR`."),
    Setting("LOG_FORMAT", "plain", "`plain` lines or `json` lines, on standard error."),
)

SETTINGS_BY_ENV = {s.env: s for s in SETTINGS}
VERBATIM = {"SIGNAL_PROCESSES"}  # a space at either end of a regular expression matters

SOURCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^[^\s=,]*$")
EMAIL_RE = re.compile(r"^[^@\s,]+@[^@\s,]+$")


@dataclass(frozen=True)
class LabelSelector:
    key: str
    value: str | None

    def docker_filter(self) -> str:
        return self.key if self.value is None else f"{self.key}={self.value}"


@dataclass(frozen=True)
class Workload:
    """A Kubernetes workload the `scale` quiescer scales to 0 and back."""

    kind: str  # deployment | statefulset
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class MailConfig:
    host: str
    port: int
    security: str
    user: str
    password: str
    timeout: float
    sender: str
    recipients: tuple[str, ...]


def _parse_encryption(p: _Parser) -> tuple[tuple[Any, ...], bool, tuple[Any, ...]]:
    """The recipients, whether logs are encrypted too, and the identities."""
    from agent import encryption

    def recipients(value: str) -> tuple[Any, ...]:
        try:
            return encryption.parse_recipients(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    keys = p.check("ENCRYPT_RECIPIENTS", recipients,
                   "use age public keys (`age1...`) or SSH public keys (`ssh-ed25519 AAAA...`), "
                   "separated by commas or newlines", ())
    logs = p.boolean("ENCRYPT_LOGS")
    if logs and not keys and not any(x.startswith("ENCRYPT_RECIPIENTS:") for x in p.problems):
        p.problems.append("ENCRYPT_LOGS: true needs ENCRYPT_RECIPIENTS; name the keys to "
                          "encrypt to, or set ENCRYPT_LOGS=false")
    return keys, logs, _parse_identities(p)


def _parse_identities(p: _Parser) -> tuple[Any, ...]:
    from agent import encryption

    secret = p.raw("DECRYPT_IDENTITY")
    try:
        return encryption.parse_identities(secret) if secret else ()
    except ValueError as exc:
        p.problems.append(f"DECRYPT_IDENTITY: {exc}; use an age identity file "
                          "(`age-keygen -o key.txt`) or an unencrypted SSH private key")
        return ()


@dataclass(frozen=True)
class SourceConfig:
    source_id: str
    data_paths: tuple[Path, ...]
    log_paths: tuple[Path, ...]
    handover_dir: Path
    stop_label: LabelSelector
    compose_project: str
    quiesce_mode: str
    stop_timeout: int
    collect_mode: str
    pre_command_label: str
    post_command_label: str
    zstd_level: int
    zstd_threads: int
    docker_host: str
    mail: MailConfig
    source_store_dir: Path
    source_keep: Policy
    sink_keep: Policy
    s3: S3Settings
    verify: str
    push_logs: bool
    handover_alert_age_hours: int
    handover_alert_count: int
    log_level: str = "INFO"
    log_format: str = "plain"
    signal_processes: str = ""
    k8s_namespace: str = ""
    k8s_workloads: tuple[Workload, ...] = ()
    encrypt_recipients: tuple[Any, ...] = ()
    encrypt_logs: bool = False
    decrypt_identities: tuple[Any, ...] = ()
    all_paths: tuple[Path, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "all_paths", self.data_paths + self.log_paths)


@dataclass(frozen=True)
class GatewayConfig:
    handover_dir: Path
    source_store_dir: Path
    source_keep: Policy
    data_user: str
    log_user: str
    rrsync: str


@dataclass(frozen=True)
class CronConfig:
    schedules: tuple[tuple[str, str], ...]  # (job, cron expression), in declaration order
    at_start: tuple[str, ...]


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
    sink_keep: Policy
    mail: MailConfig
    log_level: str
    log_format: str
    decrypt_identities: tuple[Any, ...] = ()


# ---------------------------------------------------------------- reading the environment


def read_values(environ: Mapping[str, str], env_file: Path | None = None) -> dict[str, str]:
    """Given the process environment and an optional `.env` file, return the raw value of every
    declared setting that is set. `NAME_FILE` is replaced by the file's content (one trailing
    newline stripped). Raise ConfigError if both `NAME` and `NAME_FILE` are set or a file is
    missing or unreadable."""
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(environ)
    values: dict[str, str] = {}
    problems: list[str] = []
    for setting in SETTINGS:
        direct = merged.get(setting.env)
        file_name = merged.get(setting.env + "_FILE")
        if direct is not None and file_name is not None:
            problems.append(f"{setting.env}: both {setting.env} and {setting.env}_FILE are set; "
                            "set only one")
        elif file_name is not None:
            try:
                values[setting.env] = Path(file_name).read_text().removesuffix("\n")
            except OSError as exc:
                problems.append(f"{setting.env}_FILE: cannot read {file_name!r} "
                                f"({exc.strerror}); point it at a readable file")
        elif direct is not None:
            values[setting.env] = direct
    if problems:
        raise ConfigError(problems)
    return values


# ---------------------------------------------------------------- pure parsing


class _Parser:
    """Collects problems while turning raw values into typed ones."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.problems: list[str] = []

    def raw(self, env: str) -> str:
        setting = SETTINGS_BY_ENV[env]
        value = self.values.get(env, setting.default)
        value = value if env in VERBATIM else value.strip()
        if setting.required and not value:
            self.problems.append(f"{env}: required; {setting.help}")
        return value

    def check(self, env: str, convert: Callable[[str], T], allowed: str, fallback: T) -> T:
        value = self.raw(env)
        try:
            return convert(value)
        except ValueError:
            self.problems.append(f"{env}: {value!r} is not allowed; {allowed}")
            return fallback

    def choice(self, env: str, choices: tuple[str, ...]) -> str:
        def convert(value: str) -> str:
            if value not in choices:
                raise ValueError
            return value
        return self.check(env, convert, "use one of: " + ", ".join(choices), choices[0])

    def integer(self, env: str, low: int, high: int | None = None) -> int:
        def convert(value: str) -> int:
            number = int(value)
            if number < low or (high is not None and number > high):
                raise ValueError
            return number
        span = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        return self.check(env, convert, "use " + span, low)

    def paths(self, env: str) -> tuple[Path, ...]:
        def convert(value: str) -> tuple[Path, ...]:
            items = [item.strip() for item in value.split(",") if item.strip()]
            paths = tuple(Path(os.path.normpath(item)) for item in items)
            if any(not p.is_absolute() or p == Path("/") for p in paths):
                raise ValueError
            return paths
        return self.check(env, convert, "use comma-separated absolute directories other than /", ())

    def path(self, env: str) -> Path:
        def convert(value: str) -> Path:
            path = Path(os.path.normpath(value))
            if not path.is_absolute() or path == Path("/"):
                raise ValueError
            return path
        return self.check(env, convert, "use an absolute directory other than /", Path("/invalid"))

    def label_key(self, env: str) -> str:
        def convert(value: str) -> str:
            if not LABEL_KEY_RE.match(value):
                raise ValueError
            return value
        return self.check(env, convert, "use a Docker label key such as `backup.pre-command`", "")

    def selector(self, env: str) -> LabelSelector:
        return self.check(env, parse_label_selector,
                           "use `key` or `key=value`, e.g. `backup.stop-during-backup=true`",
                           LabelSelector("invalid", None))

    def pattern(self, env: str, regex: re.Pattern[str], allowed: str) -> str:
        def convert(value: str) -> str:
            if value and not regex.match(value):
                raise ValueError
            return value
        return self.check(env, convert, allowed, "")

    def boolean(self, env: str) -> bool:
        def convert(value: str) -> bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        return self.check(env, convert, "use true or false", False)

    def policy(self, prefix: str) -> Policy:
        return Policy(last=self.integer(f"{prefix}_LAST", 1), daily=self.integer(f"{prefix}_DAILY", 0),
                      weekly=self.integer(f"{prefix}_WEEKLY", 0),
                      monthly=self.integer(f"{prefix}_MONTHLY", 0))

    def emails(self, env: str) -> tuple[str, ...]:
        def convert(value: str) -> tuple[str, ...]:
            items = tuple(item.strip() for item in value.split(",") if item.strip())
            if not all(EMAIL_RE.match(item) for item in items):
                raise ValueError
            return items
        return self.check(env, convert, "use comma-separated mail addresses", ())


def parse_label_selector(text: str) -> LabelSelector:
    """Given `key` or `key=value`, return the selector. Raise ValueError if malformed."""
    key, sep, value = text.partition("=")
    if not LABEL_KEY_RE.match(key) or (sep and not (value and LABEL_VALUE_RE.match(value))):
        raise ValueError(text)
    return LabelSelector(key, value if sep else None)


def _parse_mail(p: _Parser) -> MailConfig:
    host = p.raw("SMTP_HOST")
    recipients = p.emails("ALERT_TO")
    if host and not recipients:
        p.problems.append("ALERT_TO: required when SMTP_HOST is set; use comma-separated mail addresses")
    return MailConfig(
        host=host,
        port=p.integer("SMTP_PORT", 1, 65535),
        security=p.choice("SMTP_SECURITY", ("starttls", "tls", "none")),
        user=p.raw("SMTP_USER"),
        password=p.raw("SMTP_PASSWORD"),
        timeout=p.integer("SMTP_TIMEOUT", 1, 3600),
        sender=p.pattern("ALERT_FROM", EMAIL_RE, "use a mail address"),
        recipients=recipients,
    )


def _parse_s3(p: _Parser, push: bool) -> S3Settings:
    bucket = p.pattern("S3_BUCKET", re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
                       "use an S3 bucket name (3-63 lowercase letters, digits, `.`, `-`)")
    if push and not bucket:
        p.problems.append("S3_BUCKET: required to push; name the bucket of the sink store")
    return S3Settings(
        endpoint_url=p.pattern("S3_ENDPOINT_URL", re.compile(r"^https?://[^\s/]+(/\S*)?$"),
                               "use http(s)://host[:port]"),
        region=p.pattern("S3_REGION", re.compile(r"^[a-z0-9-]+$"), "use a region such as us-east-1"),
        bucket=bucket,
        prefix=p.pattern("S3_PREFIX", re.compile(r"^[A-Za-z0-9._/-]*$"),
                         "use letters, digits, `.`, `_`, `-` and `/`"),
        access_key_id=p.raw("AWS_ACCESS_KEY_ID"),
        secret_access_key=p.raw("AWS_SECRET_ACCESS_KEY"),
        session_token=p.raw("AWS_SESSION_TOKEN"),
        addressing_style=p.choice("S3_ADDRESSING_STYLE", ("path", "virtual", "auto")),
        ca_bundle=p.raw("S3_CA_BUNDLE"),
        part_size=p.integer("S3_PART_SIZE_MB", 5, 5120) << 20,
        concurrency=p.integer("S3_CONCURRENCY", 1, 64),
        retry_seconds=p.integer("S3_RETRY_SECONDS", 0, 86400),
    )


ENDPOINT_RE = re.compile(r"^(?P<id>[^=]+)=(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*"
                         r"[A-Za-z0-9])?)(:(?P<port>\d{1,5}))?$")
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


def _ssh_users(p: _Parser) -> tuple[str, str]:
    allowed = "use a login name (letters, digits, `_`, `.`, `-`)"
    return (p.pattern("SSH_DATA_USER", USER_RE, allowed), p.pattern("SSH_LOG_USER", USER_RE, allowed))


def parse_gateway(values: Mapping[str, str]) -> GatewayConfig:
    """The settings the SSH gateway needs. Raise ConfigError listing every invalid setting."""
    p = _Parser(values)
    data_user, log_user = _ssh_users(p)
    config = GatewayConfig(handover_dir=p.path("HANDOVER_DIR"),
                           source_store_dir=p.path("SOURCE_STORE_DIR"),
                           source_keep=p.policy("SOURCE_KEEP"), data_user=data_user,
                           log_user=log_user, rrsync=p.path("RRSYNC").as_posix())
    if p.problems:
        raise ConfigError(p.problems)
    return config


def parse_sink(values: Mapping[str, str]) -> SinkConfig:
    """The sink agent's configuration. Raise ConfigError listing every invalid setting."""
    p = _Parser(values)
    data_user, log_user = _ssh_users(p)
    key = p.path("SINK_SSH_KEY")
    cert_text = p.raw("SINK_SSH_CERT")
    config = SinkConfig(
        store_dir=p.path("SINK_STORE_DIR"),
        sources=p.check("SINK_SOURCES", parse_sources,
                         "use comma-separated `id=host` or `id=host:port`, ids unique", ()),
        ssh_key=key,
        ssh_cert=p.path("SINK_SSH_CERT") if cert_text else Path(f"{key}-cert.pub"),
        known_hosts=p.path("SINK_KNOWN_HOSTS"),
        data_user=data_user, log_user=log_user,
        connect_timeout=p.integer("SSH_CONNECT_TIMEOUT", 1, 600),
        sink_keep=p.policy("SINK_KEEP"),
        mail=_parse_mail(p),
        log_level=p.choice("LOG_LEVEL", ("INFO", "DEBUG", "WARNING", "ERROR")),
        log_format=p.choice("LOG_FORMAT", ("plain", "json")),
        decrypt_identities=_parse_identities(p),
    )
    if p.problems:
        raise ConfigError(p.problems)
    return config


def check_sink_paths(config: SinkConfig) -> None:
    """Raise ConfigError if the key, certificate or known_hosts file cannot be read or the
    sink store cannot be written."""
    problems = []
    for env, path in (("SINK_SSH_KEY", config.ssh_key), ("SINK_SSH_CERT", config.ssh_cert),
                      ("SINK_KNOWN_HOSTS", config.known_hosts)):
        if not os.access(path, os.R_OK):
            problems.append(f"{env}: {path} is not a readable file; mount the secret there")
    try:
        config.store_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(config.store_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        problems.append(f"SINK_STORE_DIR: {config.store_dir} is not a writable directory "
                        f"({exc.strerror}); mount a writable volume there")
    if problems:
        raise ConfigError(problems)


QUIESCE_MODES = ("stop", "pause", "signal", "scale")
K8S_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
K8S_OBJECT_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                           r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
WORKLOAD_KINDS = ("deployment", "statefulset")


def parse_process_pattern(text: str) -> str:
    """Given a regular expression for SIGNAL_PROCESSES, return it. Raise ValueError if it does
    not compile or matches every command line (the empty string)."""
    if not text:
        return ""
    try:
        compiled = re.compile(text)
    except re.error as exc:
        raise ValueError(text) from exc
    if compiled.search(""):
        raise ValueError(text)
    return text


def parse_workloads(text: str) -> tuple[Workload, ...]:
    """Given `kind/name,...` (kinds: deployment, statefulset), return the workloads. Raise
    ValueError if one is malformed or repeats."""
    workloads = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        kind, sep, name = item.partition("/")
        if not sep or kind not in WORKLOAD_KINDS or not K8S_OBJECT_RE.match(name):
            raise ValueError(item)
        workloads.append(Workload(kind, name))
    if len(set(workloads)) != len(workloads):
        raise ValueError("a workload repeats")
    return tuple(workloads)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def parse_source(values: Mapping[str, str], push: bool = False) -> SourceConfig:
    """Given raw setting values, return the source agent's configuration; `push` also requires
    the settings of the push transport. Raise ConfigError listing every invalid setting."""
    p = _Parser(values)
    config = SourceConfig(
        source_id=p.pattern("SOURCE_ID", SOURCE_ID_RE,
                            "use letters, digits, `.`, `_`, `-`, starting with a letter or digit"),
        data_paths=p.paths("DATA_PATHS"),
        log_paths=p.paths("LOG_PATHS"),
        handover_dir=p.path("HANDOVER_DIR"),
        stop_label=p.selector("STOP_LABEL"),
        compose_project=p.pattern("COMPOSE_PROJECT", re.compile(r"^[a-z0-9][a-z0-9_-]*$"),
                                  "use a compose project name (lowercase letters, digits, `_`, `-`)"),
        quiesce_mode=p.choice("QUIESCE_MODE", QUIESCE_MODES),
        stop_timeout=p.integer("STOP_TIMEOUT", 0, 3600),
        collect_mode=p.choice("COLLECT_MODE", ("mirror", "direct")),
        pre_command_label=p.label_key("PRE_COMMAND_LABEL"),
        post_command_label=p.label_key("POST_COMMAND_LABEL"),
        zstd_level=p.integer("ZSTD_LEVEL", 1, 19),
        zstd_threads=p.integer("ZSTD_THREADS", 0, 256),
        docker_host=p.pattern("DOCKER_HOST", re.compile(r"^(unix|tcp|ssh|npipe)://\S+$"),
                              "use unix:///path, tcp://host:port or ssh://user@host"),
        mail=_parse_mail(p),
        source_store_dir=p.path("SOURCE_STORE_DIR"),
        source_keep=p.policy("SOURCE_KEEP"),
        sink_keep=p.policy("SINK_KEEP"),
        s3=_parse_s3(p, push),
        verify=p.choice("VERIFY", ("checksum", "download", "off")),
        push_logs=p.boolean("PUSH_LOGS"),
        handover_alert_age_hours=p.integer("HANDOVER_ALERT_AGE_HOURS", 0),
        handover_alert_count=p.integer("HANDOVER_ALERT_COUNT", 0),
        log_level=p.choice("LOG_LEVEL", ("INFO", "DEBUG", "WARNING", "ERROR")),
        log_format=p.choice("LOG_FORMAT", ("plain", "json")),
        signal_processes=p.check("SIGNAL_PROCESSES", parse_process_pattern,
                                 "use a regular expression (Python syntax) that matches the "
                                 "application's command lines and not an empty one, e.g. "
                                 "`^nginx: `", ""),
        k8s_namespace=p.pattern("K8S_NAMESPACE", K8S_NAME_RE,
                                "use a namespace name (lowercase letters, digits, `-`)"),
        k8s_workloads=p.check("K8S_WORKLOADS", parse_workloads,
                              "use comma-separated `deployment/<name>` or `statefulset/<name>`, "
                              "each once", ()),
    )
    recipients, encrypt_logs, identities = _parse_encryption(p)
    config = replace(config, encrypt_recipients=recipients, encrypt_logs=encrypt_logs,
                     decrypt_identities=identities)
    named = {problem.split(":", 1)[0] for problem in p.problems}
    for mode, env, missing, fix in (
            ("signal", "SIGNAL_PROCESSES", not config.signal_processes,
             "give a regular expression that matches the application's command lines"),
            ("scale", "K8S_WORKLOADS", not config.k8s_workloads,
             "name the workloads, e.g. `deployment/shop,statefulset/db`")):
        if config.quiesce_mode == mode and missing and env not in named:
            p.problems.append(f"{env}: required with QUIESCE_MODE={mode}; {fix}")
    paths = list(config.all_paths)
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            if _overlaps(a, b):
                p.problems.append(f"DATA_PATHS/LOG_PATHS: {a} and {b} overlap; "
                                  "list each directory once and none inside another")
        for env, directory in (("HANDOVER_DIR", config.handover_dir),
                               ("SOURCE_STORE_DIR", config.source_store_dir)):
            if _overlaps(a, directory):
                p.problems.append(f"{env}: {directory} overlaps the backed-up path {a}; "
                                  "put it outside the data and log paths")
    if p.problems:
        raise ConfigError(p.problems)
    return config


CRON_JOBS = {SOURCE: ("run", "backup", "push", "verify"),
             SINK: ("pull-logs", "pull-data", "verify")}


def parse_cron(values: Mapping[str, str], role: str) -> CronConfig:
    """The schedules of `role`'s jobs. Raise ConfigError for an invalid cron expression, an
    unknown job to run at start, or no job scheduled at all."""
    from croniter import croniter

    p = _Parser(values)
    schedules = []
    for job in CRON_JOBS[role]:
        env = "CRON_" + job.upper().replace("-", "_")

        def convert(value: str) -> str:
            if value and not croniter.is_valid(value):
                raise ValueError
            return value
        expression = p.check(env, convert, "use a cron expression such as `0 2 * * *` (UTC)", "")
        if expression:
            schedules.append((job, expression))

    def jobs(value: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in value.split(",") if n.strip())
        if any(n not in CRON_JOBS[role] for n in names):
            raise ValueError
        return names
    at_start = p.check("CRON_AT_START", jobs,
                       f"use comma-separated jobs of the {role}: {', '.join(CRON_JOBS[role])}", ())
    if not schedules and not at_start and not p.problems:
        p.problems.append(f"CRON_*: no job is scheduled; set at least one of "
                          f"{', '.join('CRON_' + j.upper().replace('-', '_') for j in CRON_JOBS[role])}")
    if p.problems:
        raise ConfigError(p.problems)
    return CronConfig(tuple(schedules), at_start)


# ---------------------------------------------------------------- the one I/O check


def check_paths(config: SourceConfig) -> None:
    """Raise ConfigError if a data or log path is not a readable directory or the handover
    directory cannot be created or written."""
    problems: list[str] = []
    for env, paths in (("DATA_PATHS", config.data_paths), ("LOG_PATHS", config.log_paths)):
        for path in paths:
            if not path.is_dir():
                problems.append(f"{env}: {path} is not a directory; mount the application's "
                                "volume there or fix the path")
            elif not os.access(path, os.R_OK | os.X_OK):
                problems.append(f"{env}: {path} is not readable by this agent; run it as a user "
                                "that can read the application's files")
    for env, directory in (("HANDOVER_DIR", config.handover_dir),
                           ("SOURCE_STORE_DIR", config.source_store_dir)):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as exc:
            problems.append(f"{env}: {directory} is not a writable directory "
                            f"({exc.strerror}); mount a writable volume there")
    if config.s3.ca_bundle and not os.access(config.s3.ca_bundle, os.R_OK):
        problems.append(f"S3_CA_BUNDLE: {config.s3.ca_bundle} is not a readable file; "
                        "point it at the CA bundle (PEM) of the S3 endpoint")
    if problems:
        raise ConfigError(problems)


def effective(values: Mapping[str, str], role: str | None = None) -> list[tuple[str, str, bool]]:
    """Return (name, shown value, set explicitly) for every setting of `role` (all when None),
    secrets masked."""
    rows = []
    for s in SETTINGS:
        if role is not None and role not in s.roles:
            continue
        value = values.get(s.env, s.default)
        shown = ("***" if value else "") if s.secret else value
        rows.append((s.env, shown, s.env in values))
    return rows


def markdown_table() -> str:
    """The README's settings table, generated from the declarations."""
    lines = ["| variable | default | roles | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "*(required)*" if s.required else (f"`{s.default}`" if s.default else "")
        lines.append(f"| `{s.env}` | {default} | {', '.join(s.roles)} | {s.help} |")
    return "\n".join(lines)
