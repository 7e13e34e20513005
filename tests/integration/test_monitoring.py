"""Monitoring against the real things: a source agent's `cron` with a real application serves
/metrics and the status page (loaded in headless Chromium), pings a real HTTP server in the
healthchecks protocol and notifies through Apprise (json:// and ntfy://) to one; pings and
notifications that cannot be delivered never fail a backup; the sink's certificate is read
with ssh-keygen and alerts before it expires."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import config
from agent.monitoring import context, metrics, notify, state
from agent.monitoring.message import Alert
from agent.runtime import alerts
from tests.conftest import ROOT, agent_env, free_port, run_agent, start_agent, wait_until
from tests.sshd import SshCA, make_client_key

SCREENSHOT = ROOT / "docs" / "images" / "status-page.png"


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return answer.read().decode()


def _chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("no chromium: apt-get install chromium (tools/setup.sh installs it)")
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


@pytest.mark.docker
def test_cron_serves_metrics_and_a_status_page_that_chromium_shows(
    make_app, tmp_path, http_recorder, s3
):
    app = make_app()
    (app.data_dir / "orders.db").write_bytes(os.urandom(64 * 1024))
    port = free_port()
    check = f"/ping/{uuid.uuid4()}"
    env = agent_env(
        app,
        tmp_path / "handover",
        **s3.env(),
        CRON_RUN="* * * * * *",
        CRON_AT_START="run",
        METRICS_PORT=str(port),
        METRICS_TEXTFILE=str(tmp_path / "node" / "backup.prom"),
        PING_URL=http_recorder.url + check,
        NOTIFY_URLS=f"json://127.0.0.1:{http_recorder.port}/notify",
        NOTIFY_LEVEL="info",
    )
    state_path = tmp_path / "handover" / ".state" / state.FILE_NAME
    process = start_agent(env, "cron")
    try:

        def in_sink_store() -> list[str]:
            rows = state.load(state_path).get("stores", {}).get("rows", [])
            return [
                r["generation"]
                for r in rows
                if r["store"] == "sink store" and r["kind"] == "data" and r["complete"]
            ]

        wait_until(lambda: len(in_sink_store()) >= 2, timeout=90, interval=0.1)
        listed = in_sink_store()
        gens = s3.keys("")
        base = f"http://127.0.0.1:{port}/"

        scraped = _get(base + "metrics")
        samples = _samples(scraped)
        backup = frozenset({("role", "source"), ("job", "source backup")})
        assert samples[("backup_agent_job_success", backup)] == 1
        assert samples[("backup_agent_job_last_success_timestamp_seconds", backup)] > 0
        downtime = frozenset({("role", "source"), ("operation", "backup")})
        assert 0 < samples[("backup_agent_downtime_seconds", downtime)] < 30
        assert samples[("backup_agent_job_read_bytes", backup)] >= 0  # last run: nothing changed
        push = frozenset({("role", "source"), ("job", "source push")})
        assert samples[("backup_agent_job_transferred_bytes", push)] > 0
        waiting = frozenset({("role", "source"), ("kind", "data")})
        assert ("backup_agent_handover_waiting_generations", waiting) in samples
        where = "s3://backups/sites/test-source"
        sink = frozenset({("role", "source"), ("store", "sink store"), ("location", where)})
        assert samples[("backup_agent_store_dedup_ratio", sink)] > 0
        assert samples[("backup_agent_store_generations", sink | {("kind", "data")})] >= 2
        textfile = (tmp_path / "node" / "backup.prom").read_text()
        assert "backup_agent_store_dedup_ratio" in textfile

        page_path = tmp_path / "page.html"
        page_path.write_text(_get(base))
        dom = _chromium("--dump-dom", base).stdout
        for gen in listed:
            assert f'data-generation="{gen}"' in dom
        assert all(any(gen in key for key in gens) for gen in listed)
        assert 'id="runs-chart"' in dom and "healthy" in dom
        shot = tmp_path / "status-page.png"
        _chromium(f"--screenshot={shot}", "--window-size=1200,1500", base)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        if os.environ.get("UPDATE_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stdout + stderr

    pings = [(r.method, r.path, r.body.decode()) for r in http_recorder.requests]
    starts = [p for p in pings if p[1] == f"{check}/start"]
    successes = [p for p in pings if p[1] == check]
    assert starts and successes and all(method == "POST" for method, _, _ in starts)
    assert "source backup succeeded" in successes[0][2] and "generation 20" in successes[0][2]
    notes = [json.loads(r.body) for r in http_recorder.requests if r.path == "/notify"]
    assert any(n["title"] == "[backup-agent] test-source: source backup succeeded" for n in notes)


@pytest.mark.docker
def test_a_failed_backup_pings_fail_and_notifies_what_the_mail_says(
    make_app, tmp_path, http_recorder, smtp_server
):
    app = make_app(extra_labels={"backup.pre-command": "echo broken >&2; exit 7"})
    env = agent_env(
        app,
        tmp_path / "handover",
        smtp_server,
        PING_URL=http_recorder.url + "/hc",
        NOTIFY_URLS=f"json://127.0.0.1:{http_recorder.port}/hook,"
        f"ntfy://127.0.0.1:{http_recorder.port}/backups",
    )
    result = run_agent(env, "source", "backup")
    assert result.returncode == 1, result.stderr

    mail = smtp_server.wait_for(1)[0]
    http_recorder.wait_for(lambda got: sum(r.path in ("/hook", "/") for r in got) >= 2)
    by_path = {r.path: r for r in http_recorder.requests}
    assert "/hc/start" in by_path
    fail = by_path["/hc/fail"].body.decode()
    assert "source backup failure" in fail and "pre-command" in fail
    hook = json.loads(by_path["/hook"].body)
    ntfy = json.loads(by_path["/"].body)
    assert hook["title"] == mail["Subject"] == ntfy["title"]
    assert hook["type"] == "failure"
    body = mail.get_content().replace("\r\n", "\n").strip()
    assert hook["message"].strip() == body == ntfy["message"].strip()
    assert "Failed step:" in body and "Kept:" in body
    assert "backup_agent" not in by_path["/hc/fail"].headers.get("Content-Type", "")
    body_state = state.load(tmp_path / "handover" / ".state" / state.FILE_NAME)
    assert body_state["jobs"]["source backup"]["outcome"] == "failure"


@pytest.mark.docker
def test_pings_and_notifications_that_cannot_be_delivered_never_fail_the_backup(make_app, tmp_path):
    app = make_app()
    (app.data_dir / "file").write_text("data")
    closed = free_port()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = agent_env(
        app,
        tmp_path / "handover",
        PING_URL=f"http://127.0.0.1:{closed}/hc",
        NOTIFY_URLS=f"json://127.0.0.1:{closed}/hook",
        NOTIFY_LEVEL="info",
        METRICS_TEXTFILE=str(blocker / "backup.prom"),
        PING_TIMEOUT="2",
    )
    result = run_agent(env, "source", "backup")

    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "handover" / "data").iterdir())) == 1
    assert "monitor ping: source backup start not reported" in result.stderr
    assert "monitor ping: source backup end not reported" in result.stderr
    assert "monitor record: source backup end not reported" in result.stderr  # the textfile
    assert "notification not" in result.stderr
    assert app.reload() == "running"


def test_notifications_to_a_closed_port_are_logged_not_raised(caplog):
    closed = free_port()
    mail = config.parse_source(
        {"SOURCE_ID": "s", "DATA_PATHS": "/srv", "NOTIFY_URLS": f"json://127.0.0.1:{closed}/x"}
    ).mail
    alert = Alert("s", "source push", "2.a upload", "refused", "kept")
    assert notify.send(mail, alert) is False
    assert alerts.send(mail, alert) is False  # no SMTP_HOST either: only logged
    assert "notification not taken" in caplog.text


def _sink_settings(tmp_path: Path, cert: Path, **extra: str) -> config.SinkConfig:
    return config.parse_sink(
        {
            "SINK_STORE_DIR": str(tmp_path / "store"),
            "SINK_SOURCES": "shop=127.0.0.1",
            "SINK_SSH_KEY": str(tmp_path / "keys" / "id_ed25519"),
            "SINK_SSH_CERT": str(cert),
            "SINK_KNOWN_HOSTS": str(tmp_path / "known_hosts"),
            **extra,
        }
    )


def test_a_certificate_expiring_within_cert_warn_days_alerts_once_and_is_a_metric(
    tmp_path, smtp_server
):
    from agent.sink.jobs import check_certificate

    key = make_client_key(tmp_path / "keys")
    ca = SshCA(tmp_path / "ca")
    soon = ca.sign(key, "logBackupSource", validity="-1h:+5d")
    later = ca.sign(key, "logBackupSource", validity="-1h:+30d")
    mail = {
        "SMTP_HOST": smtp_server.host,
        "SMTP_PORT": str(smtp_server.port),
        "SMTP_SECURITY": "none",
        "ALERT_TO": "ops@example.org",
    }
    fine = _sink_settings(tmp_path, later, **mail)
    check_certificate(fine, context.for_sink(fine), "sink pull-logs")
    settings = _sink_settings(tmp_path, soon, **mail, CERT_WARN_DAYS="14")
    where = context.for_sink(settings)
    check_certificate(settings, where, "sink pull-logs")
    check_certificate(settings, where, "sink pull-data")  # the same day: no second alert

    messages = smtp_server.wait_for(1)
    assert len(messages) == 1
    assert (
        messages[0]["Subject"]
        == "[backup-agent] sink: sink pull-logs: SSH certificate expires soon"
    )
    assert "in 4 day(s)" in messages[0].get_content()
    samples = _samples(metrics.exposition(state.load(where.state_path)).decode())
    expiry = samples[
        (
            "backup_agent_ssh_certificate_expiry_timestamp_seconds",
            frozenset({("role", "sink"), ("path", str(soon))}),
        )
    ]
    expected = datetime.now(UTC) + timedelta(days=5)
    assert abs(expiry - expected.timestamp()) < 120

    later_day = datetime.now(UTC) + timedelta(days=1)
    check_certificate(settings, where, "sink pull-logs", now=later_day)
    assert len(smtp_server.wait_for(2, timeout=5)) == 2  # a day later: alerted again


class HeldPings:
    """A healthchecks-style HTTP server on loopback that holds every request whose path ends
    in `held` until released: how a test sends SIGTERM while the agent waits on a ping."""

    def __init__(self, held: str) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.paths: list[str] = []
        self.arrived, self.release = threading.Event(), threading.Event()
        pings = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                pings.paths.append(self.path)
                if self.path.endswith(held):
                    pings.arrived.set()
                    pings.release.wait(30)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hc"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.docker
@pytest.mark.parametrize("held", ["/hc/start", "/hc"])
def test_a_sigterm_while_a_ping_is_sent_ends_the_job_with_143(make_app, tmp_path, held):
    """Held at the start ping, nothing is backed up and the end is pinged as a failure; held
    at the success ping, the backup is complete and the ping is still delivered."""
    app = make_app()
    (app.data_dir / "file").write_text("data")
    pings = HeldPings(held)
    env = agent_env(app, tmp_path / "handover", PING_URL=pings.url, PING_TIMEOUT="60")
    agent = start_agent(env, "source", "backup")
    try:
        assert pings.arrived.wait(60), pings.paths
        agent.send_signal(signal.SIGTERM)
        pings.release.set()
        _, stderr = agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.communicate()
        pings.close()

    assert agent.returncode == 128 + signal.SIGTERM, stderr
    assert app.reload() == "running"
    data = tmp_path / "handover" / "data"
    backed_up = [g for g in data.iterdir() if not g.name.startswith(".")] if data.exists() else []
    if held == "/hc/start":
        assert backed_up == [] and pings.paths == ["/hc/start", "/hc/fail"], pings.paths
    else:
        assert len(backed_up) == 1 and pings.paths == ["/hc/start", "/hc"], pings.paths
