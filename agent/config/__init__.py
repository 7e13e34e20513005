"""Every setting, declared once, and the typed configuration of each role.

A setting is read from the environment, from an optional `.env` file (the environment wins),
or from a secret file named by `NAME_FILE`. `parse_*` functions are pure: they take the raw
values and return a dataclass or raise `ConfigError` listing every invalid setting at once.
`path_problems` and `sink_path_problems` are the only functions here that look at the
filesystem (they create nothing); `load_source` and `load_sink` report both kinds together.

    settings   the table of every setting (env name, default, help, roles)
    parsing    reading the raw values, and the parser that collects every problem
    shared     what every role reads: alerts (mail, Apprise), the decryption identity
    monitoring what every role reads: metrics, pings per job, the certificate warning
    source     the source agent (step 1, push, restore)
    sink       the sink agent, and the SSH gateway on the source
    cron       the schedules of the cron entrypoint

This module is the room's front door: the rest of the agent imports from `agent.config`.
"""

from __future__ import annotations

from agent.config.cron import CRON_JOBS, CronConfig, parse_cron
from agent.config.monitoring import PING_JOBS, MonitorConfig
from agent.config.parsing import (
    SOURCE_ID_RE,
    ConfigError,
    LabelSelector,
    Values,
    parse_label_selector,
    read_values,
)
from agent.config.settings import (
    ALL_ROLES,
    SETTINGS,
    SETTINGS_BY_ENV,
    SINK,
    SOURCE,
    Setting,
    effective,
    markdown_table,
)
from agent.config.shared import MailConfig
from agent.config.sink import (
    GatewayConfig,
    SinkConfig,
    SourceEndpoint,
    load_sink,
    parse_gateway,
    parse_sink,
    parse_sources,
    sink_path_problems,
)
from agent.config.source import (
    QUIESCE_MODES,
    S3Settings,
    SourceConfig,
    Workload,
    load_source,
    parse_process_pattern,
    parse_source,
    parse_workloads,
    path_problems,
)

__all__ = [
    "ALL_ROLES",
    "CRON_JOBS",
    "PING_JOBS",
    "QUIESCE_MODES",
    "SETTINGS",
    "SETTINGS_BY_ENV",
    "SINK",
    "SOURCE",
    "SOURCE_ID_RE",
    "ConfigError",
    "CronConfig",
    "GatewayConfig",
    "LabelSelector",
    "MailConfig",
    "MonitorConfig",
    "S3Settings",
    "Setting",
    "SinkConfig",
    "SourceConfig",
    "SourceEndpoint",
    "Values",
    "Workload",
    "effective",
    "load_sink",
    "load_source",
    "markdown_table",
    "parse_cron",
    "parse_gateway",
    "parse_label_selector",
    "parse_process_pattern",
    "parse_sink",
    "parse_source",
    "parse_sources",
    "parse_workloads",
    "path_problems",
    "read_values",
    "sink_path_problems",
]
