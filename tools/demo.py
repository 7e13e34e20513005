"""A full source backup cycle on this machine, end to end, with a real application container.

Starts a small demo application (a container that writes data and logs into two named
volumes), runs `backup-agent source backup` twice — a first run and one after the application
changed some data — then checks the newest generation against its manifest, unpacks it and
compares it with the volume, and prints a summary. Removes everything it created.

Run as root (it reads the volumes' directories) on a host with Docker:
    python3 tools/demo.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("BASE_IMAGE", "backup-agent-base:bookworm")
APP = """
trap 'exit 0' TERM
mkdir -p /data/orders
for i in $(seq 1 500); do [ -e /data/orders/order-$i.bin ] || head -c 2048 /dev/urandom > /data/orders/order-$i.bin; done
while true; do
  echo "$(date -u +%FT%T.%NZ) served a request" >> /logs/app.log
  sleep 0.1 & wait $!
done
"""


def run_backup(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "agent", "source", "backup"], env=env, check=True)


def main() -> int:
    subprocess.run(["bash", str(ROOT / "tools" / "build-base-image.sh"), BASE_IMAGE], check=True)
    client = docker.from_env()
    tag = uuid.uuid4().hex[:8]
    volumes = [client.volumes.create(f"demo-{tag}-{kind}") for kind in ("data", "logs")]
    data_dir, logs_dir = (Path(v.attrs["Mountpoint"]) for v in volumes)
    app = client.containers.run(
        BASE_IMAGE, ["bash", "-c", APP], name=f"demo-app-{tag}", detach=True,
        labels={"backup.stop-during-backup": "true", "com.docker.compose.project": f"demo{tag}"},
        volumes={volumes[0].name: {"bind": "/data"}, volumes[1].name: {"bind": "/logs"}})
    workdir = Path(tempfile.mkdtemp(prefix="backup-demo-"))
    handover = workdir / "handover"
    env = {**os.environ, "SOURCE_ID": "demo", "DATA_PATHS": str(data_dir),
           "LOG_PATHS": str(logs_dir), "HANDOVER_DIR": str(handover),
           "COMPOSE_PROJECT": f"demo{tag}", "STOP_TIMEOUT": "5"}
    try:
        while not (data_dir / "orders" / "order-500.bin").exists():
            time.sleep(0.1)
        print("\n== first backup (builds the mirror while the application runs)")
        run_backup(env)
        app.exec_run(["sh", "-c", "head -c 4096 /dev/urandom > /data/orders/order-7.bin"])
        print("\n== second backup (only the change is copied while the application is stopped)")
        run_backup(env)
        app.reload()
        print("\n== checking the newest generation")
        newest = sorted((handover / "data").iterdir())[-1]
        manifest = json.loads((newest / "MANIFEST.json").read_text())
        [entry] = manifest["files"]
        with open(newest / entry["path"], "rb") as handle:
            assert hashlib.file_digest(handle, "sha256").hexdigest() == entry["sha256"]
        unpacked = workdir / "unpacked"
        unpacked.mkdir()
        subprocess.run(f"zstd -dc '{newest / entry['path']}' | tar -x -C '{unpacked}'",
                       shell=True, check=True)
        restored = unpacked / str(data_dir).lstrip("/") / "orders" / "order-7.bin"
        assert restored.read_bytes() == (data_dir / "orders" / "order-7.bin").read_bytes()
        print(f"generations in the handover: "
              f"{', '.join(p.name for p in sorted((handover / 'data').iterdir()))}")
        for gen in sorted((handover / "data").iterdir()):
            m = json.loads((gen / "MANIFEST.json").read_text())
            print(f"  {m['generation']}: archive {m['files'][0]['size']} bytes, "
                  f"application downtime {m['downtime_seconds']:.2f} s")
        print(f"application container: {app.status}; newest generation verified (sha256) "
              f"and unpacked: OK")
        return 0
    finally:
        app.remove(force=True)
        for volume in volumes:
            volume.remove(force=True)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
