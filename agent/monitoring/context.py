"""Where an agent's monitors report: its role and name, its state file, its settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent import config
from agent.core.handover import Handover
from agent.monitoring.state import FILE_NAME


@dataclass(frozen=True)
class Monitoring:
    role: str
    name: str  # the source id, or "sink"
    state_path: Path
    settings: config.MonitorConfig
    mail: config.MailConfig


def for_source(settings: config.SourceConfig) -> Monitoring:
    path = Handover(settings.handover_dir).state / FILE_NAME
    return Monitoring(config.SOURCE, settings.source_id, path, settings.monitor, settings.mail)


def for_sink(settings: config.SinkConfig) -> Monitoring:
    path = settings.state_dir / FILE_NAME
    return Monitoring(config.SINK, "sink", path, settings.monitor, settings.mail)
