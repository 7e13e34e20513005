"""A full backup cycle on this machine, end to end, with a real application container and a
real S3 store.

Starts a small demo application (a container that writes data and logs into two named
volumes) and a local SeaweedFS S3 server with a least-privilege identity for the source,
runs `backup-agent source run` (backup, push, verify, rotate, move to the source store)
twice — the second time after the application changed some data — then downloads the newest
generation from S3, checks it against its manifest, unpacks it, compares it with the volume
and prints a summary. Removes everything it created.

Run as root (it reads the volumes' directories) on a host with Docker, port 8333 free:
    python3 tools/demo.py
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import docker

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("BASE_IMAGE", "backup-agent-base:bookworm")
ENDPOINT = "http://127.0.0.1:8333"
APP = """
trap 'exit 0' TERM
mkdir -p /data/orders
for i in $(seq 1 500); do
  [ -e /data/orders/order-$i.bin ] || head -c 2048 /dev/urandom > /data/orders/order-$i.bin
done
while true; do
  echo "$(date -u +%FT%T.%NZ) served a request" >> /logs/app.log
  sleep 0.1 & wait $!
done
"""


def start_s3(workdir: Path) -> subprocess.Popen[bytes]:
    identities = {"identities": [
        {"name": "admin", "credentials": [{"accessKey": "admin", "secretKey": "admin-secret"}],
         "actions": ["Admin", "Read", "List", "Write"]},
        {"name": "demo", "credentials": [{"accessKey": "demo", "secretKey": "demo-secret"}],
         "actions": [f"{a}:backups/sites/demo/*" for a in ("Read", "Write", "List")]}]}
    (workdir / "s3.json").write_text(json.dumps(identities))
    server = subprocess.Popen(["weed", "mini", f"-dir={workdir / 's3'}", "-ip=127.0.0.1",
                               f"-s3.config={workdir / 's3.json'}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    admin = boto3.client("s3", endpoint_url=ENDPOINT, aws_access_key_id="admin",
                         aws_secret_access_key="admin-secret", region_name="us-east-1")
    for _ in range(200):
        try:
            admin.create_bucket(Bucket="backups")
            return server
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise SystemExit("SeaweedFS did not start (is port 8333 taken?)")


def main() -> int:
    subprocess.run(["bash", str(ROOT / "tools" / "build-base-image.sh"), BASE_IMAGE], check=True)
    client = docker.from_env()
    tag = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="backup-demo-"))
    volumes = [client.volumes.create(f"demo-{tag}-{kind}") for kind in ("data", "logs")]
    data_dir, logs_dir = (Path(v.attrs["Mountpoint"]) for v in volumes)
    app = client.containers.run(
        BASE_IMAGE, ["bash", "-c", APP], name=f"demo-app-{tag}", detach=True,
        labels={"backup.stop-during-backup": "true", "com.docker.compose.project": f"demo{tag}"},
        volumes={volumes[0].name: {"bind": "/data"}, volumes[1].name: {"bind": "/logs"}})
    server = start_s3(workdir)
    env = {**os.environ, "SOURCE_ID": "demo", "DATA_PATHS": str(data_dir),
           "LOG_PATHS": str(logs_dir), "HANDOVER_DIR": str(workdir / "handover"),
           "SOURCE_STORE_DIR": str(workdir / "store"), "COMPOSE_PROJECT": f"demo{tag}",
           "STOP_TIMEOUT": "5", "S3_ENDPOINT_URL": ENDPOINT, "S3_BUCKET": "backups",
           "S3_PREFIX": "sites", "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret",
           "PUSH_LOGS": "true"}
    try:
        while not (data_dir / "orders" / "order-500.bin").exists():
            time.sleep(0.1)
        print("\n== first run: backup (builds the mirror while the application runs), push")
        subprocess.run([sys.executable, "-m", "agent", "source", "run"], env=env, check=True)
        app.exec_run(["sh", "-c", "head -c 4096 /dev/urandom > /data/orders/order-7.bin"])
        print("\n== second run: only the change is copied while the application is stopped")
        subprocess.run([sys.executable, "-m", "agent", "source", "run"], env=env, check=True)

        print("\n== restore check: the newest generation, from S3")
        s3 = boto3.client("s3", endpoint_url=ENDPOINT, aws_access_key_id="demo",
                          aws_secret_access_key="demo-secret", region_name="us-east-1")
        keys = sorted(o["Key"] for o in s3.list_objects_v2(
            Bucket="backups", Prefix="sites/demo/data/").get("Contents", []))
        newest = sorted({k.split("/")[3] for k in keys})[-1]
        manifest = json.loads(s3.get_object(Bucket="backups", Key=f"sites/demo/data/{newest}/"
                                            "MANIFEST.json")["Body"].read())
        archive = workdir / "data.tar.zst"
        s3.download_file("backups", f"sites/demo/data/{newest}/data.tar.zst", str(archive))
        with open(archive, "rb") as handle:
            assert hashlib.file_digest(handle, "sha256").hexdigest() == manifest["files"][0]["sha256"]
        unpacked = workdir / "unpacked"
        unpacked.mkdir()
        subprocess.run(f"zstd -dc '{archive}' | tar -x -C '{unpacked}'", shell=True, check=True)
        restored = unpacked / str(data_dir).lstrip("/") / "orders" / "order-7.bin"
        assert restored.read_bytes() == (data_dir / "orders" / "order-7.bin").read_bytes()

        app.reload()
        print("objects in the sink store:")
        for key in keys:
            print(f"  s3://backups/{key}")
        print(f"source store: {', '.join(sorted(os.listdir(workdir / 'store' / 'data')))}")
        print(f"handover: {len(os.listdir(workdir / 'handover' / 'data'))} data generations "
              "waiting (all pushed)")
        print(f"newest generation {newest}: application downtime "
              f"{manifest['downtime_seconds']:.2f} s; downloaded, sha256 verified, unpacked, "
              "equal to the volume")
        print(f"application container: {app.status}")
        return 0
    finally:
        app.remove(force=True)
        for volume in volumes:
            volume.remove(force=True)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
