"""The metrics port: `/metrics` (Prometheus text format) and `/` (the status page), served by
a thread of the long-lived `cron` process from the state file the jobs write, so it answers
between jobs and while one runs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from agent.monitoring import metrics, state, statuspage

logger = logging.getLogger(__name__)


class MetricsServer:
    """Serves the state at `state_path` on `bind`:`port` until `close()`; `health` says what
    is wrong (the `health` command's findings) for the status page."""

    def __init__(
        self,
        bind: str,
        port: int,
        state_path: Path,
        health: Callable[[], Sequence[str]] = lambda: (),
    ) -> None:
        self.state_path = state_path
        self.health = health
        handler = _handler(self)
        self.httpd = ThreadingHTTPServer((bind, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> MetricsServer:
        self.thread.start()
        logger.info("metrics and the status page at %s (/metrics, /)", self.url)
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def page(self) -> bytes:
        try:
            problems = list(self.health())
        except Exception as exc:  # the page still shows what it can
            problems = [f"health could not be assessed: {exc}"]
        body = state.load(self.state_path)
        return statuspage.render(body, problems, datetime.now(UTC)).encode()

    def metrics(self) -> bytes:
        return metrics.exposition(state.load(self.state_path))


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, CONTENT_TYPE_LATEST, server.metrics())
            elif path in ("/", "/index.html"):
                self._answer(200, "text/html; charset=utf-8", server.page())
            else:
                self._answer(404, "text/plain; charset=utf-8", b"not found: try / or /metrics\n")

        def _answer(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("metrics port: " + format, *args)

    return Handler
