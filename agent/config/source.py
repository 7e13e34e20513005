"""The source agent's configuration (step 1, push, restore): parsing and the checks of the
directories and files it names."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.config.monitoring import MonitorConfig, parse_monitor
from agent.config.parsing import SOURCE_ID_RE, LabelSelector, Parser, directory_problem, named
from agent.config.settings import SOURCE
from agent.config.shared import MailConfig, parse_identities, parse_mail
from agent.core import excludes
from agent.core.retention import Policy


@dataclass(frozen=True)
class Workload:
    """A Kubernetes workload the `scale` quiescer scales to 0 and back."""

    kind: str  # deployment | statefulset
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str
    region: str
    bucket: str
    prefix: str
    access_key_id: str
    secret_access_key: str
    session_token: str
    addressing_style: str
    ca_bundle: str
    part_size: int
    concurrency: int
    retry_seconds: int


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
    data_format: str = "chunks"
    pack_size: int = 32 << 20
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    repack_below: int = 50
    # Which recipients chunks are encrypted to ('' when not encrypted): a change of them
    # starts a new chunk-id key (see agent/chunks/handover.py).
    encryption_domain: str = ""
    pre_stop_command_label: str = "backup.pre-stop-command"
    precopy_max_passes: int = 5
    precopy_max_seconds: int = 120
    excludes: excludes.Excludes = field(default_factory=excludes.Excludes)
    all_paths: tuple[Path, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "all_paths", self.data_paths + self.log_paths)


def _parse_encryption(p: Parser) -> tuple[tuple[Any, ...], bool, tuple[Any, ...]]:
    """The recipients, whether logs are encrypted too, and the identities."""
    from agent.core import encryption

    def recipients(value: str) -> tuple[Any, ...]:
        try:
            return encryption.parse_recipients(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    keys = p.check(
        "ENCRYPT_RECIPIENTS",
        recipients,
        "use age public keys (`age1...`) or SSH public keys (`ssh-ed25519 AAAA...`), "
        "separated by commas or newlines",
        (),
    )
    logs = p.boolean("ENCRYPT_LOGS")
    if logs and not keys and not any(x.startswith("ENCRYPT_RECIPIENTS:") for x in p.problems):
        p.problems.append(
            "ENCRYPT_LOGS: true needs ENCRYPT_RECIPIENTS; name the keys to "
            "encrypt to, or set ENCRYPT_LOGS=false"
        )
    return keys, logs, parse_identities(p)


def encryption_domain(recipients: str) -> str:
    """A fingerprint of the recipients named in `recipients` (their order, spacing and
    comments aside)."""
    from agent.core import encryption

    items = "\n".join(sorted(encryption.recipient_items(recipients)))
    return hashlib.sha256(items.encode()).hexdigest()


def _data_format(p: Parser, config: SourceConfig) -> str:
    """DATA_FORMAT, or `archive` where `chunks` cannot be used and DATA_FORMAT is not set:
    with COLLECT_MODE=direct (no mirror to build from). Set to `chunks` there, it is a
    problem. Pull sites (no S3_BUCKET) take chunks only when asked for: left unset there,
    it is `archive`, as it was before pull mode took chunked generations."""
    chosen = p.choice("DATA_FORMAT", ("chunks", "archive"))
    explicit = bool(p.values.get("DATA_FORMAT", "").strip())
    if chosen != "chunks":
        return chosen
    if not explicit and not config.s3.bucket:
        return "archive"
    for unusable, why in (
        (
            config.collect_mode == "direct",
            "needs COLLECT_MODE=mirror (it is built from the mirror)",
        ),
    ):
        if unusable:
            if explicit:
                p.problems.append(f"DATA_FORMAT: chunks {why}; set DATA_FORMAT=archive")
            return "archive"
    return chosen


def _parse_excludes(p: Parser, roots: tuple[Path, ...]) -> excludes.Excludes:
    """EXCLUDE and EXCLUDE_IF_PRESENT, each checked on its own."""
    patterns = excludes.split_patterns(p.raw("EXCLUDE"))
    tags = tuple(t.strip() for t in p.raw("EXCLUDE_IF_PRESENT").split(",") if t.strip())
    try:
        excludes.parse(patterns, (), roots)
    except excludes.PatternError as exc:
        p.problems.append(
            f"EXCLUDE: {exc}; use rsync exclude patterns, one a line (docs/excludes.md)"
        )
        patterns = ()
    try:
        excludes.parse((), tags, roots)
    except excludes.PatternError as exc:
        p.problems.append(f"EXCLUDE_IF_PRESENT: {exc}; use comma-separated file names")
        tags = ()
    return excludes.parse(patterns, tags, roots)


def _parse_s3(p: Parser, push: bool) -> S3Settings:
    bucket = p.pattern(
        "S3_BUCKET",
        re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
        "use an S3 bucket name (3-63 lowercase letters, digits, `.`, `-`)",
    )
    if push and not bucket:
        p.problems.append("S3_BUCKET: required to push; name the bucket of the sink store")
    return S3Settings(
        endpoint_url=p.pattern(
            "S3_ENDPOINT_URL", re.compile(r"^https?://[^\s/]+(/\S*)?$"), "use http(s)://host[:port]"
        ),
        region=p.pattern(
            "S3_REGION", re.compile(r"^[a-z0-9-]+$"), "use a region such as us-east-1"
        ),
        bucket=bucket,
        prefix=p.pattern(
            "S3_PREFIX",
            re.compile(r"^[A-Za-z0-9._/-]*$"),
            "use letters, digits, `.`, `_`, `-` and `/`",
        ),
        access_key_id=p.raw("AWS_ACCESS_KEY_ID"),
        secret_access_key=p.raw("AWS_SECRET_ACCESS_KEY"),
        session_token=p.raw("AWS_SESSION_TOKEN"),
        addressing_style=p.choice("S3_ADDRESSING_STYLE", ("path", "virtual", "auto")),
        ca_bundle=p.raw("S3_CA_BUNDLE"),
        part_size=p.integer("S3_PART_SIZE_MB", 5, 5120) << 20,
        concurrency=p.integer("S3_CONCURRENCY", 1, 64),
        retry_seconds=p.integer("S3_RETRY_SECONDS", 0, 86400),
    )


QUIESCE_MODES = ("stop", "pause", "signal", "scale")
K8S_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
K8S_OBJECT_RE = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
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
    config, p = _parse_source(values, push)
    p.finish()
    return config


def load_source(values: Mapping[str, str], push: bool = False) -> SourceConfig:
    """As parse_source, and the directories and files it names are checked too (without
    creating anything). Raise ConfigError listing every problem of either kind at once."""
    config, p = _parse_source(values, push)
    p.problems += path_problems(config, named(p))
    p.finish()
    return config


def _parse_source(values: Mapping[str, str], push: bool) -> tuple[SourceConfig, Parser]:
    p = Parser(values)
    config = SourceConfig(
        source_id=p.pattern(
            "SOURCE_ID",
            SOURCE_ID_RE,
            "use letters, digits, `.`, `_`, `-`, starting with a letter or digit",
        ),
        data_paths=p.paths("DATA_PATHS"),
        log_paths=p.paths("LOG_PATHS"),
        handover_dir=p.path("HANDOVER_DIR"),
        stop_label=p.selector("STOP_LABEL"),
        compose_project=p.pattern(
            "COMPOSE_PROJECT",
            re.compile(r"^[a-z0-9][a-z0-9_-]*$"),
            "use a compose project name (lowercase letters, digits, `_`, `-`)",
        ),
        quiesce_mode=p.choice("QUIESCE_MODE", QUIESCE_MODES),
        stop_timeout=p.integer("STOP_TIMEOUT", 0, 3600),
        collect_mode=p.choice("COLLECT_MODE", ("mirror", "direct")),
        pre_command_label=p.label_key("PRE_COMMAND_LABEL"),
        post_command_label=p.label_key("POST_COMMAND_LABEL"),
        pre_stop_command_label=p.label_key("PRE_STOP_COMMAND_LABEL"),
        precopy_max_passes=p.integer("PRECOPY_MAX_PASSES", 1, 20),
        precopy_max_seconds=p.integer("PRECOPY_MAX_SECONDS", 0, 86400),
        zstd_level=p.integer("ZSTD_LEVEL", 1, 19),
        zstd_threads=p.integer("ZSTD_THREADS", 0, 256),
        docker_host=p.pattern(
            "DOCKER_HOST",
            re.compile(r"^(unix|tcp|ssh|npipe)://\S+$"),
            "use unix:///path, tcp://host:port or ssh://user@host",
        ),
        mail=parse_mail(p),
        monitor=parse_monitor(p, SOURCE),
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
        signal_processes=p.check(
            "SIGNAL_PROCESSES",
            parse_process_pattern,
            "use a regular expression (Python syntax) that matches the "
            "application's command lines and not an empty one, e.g. "
            "`^nginx: `",
            "",
        ),
        k8s_namespace=p.pattern(
            "K8S_NAMESPACE", K8S_NAME_RE, "use a namespace name (lowercase letters, digits, `-`)"
        ),
        k8s_workloads=p.check(
            "K8S_WORKLOADS",
            parse_workloads,
            "use comma-separated `deployment/<name>` or `statefulset/<name>`, each once",
            (),
        ),
    )
    recipients, encrypt_logs, identities = _parse_encryption(p)
    config = replace(
        config,
        encrypt_recipients=recipients,
        encrypt_logs=encrypt_logs,
        decrypt_identities=identities,
        data_format=_data_format(p, config),
        pack_size=p.integer("PACK_SIZE_MB", 4, 1024) << 20,
        repack_below=p.integer("REPACK_BELOW", 0, 100),
        encryption_domain=encryption_domain(p.raw("ENCRYPT_RECIPIENTS")) if recipients else "",
        excludes=_parse_excludes(p, config.data_paths + config.log_paths),
    )
    named = {problem.split(":", 1)[0] for problem in p.problems}
    for mode, env, missing, fix in (
        (
            "signal",
            "SIGNAL_PROCESSES",
            not config.signal_processes,
            "give a regular expression that matches the application's command lines",
        ),
        (
            "scale",
            "K8S_WORKLOADS",
            not config.k8s_workloads,
            "name the workloads, e.g. `deployment/shop,statefulset/db`",
        ),
    ):
        if config.quiesce_mode == mode and missing and env not in named:
            p.problems.append(f"{env}: required with QUIESCE_MODE={mode}; {fix}")
    paths = list(config.all_paths)
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            if _overlaps(a, b):
                p.problems.append(
                    f"DATA_PATHS/LOG_PATHS: {a} and {b} overlap; "
                    "list each directory once and none inside another"
                )
        for env, directory in (
            ("HANDOVER_DIR", config.handover_dir),
            ("SOURCE_STORE_DIR", config.source_store_dir),
        ):
            if _overlaps(a, directory):
                p.problems.append(
                    f"{env}: {directory} overlaps the backed-up path {a}; "
                    "put it outside the data and log paths"
                )
    return config, p


def path_problems(config: SourceConfig, skip: Collection[str] = ()) -> list[str]:
    """Return a problem for each data or log path that is not a readable directory, for the
    handover or source store directory if it cannot be written (or created: nothing is created
    here) and for an unreadable CA bundle; settings named in `skip` are not looked at."""
    problems: list[str] = []
    for env, paths in (("DATA_PATHS", config.data_paths), ("LOG_PATHS", config.log_paths)):
        for path in paths if env not in skip else ():
            if not path.is_dir():
                problems.append(
                    f"{env}: {path} is not a directory; mount the application's "
                    "volume there or fix the path"
                )
            elif not os.access(path, os.R_OK | os.X_OK):
                problems.append(
                    f"{env}: {path} is not readable by this agent; run it as a user "
                    "that can read the application's files"
                )
    for env, directory in (
        ("HANDOVER_DIR", config.handover_dir),
        ("SOURCE_STORE_DIR", config.source_store_dir),
    ):
        if env not in skip:
            problems += directory_problem(env, directory)
    if (
        "S3_CA_BUNDLE" not in skip
        and config.s3.ca_bundle
        and not os.access(config.s3.ca_bundle, os.R_OK)
    ):
        problems.append(
            f"S3_CA_BUNDLE: {config.s3.ca_bundle} is not a readable file; "
            "point it at the CA bundle (PEM) of the S3 endpoint"
        )
    return problems
