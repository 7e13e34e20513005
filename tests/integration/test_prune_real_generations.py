"""`backup-agent prune` on generations the real step 1 and push made (a Docker application,
SeaweedFS as the sink store, the source store on disk): what rotation removed is condemned
(by the push that rotated it), then deleted by a later prune, mostly dead packs are repacked,
and the kept generation still restores from either store by the format's document alone."""

from __future__ import annotations

import os

import pytest

from agent.core import manifest
from tests.chunked import MiB, restore_by_hand
from tests.conftest import run_agent
from tests.integration.test_chunks_push import (
    download,
    env_for,
    member,
    s3_generations,
    s3_packs,
    source_run,
)
from tests.trees import snapshot

pytestmark = pytest.mark.docker


def test_prune_collects_what_real_runs_left_and_the_kept_generation_restores(
    make_app, s3, tmp_path
):
    app = make_app()
    (app.data_dir / "db").write_bytes(os.urandom(12 * MiB))
    env = env_for(
        app,
        tmp_path,
        s3,
        PACK_SIZE_MB="4",
        SINK_KEEP_LAST="1",
        SINK_KEEP_DAILY="0",
        SINK_KEEP_WEEKLY="0",
        SINK_KEEP_MONTHLY="0",
        SOURCE_KEEP_LAST="1",
    )
    source_run(env)
    first_packs = s3_packs(s3)
    # the second run keeps about a fifth of the first run's data: its packs are mostly dead
    with open(app.data_dir / "db", "r+b") as handle:
        handle.truncate(2 * MiB)
    (app.data_dir / "new").write_bytes(os.urandom(3 * MiB))
    before = snapshot(app.data_dir)
    # its push rotates the first generation away and collects at once (condemns, repacks)
    pushed = source_run(env)
    assert "garbage collection of the sink store" in pushed.stderr, pushed.stderr
    [kept] = s3_generations(s3)

    first = run_agent(env, "prune")  # a later job: what the push condemned may go now
    assert first.returncode == 0, first.stderr
    assert "garbage collection of the sink store" in first.stdout, first.stdout
    second = run_agent(env, "prune")
    assert second.returncode == 0, second.stderr

    copy = download(s3, tmp_path / "s3")
    listed_s3 = {p.id for p in manifest.read(copy / "data" / kept).packs}
    assert s3_packs(s3) == listed_s3
    assert not (first_packs - listed_s3) & s3_packs(s3)
    store = tmp_path / "store"
    listed_local = {p.id for p in manifest.read(store / "data" / kept).packs}
    assert {p.stem for p in (store / "packs").rglob("*.pack")} == listed_local
    for origin in (tmp_path / "s3", store):
        target = tmp_path / f"restored-{origin.name}"
        restore_by_hand(origin, kept, target)
        assert snapshot(target / member(app)) == before
