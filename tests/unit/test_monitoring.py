"""The monitoring room's pure logic: the state of runs, the metrics of a state, the status
page, the certificate's validity, the settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from prometheus_client.parser import text_string_to_metric_families

from agent import config
from agent.monitoring import certificate, hooks, metrics, state, statuspage
from agent.monitoring.state import FAILURE, SUCCESS, Run

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
T = NOW.timestamp()


def _row(store: str, gen: str, kind: str = "data", complete: bool = True, **extra: object):
    return {
        "store": store,
        "location": f"/{store.replace(' ', '-')}/shop",
        "kind": kind,
        "generation": gen,
        "size": 1000,
        "age_seconds": 0,
        "complete": complete,
        "last_verified": "2026-11-30T11:00:00Z",
        "store_size": 5000,
        "store_dedup_ratio": 2.5,
        **extra,
    }


def _state() -> state.Body:
    body = state.empty("source", "shop")
    body = state.with_run(
        body,
        Run(
            "source backup",
            T - 60,
            T - 50,
            SUCCESS,
            summary="generation 2026-11-30T11-59-00Z",
            downtime_seconds=0.4,
            read_bytes=100,
            stored_bytes=40,
        ),
    )
    body = state.with_run(body, Run("source push", T - 50, T - 45, FAILURE, error="2.a: refused"))
    body = state.with_run(body, Run("verify", T - 40, T - 30, SUCCESS))
    rows = [
        _row("handover", "2026-11-30T11-00-00Z"),
        _row("handover", "2026-11-30T11-59-00Z"),
        _row("source store", "2026-11-29T12-00-00Z"),
        _row("source store", "2026-11-29T12-00-00Z", kind="logs", store_dedup_ratio=None),
        _row("sink store", "2026-11-28T12-00-00Z", complete=False),
    ]
    return state.with_stores(body, rows, [], T - 20)


def _samples(body: state.Body) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition(body).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_the_metrics_of_a_state_name_every_job_and_store():
    samples = _samples(_state())
    job = {"role": "source", "job": "source backup"}
    assert _value(samples, "backup_agent_job_success", **job) == 1
    assert _value(samples, "backup_agent_job_success", role="source", job="source push") == 0
    assert _value(samples, "backup_agent_job_duration_seconds", **job) == 10
    assert _value(samples, "backup_agent_job_last_success_timestamp_seconds", **job) == T - 50
    assert _value(samples, "backup_agent_job_read_bytes", **job) == 100
    assert _value(samples, "backup_agent_job_stored_bytes", **job) == 40
    assert (
        _value(
            samples,
            "backup_agent_job_runs_total",
            outcome="failure",
            role="source",
            job="source push",
        )
        == 1
    )
    assert (
        _value(samples, "backup_agent_downtime_seconds", role="source", operation="backup") == 0.4
    )
    assert _value(samples, "backup_agent_verify_success", role="source") == 1
    store = {"role": "source", "store": "source store", "location": "/source-store/shop"}
    assert _value(samples, "backup_agent_store_generations", kind="data", **store) == 1
    assert _value(samples, "backup_agent_store_generations_bytes", kind="data", **store) == 1000
    assert _value(samples, "backup_agent_store_size_bytes", **store) == 5000
    assert (
        "backup_agent_store_generations",
        (
            ("kind", "data"),
            ("location", "/sink-store/shop"),
            ("role", "source"),
            ("store", "sink store"),
        ),
    ) not in samples  # incomplete: not counted
    assert (
        _value(samples, "backup_agent_handover_waiting_generations", role="source", kind="data")
        == 2
    )
    oldest = _value(samples, "backup_agent_handover_oldest_waiting_age_seconds", role="source")
    assert (
        oldest >= (datetime.now(UTC) - datetime(2026, 11, 30, 11, tzinfo=UTC)).total_seconds() - 5
    )


def test_a_certificate_valid_forever_is_an_infinite_expiry():
    body = state.with_certificate(state.empty("sink", "sink"), "/k-cert.pub", None, T)
    samples = _samples(body)
    assert _value(
        samples,
        "backup_agent_ssh_certificate_expiry_timestamp_seconds",
        role="sink",
        path="/k-cert.pub",
    ) == float("inf")


def test_every_metric_follows_the_naming_conventions():
    for family in text_string_to_metric_families(metrics.exposition(_state()).decode()):
        assert family.name.startswith("backup_agent_")
        unit_ok = family.name.endswith(("_seconds", "_bytes", "_ratio", "_generations", "_runs"))
        assert unit_ok or family.name in (
            "backup_agent_info",
            "backup_agent_job_success",
            "backup_agent_verify_success",
        ), family.name


def test_the_state_keeps_the_last_30_runs_and_the_last_success():
    body = state.empty("source", "shop")
    for i in range(40):
        body = state.with_run(body, Run("source backup", i, i + 1, SUCCESS if i < 35 else FAILURE))
    assert len(body["runs"]) == state.RUNS_KEPT
    assert body["runs"][0]["started"] == 10
    entry = body["jobs"]["source backup"]
    assert entry["last_success"] == 35 and entry["outcome"] == FAILURE
    assert entry["runs"] == {SUCCESS: 35, FAILURE: 5}


def test_an_interrupted_run_leaves_the_success_metric_as_the_last_whole_run_set_it():
    body = state.with_run(state.empty("source", "shop"), Run("source backup", 0, 1, SUCCESS))
    body = state.with_run(body, Run("source backup", 2, 3, state.INTERRUPTED, error="SIGTERM"))
    samples = _samples(body)
    assert _value(samples, "backup_agent_job_success", role="source", job="source backup") == 1
    assert body["jobs"]["source backup"]["outcome"] == state.INTERRUPTED


def test_the_status_page_lists_generations_health_and_the_chart():
    page = statuspage.render(_state(), ["the scheduler has not reported since x"], NOW)
    assert page.count('class="generation"') == 5
    assert 'data-generation="2026-11-30T11-59-00Z"' in page
    assert 'id="handover"' in page and "2026-11-30T11-00-00Z" in page
    assert "unhealthy" in page and "source push: the last run" in page
    assert page.count('class="run"') == 3 and page.count('class="downtime"') == 1
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )  # nothing to fetch: it works offline


def test_the_status_page_escapes_what_it_shows():
    body = state.with_run(
        state.empty("source", "<b>x</b>"), Run("j", 0, 1, FAILURE, error="<script>")
    )
    page = statuspage.render(body, [], NOW)
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>x</b>" not in page


def test_sizes_and_ages_read_as_people_say_them():
    assert statuspage.size_text(1536) == "1.5 KiB" and statuspage.size_text(12) == "12 B"
    assert statuspage.age_text(90061) == "1 d 1 h" and statuspage.age_text(59) == "59 s"


LISTING = """/k-cert.pub:
        Type: ssh-ed25519-cert-v01@openssh.com user certificate
        Public key: ED25519-CERT SHA256:abc
        Signing CA: ED25519 SHA256:def (using ssh-ed25519)
        Key ID: "sink"
        Serial: 1
        Valid: from 2026-11-30T11:00:00 to 2026-12-05T11:00:00
        Principals:
                logBackupSource
        Critical Options: (none)
        Extensions: (none)
"""


def test_the_certificate_validity_is_read_from_ssh_keygen_listing():
    valid = certificate.validity(LISTING)
    assert valid.after == datetime(2026, 11, 30, 11, tzinfo=UTC)
    assert valid.before == datetime(2026, 12, 5, 11, tzinfo=UTC)
    forever = LISTING.replace("from 2026-11-30T11:00:00 to 2026-12-05T11:00:00", "forever")
    assert certificate.validity(forever) == certificate.Validity(None, None)
    with pytest.raises(ValueError):
        certificate.validity("not a listing")


def test_the_certificate_warning_starts_within_the_warn_days():
    valid = certificate.Validity(NOW - timedelta(hours=1), NOW + timedelta(days=5))
    assert "expires on 2026-12-05" in certificate.warning(valid, NOW, 14)
    assert certificate.warning(valid, NOW, 5) == ""
    assert certificate.warning(valid, NOW, 0) == ""
    assert certificate.warning(certificate.Validity(None, None), NOW, 14) == ""


def test_no_expiry_warning_for_a_certificate_not_valid_now():
    """The pull fails then, and its alert names what is wrong with the certificate."""
    expired = certificate.Validity(None, NOW - timedelta(hours=1))
    not_yet = certificate.Validity(NOW + timedelta(days=1), NOW + timedelta(days=2))
    assert certificate.warning(expired, NOW, 14) == certificate.warning(not_yet, NOW, 14) == ""


def test_figures_are_taken_from_the_jobs_results():
    from agent.sink.pull import PullResult
    from agent.source.backup import BackupResult
    from agent.source.push import PushResult

    backup = hooks.figures(BackupResult("2026-11-30T12-00-00Z", 0.25, 42, 3, 1.0, 100))
    assert backup == {
        "downtime_seconds": 0.25,
        "read_bytes": 100,
        "stored_bytes": 42,
        "summary": "generation 2026-11-30T12-00-00Z, downtime 0.25 s",
    }
    pushed = hooks.figures(PushResult(["data/2026-11-30T12-00-00Z"], 7))
    assert pushed["transferred_bytes"] == 7
    assert pushed["summary"] == "pushed 1: data/2026-11-30T12-00-00Z"
    assert hooks.figures(PullResult([], 9))["transferred_bytes"] == 9
    assert hooks.figures(None) == {"summary": ""}


def test_monitoring_settings_are_checked_together():
    with pytest.raises(config.ConfigError) as raised:
        config.parse_source(
            {
                "SOURCE_ID": "shop",
                "DATA_PATHS": "/srv",
                "METRICS_PORT": "99999",
                "METRICS_BIND": "everywhere",
                "METRICS_TEXTFILE": "/var/lib/node/backup.txt",
                "PING_URL": "ftp://x",
                "NOTIFY_URLS": "not a url",
                "NOTIFY_LEVEL": "debug",
            }
        )
    named = {problem.split(":")[0] for problem in raised.value.problems}
    assert {
        "METRICS_PORT",
        "METRICS_BIND",
        "METRICS_TEXTFILE",
        "PING_URL",
        "NOTIFY_URLS",
        "NOTIFY_LEVEL",
    } <= named


def test_a_job_of_its_own_ping_url_wins_over_ping_url():
    settings = config.parse_source(
        {
            "SOURCE_ID": "shop",
            "DATA_PATHS": "/srv",
            "PING_URL": "https://hc.example/a/",
            "PING_URL_PUSH": "https://hc.example/b",
        }
    )
    assert settings.monitor.ping_url("source backup") == "https://hc.example/a"
    assert settings.monitor.ping_url("source push") == "https://hc.example/b"
    assert settings.monitor.ping_url("source reconcile") == ""
    assert settings.monitor.metrics_port == 0  # off by default


class StateFile(RuleBasedStateMachine):
    """Runs recorded one after another, with crashes while the state is being saved: the file
    always holds the state of a whole number of runs, never a torn one."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile
        from pathlib import Path

        self.path = Path(tempfile.mkdtemp()) / state.FILE_NAME
        self.recorded = 0
        self.clock = 0.0

    @rule(outcome=st.sampled_from([SUCCESS, FAILURE]), took=st.floats(0, 100))
    def run(self, outcome: str, took: float) -> None:
        self.clock += 1000
        run = Run("source backup", self.clock, self.clock + took, outcome)
        state.update(self.path, "source", "shop", lambda body: state.with_run(body, run))
        self.recorded += 1

    @rule()
    def crash_while_saving(self) -> None:
        import json

        real = json.dump

        def torn(body, handle, **kwargs):  # type: ignore[no-untyped-def]
            handle.write('{"jobs": ')
            raise KeyboardInterrupt  # the process dies half way

        json.dump = torn
        try:
            with pytest.raises(KeyboardInterrupt):
                state.update(self.path, "source", "shop", lambda body: body)
        finally:
            json.dump = real

    @invariant()
    def the_file_holds_every_recorded_run(self) -> None:
        body = state.load(self.path)
        runs = body.get("jobs", {}).get("source backup", {}).get("runs", {})
        assert sum(runs.values()) == self.recorded
        assert len(body.get("runs", [])) == min(self.recorded, state.RUNS_KEPT)
        assert not list(self.path.parent.glob(".monitoring-*"))  # no temporary file left


TestStateFile = StateFile.TestCase
TestStateFile.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
