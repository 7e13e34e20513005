"""Logging to standard error (standard output under `cron`), as plain lines or JSON lines.
Lines logged while a job works for one source (`for_source`, e.g. one of several pulled at
once) carry its id: `[<source id>] ` before the logger's name, `"source"` in JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

_stream: TextIO = sys.stderr
_source: ContextVar[str] = ContextVar("source", default="")


@contextmanager
def for_source(source_id: str) -> Iterator[None]:
    """Mark every line the calling thread logs in the block with `source_id`."""
    token = _source.set(source_id)
    try:
        yield
    finally:
        _source.reset(token)


class _SourceFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        source = _source.get()
        record.source = source
        record.source_prefix = f"[{source}] " if source else ""
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        source = getattr(record, "source", "")
        if source:
            body["source"] = source
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body)


def send_to(stream: TextIO) -> None:
    """Send the log of this process, also of jobs configured later, to `stream`."""
    global _stream
    _stream = stream


def configure(level: str = "INFO", fmt: str = "plain") -> None:
    handler = logging.StreamHandler(_stream)
    if fmt == "json":
        formatter: logging.Formatter = _JsonFormatter()
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)s %(source_prefix)s%(name)s: %(message)s"
        )
    formatter.converter = time.gmtime
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    handler.setFormatter(formatter)
    handler.addFilter(_SourceFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
