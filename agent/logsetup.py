"""Logging to standard error (standard output under `cron`), as plain lines or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

_stream: TextIO = sys.stderr


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {"time": self.formatTime(record), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
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
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter.converter = time.gmtime
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
