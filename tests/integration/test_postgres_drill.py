"""The restore drill on a real database: PostgreSQL 15 under a continuous pgbench load is backed
up (in `stop` and `pause` mode, with a CHECKPOINT as its pre-stop command), the newest generation
is restored into an empty volume, and the database started on it must pass pg_amcheck on every
heap and index and keep pgbench's invariant: the balances of accounts, tellers and branches each
sum to the sum of the history's deltas. The test uses pgbench scale 2 (the benchmark: 20)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_agent, wait_until
from tests.database import IMAGE, PGDATA, amcheck, balances, build_image, start_database

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def pg_image(base_image: str) -> str:
    return build_image(base_image)


@pytest.fixture
def made(docker_client):
    databases: list = []
    volumes: list = []
    yield databases, volumes
    for database in databases:
        database.remove()
    for volume in volumes:
        volume.remove(force=True)


def source_env(data_dir: Path, handover: Path, label: str, mode: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "DOCKER_HOST", "PYTHONPATH")
    }
    env.update(
        SOURCE_ID="pg-drill",
        DATA_PATHS=str(data_dir),
        HANDOVER_DIR=str(handover),
        SOURCE_STORE_DIR=str(handover.parent / "store"),
        STOP_LABEL=f"{label}=true",
        QUIESCE_MODE=mode,
        STOP_TIMEOUT="30",
    )
    return env


@pytest.mark.parametrize("mode", ["stop", "pause"])
def test_a_database_backed_up_under_load_restores_consistent(
    mode, docker_client, pg_image, made, tmp_path
):
    assert pg_image == IMAGE
    databases, volumes = made
    database = start_database(
        docker_client,
        pg_image,
        "bt-pg",
        labels={"backup.pre-stop-command": "psql -XAtqc CHECKPOINT"},
    )
    databases.append(database)
    database.run("pgbench", "-i", "-q", "-s", "2")
    database.start_load()
    wait_until(lambda: balances(database)[4] > 100, timeout=60, interval=0.2)
    env = source_env(database.data_dir, tmp_path / "handover", database.label, mode)

    first = run_agent(env, "source", "backup", timeout=300)  # the first copy of the mirror
    assert first.returncode == 0, first.stderr
    wait_until(lambda: balances(database)[4] > 400, timeout=60, interval=0.2)
    second = run_agent(env, "source", "backup", timeout=300)  # final pass patches in place

    assert second.returncode == 0, second.stderr
    assert "compared block by block" in second.stderr
    assert database.logs().count("checkpoint starting: immediate force wait") >= 2
    newest = max((tmp_path / "handover" / "data").iterdir()).name

    empty = docker_client.volumes.create(f"{database.container.name}-restored")
    volumes.append(empty)
    volume_dir = Path(empty.attrs["Mountpoint"])
    staging = volume_dir / "restore"
    result = run_agent(
        env,
        "restore",
        "--from",
        "handover",
        "--generation",
        newest,
        "--target",
        str(staging),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (staging / str(database.data_dir).lstrip("/") / PGDATA).rename(volume_dir / PGDATA)
    shutil.rmtree(staging)

    restored = start_database(docker_client, pg_image, "bt-pg-restored", data_volume=empty)
    databases.append(restored)
    volumes.remove(empty)
    amcheck(restored)
    accounts, tellers, branches, deltas, transactions = balances(restored)
    assert accounts == tellers == branches == deltas
    assert transactions > 400
