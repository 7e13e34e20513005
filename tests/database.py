"""A real PostgreSQL 15 (Debian's, in an image built from the local base) under a pgbench load,
for the restore drill test and the downtime benchmark: the database container, a client
container running pgbench continuously and a probe that opens a connection every 100 ms, and
the checks of a restored database (pg_amcheck, pgbench's balance invariant)."""

from __future__ import annotations

import itertools
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "backup-agent-postgres:15"
PGDATA = "pgdata"  # the data directory, inside the volume
MOUNT = "/var/lib/postgresql/volume"
# How the server's and the load's containers run (kept out of the image: tests/postgres/
# Dockerfile). A stop is PostgreSQL's fast shutdown (SIGINT): smart shutdown (SIGTERM) would
# wait for the clients of the load to disconnect.
ENVIRONMENT = {
    "PATH": "/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
    ":/sbin:/bin",
    "PGDATA": f"{MOUNT}/{PGDATA}",
    "PGHOST": "/run/pg",
}
RUN_SETTINGS = {"user": "postgres", "stop_signal": "SIGINT", "environment": ENVIRONMENT}

# The client container: the probe connects every 100 ms and prints one line per attempt
# (`<epoch seconds> ok|fail`); pgbench runs continuously, started again whenever the server
# went away (it does not reconnect by itself).
CLIENT_SCRIPT = r"""
probe() {
  while true; do
    if psql -XAtqc 'select 1' >/dev/null 2>&1; then s=ok; else s=fail; fi
    echo "$(date +%s.%N) $s"
    sleep 0.1
  done
}
probe &
while true; do
  pgbench -n -c "$CLIENTS" -j 2 -T 86400 >/dev/null 2>&1
  sleep 0.1
done
"""


def build_image(base_image: str) -> str:
    """Build the PostgreSQL image from `base_image` (Debian's packages; the layer cache makes a
    second build instant) and return its tag."""
    subprocess.run(
        [
            "docker",
            "build",
            "-q",
            "-t",
            IMAGE,
            "--build-arg",
            f"BASE_IMAGE={base_image}",
            str(ROOT / "tests" / "postgres"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return IMAGE


@dataclass
class Database:
    """A running PostgreSQL container; its data volume's host directory is `data_dir`."""

    client: object
    container: object
    data_volume: object
    socket_volume: object
    label: str
    made: list[object] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return Path(self.data_volume.attrs["Mountpoint"])  # type: ignore[attr-defined]

    def run(self, *command: str, check: bool = True) -> str:
        """Run a command in the database container as postgres; return its output."""
        result = self.container.exec_run(list(command))  # type: ignore[attr-defined]
        output = (result.output or b"").decode(errors="replace")
        if check and result.exit_code != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {result.exit_code}: {output[-2000:]}"
            )
        return output

    def sql(self, query: str) -> str:
        return self.run("psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", query).strip()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.container.reload()  # type: ignore[attr-defined]
            if (
                self.container.status == "running"
                and self.run(  # type: ignore[attr-defined]
                    "psql", "-XAtqc", "select 1", check=False
                ).strip()
                == "1"
            ):
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    "PostgreSQL did not accept connections in time:\n" + self.logs()[-3000:]
                )
            time.sleep(0.1)

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")  # type: ignore[attr-defined]

    def start_load(self, clients: int = 4) -> object:
        """Start the client container (pgbench with `clients` connections and the probe)."""
        container = self.client.containers.run(  # type: ignore[attr-defined]
            self.container.image.id,
            ["bash", "-c", CLIENT_SCRIPT],  # type: ignore[attr-defined]
            name=f"{self.container.name}-load",
            detach=True,  # type: ignore[attr-defined]
            user="postgres",
            environment={**ENVIRONMENT, "CLIENTS": str(clients)},
            volumes={self.socket_volume.name: {"bind": "/run/pg"}},
        )  # type: ignore[attr-defined]
        self.made.append(container)
        return container

    def remove(self) -> None:
        for container in [*reversed(self.made), self.container]:
            container.remove(force=True)  # type: ignore[attr-defined]
        for volume in (self.data_volume, self.socket_volume):
            volume.remove(force=True)  # type: ignore[attr-defined]


def start_database(
    client, image: str, prefix: str, labels: dict[str, str] | None = None, data_volume=None
) -> Database:
    """Start PostgreSQL on `data_volume` (a new empty volume by default, initialised by
    initdb) with a stop label of its own plus `labels`; wait until it accepts connections."""
    tag = uuid.uuid4().hex[:10]
    label = f"backup.test-{tag}"
    data = data_volume or client.volumes.create(f"{prefix}-{tag}-data")
    sockets = client.volumes.create(f"{prefix}-{tag}-run")
    container = client.containers.run(
        image,
        ["pg-entrypoint"],
        **RUN_SETTINGS,
        name=f"{prefix}-{tag}",
        detach=True,
        labels={label: "true", **(labels or {})},
        shm_size="256m",
        volumes={data.name: {"bind": MOUNT}, sockets.name: {"bind": "/run/pg"}},
    )
    database = Database(client, container, data, sockets, label)
    database.wait_ready()
    return database


def probe_outage(log: str, since: float, until: float) -> float:
    """Given the probe's lines, return the longest time between two successful connections
    that falls in [since, until] (epoch seconds): how long clients could not connect."""
    times = []
    for line in log.splitlines():
        stamp, _, state = line.partition(" ")
        try:
            when = float(stamp)
        except ValueError:
            continue
        if state == "ok" and since - 5 <= when <= until + 30:
            times.append(when)
    gaps = [(b - a) for a, b in itertools.pairwise(times) if b >= since and a <= until]
    return max(gaps, default=0.0)


def balances(database: Database) -> tuple[int, ...]:
    """sum(abalance), sum(tbalance), sum(bbalance), sum(delta) of pgbench's tables, and the
    number of history rows: a consistent database has the four sums equal."""
    row = database.sql(
        "select (select sum(abalance) from pgbench_accounts), "
        "(select sum(tbalance) from pgbench_tellers), "
        "(select sum(bbalance) from pgbench_branches), "
        "(select coalesce(sum(delta), 0) from pgbench_history), "
        "(select count(*) from pgbench_history)"
    )
    return tuple(int(value) for value in row.split("|"))


def amcheck(database: Database) -> str:
    """Run pg_amcheck on every database, heap and index (every heap tuple must have its index
    entries); return its output. Raise RuntimeError if it finds corruption."""
    return database.run(
        "pg_amcheck", "--all", "--heapallindexed", "--install-missing", "--progress"
    )
