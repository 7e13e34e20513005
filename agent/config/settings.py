"""Every setting, declared once: its environment name, default, help and the roles that read it.
The settings table of docs/settings.md and `backup-agent config` are generated from this table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SOURCE = "source"
SINK = "sink"
ALL_ROLES = (SOURCE, SINK)


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
    Setting(
        "SOURCE_ID",
        "",
        "Name of this source: letters, digits, `.`, `_`, `-` (at most 64). "
        "Names its generations in every store.",
        (SOURCE,),
        required=True,
    ),
    Setting(
        "DATA_PATHS",
        "",
        "Comma-separated absolute directories holding the application's data "
        "(the volumes the agent shares with the application).",
        (SOURCE,),
        required=True,
    ),
    Setting(
        "LOG_PATHS",
        "",
        "Comma-separated absolute directories holding the application's logs; "
        "empty: no log generations.",
        (SOURCE,),
    ),
    Setting(
        "HANDOVER_DIR",
        "/backup/handover",
        "The transport handover point: finished generations, "
        "the mirror (`.mirror`), staging (`.staging`) and the agent's state (`.state`).",
        (SOURCE,),
    ),
    Setting(
        "STOP_LABEL",
        "backup.stop-during-backup=true",
        "Containers with this label (`key` or "
        "`key=value`) are stopped (or paused) while the data is collected.",
        (SOURCE,),
    ),
    Setting(
        "COMPOSE_PROJECT",
        "",
        "When set, only containers of this compose project are stopped "
        "or receive pre/post commands, so two stacks on one host leave each other alone.",
        (SOURCE,),
    ),
    Setting(
        "QUIESCE_MODE",
        "stop",
        "`stop` the application's containers, or `pause` them "
        "(freezes processes; the application cannot flush on shutdown); `signal`: SIGSTOP the "
        "processes matching SIGNAL_PROCESSES (a sidecar sharing the application's process "
        "namespace; no Docker API); `scale`: scale the Kubernetes workloads K8S_WORKLOADS to "
        "0 and back.",
        (SOURCE,),
    ),
    Setting(
        "STOP_TIMEOUT",
        "10",
        "Seconds to wait for the application to stop: Docker waits this "
        "long before killing a container; `signal`: for the processes to reach the stopped "
        "state; `scale`: at least this long (longer when their "
        "terminationGracePeriodSeconds is) for the workloads' pods to be gone.",
        (SOURCE,),
    ),
    Setting(
        "SIGNAL_PROCESSES",
        "",
        "`signal` mode: a regular expression searched in each "
        "process's command line (`/proc/<pid>/cmdline`, arguments joined by spaces); the "
        "matching processes and their children are stopped, never the agent itself, its "
        "parents or children, or PID 1.",
        (SOURCE,),
    ),
    Setting(
        "K8S_NAMESPACE",
        "",
        "`scale` mode: the namespace of K8S_WORKLOADS; empty: the pod's "
        "own namespace in a cluster, else the kubeconfig context's (KUBECONFIG).",
        (SOURCE,),
    ),
    Setting(
        "K8S_WORKLOADS",
        "",
        "`scale` mode: comma-separated `deployment/<name>` or "
        "`statefulset/<name>` scaled to 0 while the data is collected and back afterwards; the "
        "replica count is kept in their annotation `backup-agent/replicas` until then.",
        (SOURCE,),
    ),
    Setting(
        "COLLECT_MODE",
        "mirror",
        "`mirror`: keep a mirror in the handover, updated while the "
        "application runs, so the stop only covers the changes; `direct`: no mirror, archive "
        "while stopped (downtime grows with data size; needs only the archive's disk space).",
        (SOURCE,),
    ),
    Setting(
        "DATA_FORMAT",
        "chunks",
        "How a data generation holds its files: `chunks`: deduplicated (each run reads, "
        "uploads and stores only what changed; docs/chunks-format.md); `archive`: one "
        "self-contained `data.tar.zst` per generation, unpacked by hand with zstd and tar. "
        "Left unset on a site without S3_BUCKET (pull mode: set `chunks` to opt in, "
        "docs/pull.md) or with COLLECT_MODE=direct, `archive` is used; `chunks` with "
        "COLLECT_MODE=direct is refused.",
        (SOURCE,),
    ),
    Setting(
        "PACK_SIZE_MB",
        "32",
        "`chunks`: the target size of a pack (the file or object holding many chunks) in "
        "MiB, 4-1024.",
        (SOURCE,),
    ),
    Setting(
        "PRE_COMMAND_LABEL",
        "backup.pre-command",
        "A container label whose value is a shell "
        "command run inside that container before the bulk pass (e.g. a database dump); a "
        "failure aborts the backup before anything is stopped. Like every command label, it "
        "runs only in containers STOP_LABEL selects (within COMPOSE_PROJECT) or that carry "
        "`backup.agent=<SOURCE_ID>`.",
        (SOURCE,),
    ),
    Setting(
        "PRE_STOP_COMMAND_LABEL",
        "backup.pre-stop-command",
        "A container label whose value "
        "is a shell command run inside that container right before the application is stopped, "
        "after the pre-copy (e.g. `psql -c CHECKPOINT`, so the shutdown has little left to "
        "write); a failure aborts the backup before anything is stopped.",
        (SOURCE,),
    ),
    Setting(
        "PRECOPY_MAX_PASSES",
        "5",
        "`mirror` mode: at most this many pre-copy passes while the "
        "application runs (1-20); passes repeat while what they copy keeps shrinking, so the "
        "stop begins with the smallest remainder.",
        (SOURCE,),
    ),
    Setting(
        "PRECOPY_MAX_SECONDS",
        "120",
        "`mirror` mode: no further pre-copy pass starts after this many seconds of pre-copy.",
        (SOURCE,),
    ),
    Setting(
        "POST_COMMAND_LABEL",
        "backup.post-command",
        "A container label whose value is a shell "
        "command run inside that container after the application is started again.",
        (SOURCE,),
    ),
    Setting(
        "ZSTD_LEVEL",
        "1",
        "zstd compression level of data archives and chunks, 1-19. 1 (about 5 % "
        "larger than 3, a quarter less CPU) because the archive is made beside the running "
        "application.",
        (SOURCE,),
    ),
    Setting(
        "ZSTD_THREADS",
        "0",
        "zstd worker threads (`chunks`: the threads that hash and compress chunks); 0 uses "
        "every core.",
        (SOURCE,),
    ),
    Setting(
        "ENCRYPT_RECIPIENTS",
        "",
        "Age public keys (`age1...`) or SSH public keys "
        "(`ssh-ed25519 ...`, `ssh-rsa ...`), separated by commas or newlines (`#` comments "
        "allowed), usually as ENCRYPT_RECIPIENTS_FILE; set: data generations are stored "
        "encrypted in the age format (`data.tar.zst.age`; `chunks`: every chunk and the "
        "index, with keyed chunk ids). Empty: not encrypted.",
        (SOURCE,),
    ),
    Setting(
        "ENCRYPT_LOGS",
        "false",
        "`true`: log generations are encrypted too, each file as "
        "`<name>.age` (needs ENCRYPT_RECIPIENTS); the sink's rsync then cannot send deltas "
        "of a log, so every changed log travels whole.",
        (SOURCE,),
    ),
    Setting(
        "DECRYPT_IDENTITY",
        "",
        "An age secret key (`AGE-SECRET-KEY-1...`) or an "
        "unencrypted SSH private key, usually as DECRYPT_IDENTITY_FILE; only where a restore "
        "runs: `restore` of encrypted generations needs it, `verify` then also checks their "
        "plaintext.",
        secret=True,
    ),
    Setting(
        "SOURCE_STORE_DIR",
        "/backup/store",
        "The source store: data generations kept on the "
        "source after a verified transport (`<dir>/data/<generation>/`).",
        (SOURCE,),
    ),
    Setting(
        "SOURCE_KEEP_LAST",
        "3",
        "Source store retention: the newest N generations (>= 1).",
        (SOURCE,),
    ),
    Setting(
        "SOURCE_KEEP_DAILY",
        "0",
        "Source store retention: the newest generation of each of the last N days that have one.",
        (SOURCE,),
    ),
    Setting("SOURCE_KEEP_WEEKLY", "0", "Source store retention: the same per ISO week.", (SOURCE,)),
    Setting("SOURCE_KEEP_MONTHLY", "0", "Source store retention: the same per month.", (SOURCE,)),
    # --- push transport (source) ---
    Setting(
        "S3_ENDPOINT_URL",
        "",
        "S3 endpoint, e.g. `https://minio.example:9000`; empty: AWS.",
        (SOURCE,),
    ),
    Setting("S3_REGION", "us-east-1", "S3 region.", (SOURCE,)),
    Setting("S3_BUCKET", "", "Bucket of the sink store; required to push.", (SOURCE,)),
    Setting(
        "S3_PREFIX",
        "backups",
        "Key prefix: generations go to `<prefix>/<source-id>/{data,logs}/<generation>/`.",
        (SOURCE,),
    ),
    Setting(
        "AWS_ACCESS_KEY_ID",
        "",
        "S3 access key of this source's identity; empty: boto3's "
        "default chain (instance or pod role).",
        (SOURCE,),
    ),
    Setting("AWS_SECRET_ACCESS_KEY", "", "S3 secret key.", (SOURCE,), secret=True),
    Setting(
        "AWS_SESSION_TOKEN",
        "",
        "S3 session token, for temporary credentials.",
        (SOURCE,),
        secret=True,
    ),
    Setting(
        "S3_ADDRESSING_STYLE",
        "path",
        "`path` (MinIO, SeaweedFS, Ceph), `virtual` or `auto`.",
        (SOURCE,),
    ),
    Setting("S3_CA_BUNDLE", "", "A CA bundle file to trust for the S3 endpoint's TLS.", (SOURCE,)),
    Setting("S3_PART_SIZE_MB", "16", "Multipart part size in MiB, 5-5120.", (SOURCE,)),
    Setting(
        "S3_CONCURRENCY",
        "4",
        "Parts uploaded at once, 1-64 (a chunked generation's packs go up two at once, each "
        "with half of them, of half S3_PART_SIZE_MB).",
        (SOURCE,),
    ),
    Setting(
        "S3_RETRY_SECONDS",
        "300",
        "How long a failing S3 call is retried (exponential "
        "backoff with jitter) before the push gives up.",
        (SOURCE,),
    ),
    Setting(
        "VERIFY",
        "checksum",
        "How a pushed generation is verified before anything is moved "
        "or rotated: `checksum` (the store's SHA-256, or a read-back where it has none), "
        "`download` (read back and hash), `off`.",
        (SOURCE,),
    ),
    Setting(
        "REPACK_BELOW",
        "50",
        "Garbage collection of the `chunks` format: a pack with less than this percentage of "
        "its bytes still used by a kept generation is repacked (its live blobs copied into new "
        "packs, no key needed); 0 turns repacking off, 0-100.",
        (SOURCE,),
    ),
    Setting(
        "PUSH_LOGS",
        "true",
        "`true`: `source push` pushes the log generations too and then "
        "frees the handover of them; `false`: leave them for a sink agent's log pull (step 3), "
        "on sites where one pulls the logs.",
        (SOURCE,),
    ),
    Setting(
        "HANDOVER_ALERT_AGE_HOURS",
        "0",
        "Alert when a generation has waited in the handover "
        "longer than this many hours (the transport did not take it); 0: alert on any "
        "generation left from an earlier run (push sites). Pull sites: a little more than the "
        "sink's pull interval.",
        (SOURCE,),
    ),
    Setting(
        "EXCLUDE",
        "",
        "Paths left out of every data and log generation and the mirror, and left alone by a "
        "restore: one rsync exclude pattern a line (`*.tmp`, `cache/`, `**/node_modules/`; "
        "one starting with `/` is an absolute path below one of DATA_PATHS or LOG_PATHS, "
        "e.g. `/data/db/pg_stat_tmp/`); blank lines and lines starting with `#` are "
        "ignored. Also as EXCLUDE_FILE. docs/excludes.md.",
        (SOURCE,),
    ),
    Setting(
        "EXCLUDE_IF_PRESENT",
        "CACHEDIR.TAG",
        "Comma-separated file names: a directory holding one is left out whole, as EXCLUDE "
        "does. A `CACHEDIR.TAG` counts only when it starts with the signature of the Cache "
        "Directory Tagging Specification; empty: none.",
        (SOURCE,),
    ),
    Setting(
        "HANDOVER_ALERT_COUNT",
        "0",
        "Also alert when more than this many generations of "
        "one kind (data or logs) wait in the handover; 0: no count limit.",
        (SOURCE,),
    ),
    Setting(
        "RRSYNC",
        "/usr/bin/rrsync",
        "The gateway hands rsync to this `rrsync -ro` (ships with Debian's rsync).",
        (SOURCE,),
    ),
    # --- pull transport (sink) and the SSH users on the source ---
    Setting("SSH_DATA_USER", "dataBackupSource", "The source's SSH user for data (step 2, pull)."),
    Setting("SSH_LOG_USER", "logBackupSource", "The source's SSH user for logs (step 3)."),
    Setting(
        "SINK_STORE_DIR",
        "/backup/sink",
        "The sink store: `<dir>/<source-id>/{data,logs}/"
        "<generation>/`; transfers land in `<dir>/.incoming` first.",
        (SINK,),
    ),
    Setting(
        "SINK_SOURCES",
        "",
        "Comma-separated sources to pull, each `id=host` or "
        "`id=host:port`; the id must be the source's SOURCE_ID.",
        (SINK,),
        required=True,
    ),
    Setting(
        "SINK_SSH_KEY", "/run/secrets/sink_ssh_key", "Path of the sink's SSH private key.", (SINK,)
    ),
    Setting(
        "SINK_SSH_CERT",
        "",
        "Path of its certificate, signed by the user CA the sources "
        "trust; empty: `<SINK_SSH_KEY>-cert.pub`.",
        (SINK,),
    ),
    Setting(
        "SINK_KNOWN_HOSTS",
        "/run/secrets/known_hosts",
        "A known_hosts file with the pinned "
        "host key of every source (`[host]:port ssh-ed25519 ...`).",
        (SINK,),
    ),
    Setting("SSH_CONNECT_TIMEOUT", "10", "Seconds to wait for a source's SSH server.", (SINK,)),
    Setting(
        "SINK_CONCURRENCY",
        "4",
        "Sources pulled at once by `sink pull-data` and `sink pull-logs`, 1-64 "
        "(each one an ssh or rsync at a time; 1: one after another).",
        (SINK,),
    ),
    # --- retention of the sink store (push: rotated by the source; pull: by the sink) ---
    Setting("SINK_KEEP_LAST", "7", "Sink store retention: the newest N generations (>= 1)."),
    Setting(
        "SINK_KEEP_DAILY",
        "7",
        "Sink store retention: the newest generation of each of the last N days that have one.",
    ),
    Setting("SINK_KEEP_WEEKLY", "4", "Sink store retention: the same per ISO week."),
    Setting("SINK_KEEP_MONTHLY", "6", "Sink store retention: the same per month."),
    Setting(
        "DOCKER_HOST",
        "unix:///var/run/docker.sock",
        "The Docker Engine API the agent talks to "
        "(the mounted socket, or a socket proxy such as `tcp://docker-proxy:2375`).",
        (SOURCE,),
    ),
    # --- the cron entrypoint (`backup-agent cron`) ---
    Setting(
        "CRON_RUN",
        "",
        "Cron expression (UTC) for `source run`: backup, then push. Empty: not scheduled.",
        (SOURCE,),
    ),
    Setting(
        "CRON_BACKUP",
        "",
        "Cron expression (UTC) for `source backup` alone (pull sites).",
        (SOURCE,),
    ),
    Setting("CRON_PUSH", "", "Cron expression (UTC) for `source push` alone.", (SOURCE,)),
    Setting("CRON_PULL_LOGS", "", "Cron expression (UTC) for `sink pull-logs`.", (SINK,)),
    Setting("CRON_PULL_DATA", "", "Cron expression (UTC) for `sink pull-data`.", (SINK,)),
    Setting(
        "CRON_VERIFY", "", "Cron expression (UTC) for `verify --latest` of this role's stores."
    ),
    Setting(
        "CRON_AT_START",
        "",
        "Comma-separated jobs (`run`, `backup`, `push`, `pull-logs`, "
        "`pull-data`, `verify`) run once when `cron` starts, before the schedule.",
    ),
    # --- alerts and logging (every role) ---
    Setting("SMTP_HOST", "", "Mail server for alerts; empty: alerts are only logged."),
    Setting("SMTP_PORT", "25", "Mail server port (25, 587 for STARTTLS, 465 for TLS)."),
    Setting("SMTP_SECURITY", "starttls", "`starttls`, `tls` (implicit TLS) or `none`."),
    Setting("SMTP_USER", "", "Login for the mail server; empty: no login."),
    Setting("SMTP_PASSWORD", "", "Password for the mail server.", secret=True),
    Setting("SMTP_TIMEOUT", "30", "Seconds to wait for the mail server."),
    Setting("ALERT_FROM", "", "Sender address of alerts; empty: `backup-agent@<hostname>`."),
    Setting(
        "ALERT_TO", "", "Comma-separated recipients of alerts; required when `SMTP_HOST` is set."
    ),
    Setting(
        "NOTIFY_URLS",
        "",
        "Comma-separated Apprise URLs that receive the same alerts as the mail (ntfy://, "
        "gotify://, slack://, discord://, tgram://, matrix://, json:// webhooks …); empty: "
        "none. See docs/monitoring.md.",
        secret=True,
    ),
    Setting(
        "NOTIFY_LEVEL",
        "error",
        "`error`: NOTIFY_URLS receive what the alert mail says; `info`: also a summary of "
        "every job that succeeded.",
    ),
    # --- monitoring (docs/monitoring.md) ---
    Setting(
        "METRICS_PORT",
        "",
        "TCP port on which `backup-agent cron` serves Prometheus metrics (`/metrics`) and "
        "the status page (`/`); empty: not served.",
    ),
    Setting(
        "METRICS_BIND",
        "127.0.0.1",
        "Address the metrics port listens on; in a container set `0.0.0.0` deliberately.",
    ),
    Setting(
        "METRICS_TEXTFILE",
        "",
        "A `.prom` file rewritten atomically after every job with the same metrics, for "
        "node_exporter's textfile collector; empty: none.",
    ),
    Setting(
        "PING_URL",
        "",
        "Healthchecks-style ping URL of every job (healthchecks.io, Uptime Kuma push, "
        "Cronitor): `<url>/start` when a job starts, `<url>` when it succeeds, `<url>/fail` "
        "when it fails, the summary or the error as the body; empty: no pings.",
        secret=True,
    ),
    Setting(
        "PING_URL_BACKUP",
        "",
        "Ping URL of `source backup` alone (over PING_URL).",
        (SOURCE,),
        secret=True,
    ),
    Setting("PING_URL_PUSH", "", "Ping URL of `source push` alone.", (SOURCE,), secret=True),
    Setting("PING_URL_RESTORE", "", "Ping URL of `restore` alone.", (SOURCE,), secret=True),
    Setting("PING_URL_PULL_DATA", "", "Ping URL of `sink pull-data` alone.", (SINK,), secret=True),
    Setting("PING_URL_PULL_LOGS", "", "Ping URL of `sink pull-logs` alone.", (SINK,), secret=True),
    Setting("PING_URL_VERIFY", "", "Ping URL of `verify` alone.", secret=True),
    Setting("PING_TIMEOUT", "10", "Seconds to wait for a ping or a notification to be taken."),
    Setting(
        "CERT_WARN_DAYS",
        "14",
        "Alert (mail and NOTIFY_URLS) before each pull when SINK_SSH_CERT expires within this "
        "many days; 0: never.",
        (SINK,),
    ),
    Setting("LOG_LEVEL", "INFO", "`DEBUG`, `INFO`, `WARNING` or `ERROR`."),
    Setting("LOG_FORMAT", "plain", "`plain` lines or `json` lines, on standard error."),
)

SETTINGS_BY_ENV = {s.env: s for s in SETTINGS}
VERBATIM = {"SIGNAL_PROCESSES", "EXCLUDE"}  # a space at either end of a regular expression matters


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
    """The settings table of docs/settings.md, generated from the declarations."""
    lines = ["| variable | default | roles | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "*(required)*" if s.required else (f"`{s.default}`" if s.default else "")
        lines.append(f"| `{s.env}` | {default} | {', '.join(s.roles)} | {s.help} |")
    return "\n".join(lines)
