"""Step 2 in push mode against a real S3 server (SeaweedFS), with a least-privilege identity."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import config
from agent.core import generation, manifest
from agent.runtime import jobs
from agent.runtime.interrupts import InterruptGuard
from agent.source import push
from agent.stores.s3 import S3Store
from tests.conftest import S3_BUCKET, S3_PREFIX, agent_env, run_agent
from tests.generations import SOURCE, make_generation


def push_env(tmp_path: Path, s3, mail=None, **extra: str) -> dict[str, str]:
    data = tmp_path / "app-data"
    data.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "SOURCE_ID": SOURCE,
        "DATA_PATHS": str(data),
        "HANDOVER_DIR": str(tmp_path / "handover"),
        "SOURCE_STORE_DIR": str(tmp_path / "store"),
        "S3_RETRY_SECONDS": "2",
        **s3.env(),
    }
    if mail is not None:
        env.update(
            SMTP_HOST=mail.host,
            SMTP_PORT=str(mail.port),
            SMTP_SECURITY="none",
            ALERT_TO="ops@example.org",
        )
    env.update(extra)
    return env


def sink_keys(s3, kind: str = "data") -> list[str]:
    return s3.keys(f"{S3_PREFIX}/{SOURCE}/{kind}/")


def sink_generations(s3, kind: str = "data") -> list[str]:
    return sorted({k.split("/")[3] for k in sink_keys(s3, kind) if k.endswith("MANIFEST.json")})


def ids(start: datetime, step: timedelta, count: int) -> list[str]:
    return [generation.format_id(start + step * i) for i in range(count)]


def test_push_uploads_verifies_and_moves_to_the_source_store(tmp_path, s3):
    [gen] = ids(datetime(2026, 11, 1, tzinfo=UTC), timedelta(0), 1)
    content = make_generation(tmp_path / "handover", gen, size=40 << 20)  # multipart

    result = run_agent(push_env(tmp_path, s3, S3_PART_SIZE_MB="8"), "source", "push")

    assert result.returncode == 0, result.stderr
    assert sink_keys(s3) == [
        f"{S3_PREFIX}/{SOURCE}/data/{gen}/MANIFEST.json",
        f"{S3_PREFIX}/{SOURCE}/data/{gen}/data.tar.zst",
    ]
    body = s3.client().get_object(
        Bucket=S3_BUCKET, Key=f"{S3_PREFIX}/{SOURCE}/data/{gen}/data.tar.zst"
    )["Body"]
    assert body.read() == content
    assert not (tmp_path / "handover" / "data" / gen).exists()
    assert (tmp_path / "store" / "data" / gen / "data.tar.zst").read_bytes() == content


@pytest.mark.parametrize("mode", ["checksum", "download"])
def test_an_object_corrupted_after_upload_fails_verification_and_nothing_moves(
    tmp_path, s3, smtp_server, mode
):
    old, new = ids(datetime(2026, 11, 1, tzinfo=UTC), timedelta(days=1), 2)
    make_generation(tmp_path / "handover", old)
    env = push_env(
        tmp_path,
        s3,
        smtp_server,
        SINK_KEEP_LAST="1",
        SINK_KEEP_DAILY="0",
        SINK_KEEP_WEEKLY="0",
        SINK_KEEP_MONTHLY="0",
        VERIFY=mode,
    )
    assert run_agent(env, "source", "push").returncode == 0
    make_generation(tmp_path / "handover", new)
    settings = config.parse_source(env, push=True)
    store = S3Store(settings.s3, SOURCE)
    data_key = store.key("data", new, "data.tar.zst")

    def rewrite_through_the_s3_api(**_: object) -> None:
        s3.client().put_object(Bucket=S3_BUCKET, Key=data_key, Body=os.urandom(200_000))

    store.client.meta.events.register(
        "after-call.s3.PutObject", rewrite_through_the_s3_api, unique_id="corrupt"
    )

    code = jobs.run_job(
        push.JOB,
        lambda guard: push.push(settings, store, guard),
        SOURCE,
        settings.mail,
        InterruptGuard(),
    )

    assert code == jobs.EXIT_FAILED
    [mail] = smtp_server.wait_for(1)
    assert "verify data generation" in mail["Subject"]
    assert new in mail.get_content() and "stay in the handover" in mail.get_content()
    assert sink_generations(s3) == [old], "the corrupt generation must not look complete"
    assert (tmp_path / "handover" / "data" / new / "data.tar.zst").exists()
    assert not (tmp_path / "store" / "data" / new).exists()


def test_the_store_down_during_a_push_is_retried_alerted_and_caught_up_in_order(
    tmp_path, s3, smtp_server
):
    first, second = ids(datetime(2026, 11, 1, tzinfo=UTC), timedelta(hours=1), 2)
    make_generation(tmp_path / "handover", first)
    env = push_env(tmp_path, s3, smtp_server)
    s3.stop()

    failed = run_agent(env, "source", "push")

    assert failed.returncode == 1
    assert "retry" in failed.stderr
    assert "Traceback" not in failed.stderr
    [mail] = smtp_server.wait_for(1)
    assert "2.a upload data generation" in mail["Subject"]
    assert (tmp_path / "handover" / "data" / first / manifest.NAME).exists()

    s3.start()
    make_generation(tmp_path / "handover", second)
    caught_up = run_agent(env, "source", "push")

    assert caught_up.returncode == 0, caught_up.stderr
    assert sink_generations(s3) == [first, second]
    uploads = [line for line in caught_up.stderr.splitlines() if "2.a upload" in line]
    assert first in uploads[0] and second in uploads[1]
    assert sorted(os.listdir(tmp_path / "store" / "data")) == [first, second]
    assert os.listdir(tmp_path / "handover" / "data") == []


def test_rotation_over_twelve_generations_spread_over_weeks_keeps_exactly_the_right_ones(
    tmp_path, s3
):
    gens = ids(datetime(2026, 1, 5, 2, tzinfo=UTC), timedelta(days=3), 12)
    for gen in gens:
        make_generation(tmp_path / "handover", gen, size=1000)
    env = push_env(
        tmp_path,
        s3,
        SINK_KEEP_LAST="2",
        SINK_KEEP_DAILY="3",
        SINK_KEEP_WEEKLY="3",
        SINK_KEEP_MONTHLY="2",
        SOURCE_KEEP_LAST="2",
    )

    result = run_agent(env, "source", "push")

    assert result.returncode == 0, result.stderr
    assert sink_generations(s3) == [
        "2026-01-23T02-00-00Z",
        "2026-01-29T02-00-00Z",
        "2026-02-01T02-00-00Z",
        "2026-02-04T02-00-00Z",
        "2026-02-07T02-00-00Z",
    ]
    assert sorted(os.listdir(tmp_path / "store" / "data")) == gens[-2:]


def test_an_incomplete_generation_in_the_store_is_ignored_and_later_removed(tmp_path, s3):
    abandoned, pushed, in_progress = ids(datetime(2026, 11, 1, tzinfo=UTC), timedelta(days=1), 3)
    admin = s3.client()
    for gen in (abandoned, in_progress):
        admin.put_object(
            Bucket=S3_BUCKET,
            Key=f"{S3_PREFIX}/{SOURCE}/data/{gen}/data.tar.zst",
            Body=b"partial upload",
        )
    make_generation(tmp_path / "handover", pushed)

    result = run_agent(push_env(tmp_path, s3, SINK_KEEP_LAST="1"), "source", "push")

    assert result.returncode == 0, result.stderr
    assert sink_generations(s3) == [pushed]
    remaining = {key.split("/")[3] for key in sink_keys(s3)}
    assert remaining == {pushed, in_progress}


def test_wrong_credentials_give_one_clear_line_and_no_stack_trace(tmp_path, s3):
    make_generation(tmp_path / "handover", "2026-11-01T00-00-00Z")
    env = push_env(tmp_path, s3, AWS_SECRET_ACCESS_KEY="wrong")

    result = run_agent(env, "source", "push")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "SignatureDoesNotMatch" in result.stderr and "AWS_SECRET_ACCESS_KEY" in result.stderr
    assert (tmp_path / "handover" / "data" / "2026-11-01T00-00-00Z").exists()


def test_a_bucket_that_does_not_exist_is_named_as_a_cause_of_access_denied(tmp_path, s3):
    make_generation(tmp_path / "handover", "2026-11-01T00-00-00Z")
    env = push_env(tmp_path, s3, S3_BUCKET="no-such-bucket")

    result = run_agent(env, "source", "push")

    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if "ERROR agent.runtime.steps" in line]
    assert "AccessDenied" in line and "S3_BUCKET" in line and "exists" in line, line
    assert "cannot create" in line, line
    assert (tmp_path / "handover" / "data" / "2026-11-01T00-00-00Z").exists()


def test_a_source_identity_may_write_only_its_own_prefix(s3):
    own, other = s3.client("test-source"), s3.client("other-source")
    own.put_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}/{SOURCE}/data/x", Body=b"1")
    for attempt in (
        lambda: other.put_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}/{SOURCE}/data/y", Body=b"1"),
        lambda: other.get_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}/{SOURCE}/data/x"),
        lambda: other.delete_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}/{SOURCE}/data/x"),
        lambda: other.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{S3_PREFIX}/{SOURCE}/"),
        lambda: own.list_objects_v2(Bucket=S3_BUCKET, Prefix=""),
    ):
        with pytest.raises(Exception, match="AccessDenied"):
            attempt()
    assert s3.keys(f"{S3_PREFIX}/{SOURCE}/") == [f"{S3_PREFIX}/{SOURCE}/data/x"]


@pytest.mark.docker
def test_source_run_backs_up_and_pushes_data_and_logs(make_app, tmp_path, s3):
    app = make_app()
    (app.data_dir / "orders.db").write_bytes(os.urandom(1 << 20))
    env = {**agent_env(app, tmp_path / "handover"), **s3.env(), "PUSH_LOGS": "true"}

    result = run_agent(env, "source", "run")

    assert result.returncode == 0, result.stderr
    [gen] = sink_generations(s3)
    assert sink_generations(s3, "logs") == [gen]
    assert os.listdir(tmp_path / "handover" / "data") == []
    assert os.listdir(tmp_path / "handover" / "logs") == []
    assert (tmp_path / "store" / "data" / gen / manifest.NAME).exists()
    assert app.reload() == "running"


@pytest.mark.docker
def test_a_push_site_with_default_settings_keeps_nothing_waiting_and_alerts_nothing(
    make_app, tmp_path, s3, smtp_server
):
    app = make_app()
    env = {**agent_env(app, tmp_path / "handover", smtp_server), **s3.env()}

    for _ in range(3):
        result = run_agent(env, "source", "run")
        assert result.returncode == 0, result.stderr

    assert os.listdir(tmp_path / "handover" / "logs") == []
    assert os.listdir(tmp_path / "handover" / "data") == []
    assert len(sink_generations(s3, "logs")) == 3
    assert sink_generations(s3, "logs") == sink_generations(s3)
    assert smtp_server.wait_for(1, timeout=2) == []


def start_upload(s3, identity: str, key: str) -> str:
    """A multipart upload with one part, begun and left, as an agent killed or cut off by an
    S3 outage leaves it. Return its id."""
    client = s3.client(identity)
    upload_id = client.create_multipart_upload(Bucket=S3_BUCKET, Key=key)["UploadId"]
    client.upload_part(
        Bucket=S3_BUCKET, Key=key, UploadId=upload_id, PartNumber=1, Body=os.urandom(5 << 20)
    )
    return upload_id


def uploads_in_progress(s3, prefix: str) -> set[str]:
    listing = s3.client().list_multipart_uploads(Bucket=S3_BUCKET, Prefix=prefix)
    return {upload["UploadId"] for upload in listing.get("Uploads", [])}


def test_a_push_aborts_the_multipart_uploads_an_earlier_run_left_and_no_other_sources(tmp_path, s3):
    stale_gen, gen = ids(datetime(2026, 11, 1, tzinfo=UTC), timedelta(days=1), 2)
    own = f"{S3_PREFIX}/{SOURCE}/"
    other = f"{S3_PREFIX}/other-source/"
    stale = start_upload(s3, SOURCE, f"{own}data/{stale_gen}/data.tar.zst")
    others = start_upload(s3, "other-source", f"{other}data/{stale_gen}/data.tar.zst")
    assert uploads_in_progress(s3, own) == {stale}
    make_generation(tmp_path / "handover", gen, size=12 << 20)  # multipart itself

    result = run_agent(push_env(tmp_path, s3, S3_PART_SIZE_MB="5"), "source", "push")

    assert result.returncode == 0, result.stderr
    assert uploads_in_progress(s3, own) == set()
    assert uploads_in_progress(s3, other) == {others}, "another source's upload was touched"
    assert sink_generations(s3) == [gen]


def test_an_upload_begun_after_the_push_started_is_not_aborted(tmp_path, s3):
    stale_gen, gen = ids(datetime(2026, 11, 1, tzinfo=UTC), timedelta(days=1), 2)
    own = f"{S3_PREFIX}/{SOURCE}/"
    stale = start_upload(s3, SOURCE, f"{own}data/{stale_gen}/data.tar.zst")
    make_generation(tmp_path / "handover", gen)
    settings = config.parse_source(push_env(tmp_path, s3), push=True)
    store = S3Store(settings.s3, SOURCE)
    later: list[str] = []

    def begin_another_upload(**_: object) -> None:
        if not later:  # as soon as the push has looked: newer than anything it found
            later.append(start_upload(s3, SOURCE, f"{own}data/{gen}/other.bin"))

    store.client.meta.events.register(
        "after-call.s3.ListMultipartUploads", begin_another_upload, unique_id="later"
    )

    push.push(settings, store, InterruptGuard())

    assert uploads_in_progress(s3, own) == set(later) != {stale}


def test_list_shows_the_source_store_copy_of_a_pushed_generation_as_verified(tmp_path, s3):
    [gen] = ids(datetime(2026, 11, 1, tzinfo=UTC), timedelta(0), 1)
    make_generation(tmp_path / "handover", gen)
    env = push_env(tmp_path, s3)
    assert run_agent(env, "source", "push").returncode == 0

    rows = {
        row["store"]: row
        for row in json.loads(run_agent(env, "list", "--json").stdout)
        if row["generation"] == gen
    }

    assert rows["sink store"]["last_verified"]
    assert rows["source store"]["location"] == str(tmp_path / "store")
    assert rows["source store"]["last_verified"], rows
    assert "never" not in run_agent(env, "list").stdout


def test_each_retention_log_line_names_the_store_it_pruned(tmp_path, s3):
    gens = ids(datetime(2026, 11, 1, tzinfo=UTC), timedelta(days=1), 3)
    for gen in gens:
        make_generation(tmp_path / "handover", gen, size=1000)
    env = push_env(
        tmp_path,
        s3,
        SINK_KEEP_LAST="2",
        SINK_KEEP_DAILY="0",
        SINK_KEEP_WEEKLY="0",
        SINK_KEEP_MONTHLY="0",
        SOURCE_KEEP_LAST="1",
    )

    result = run_agent(env, "source", "push")

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "retention" in line]
    sink = f"sink store s3://{S3_BUCKET}/{S3_PREFIX}/{SOURCE}"
    source = f"source store {tmp_path / 'store'}"
    assert [line for line in lines if sink in line and f"removed 1: {gens[0]}" in line], lines
    assert [line for line in lines if source in line and f"removed 1: {gens[1]}" in line], lines
    assert all(sink in line or source in line for line in lines), lines
