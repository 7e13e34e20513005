#!/usr/bin/env python3
"""Benchmark of chunked data generations in pull mode (`sink pull-data`): the storage shape of
bench/chunks.py through a real sshd, the gateway and rsync, next to restic and a plain rsync.

    python bench/pull_chunks.py [--size-mib 512] [--runs 8]

(run from the repository root, as root: it starts a real sshd with a user CA and the gateway
as its ForceCommand, run by the gateway user `dataBackupSource`, with the helpers of
tests/sshd.py; it installs Debian's `restic` when missing). It builds the mixed data set of
bench/chunks.py (--size-mib MiB) in the source's data mirror, then --runs times: builds a
chunked generation into the handover as a pull site's `source backup` does
(tests/pulled.py), pulls it (`sink pull-data`, through a TCP relay that counts every byte
SSH moves, both ways, all sessions), runs the source's housekeeping, and backs the same tree
up with restic (repository v2, compression auto) into a local repository; each run after the
first is preceded by the same ~1.4 % change (bench/common.py's Change, seeded). For the last
run it also copies the files that change changed with a plain `rsync -a` over the same SSH
(the gateway serves them from a directory beside the generations) into an empty directory.

Targets (issue 16): bytes on the wire per pull after the first <= 1.5 x the changed bytes
compressed (zstd -3 of what changed, the same level as the packs); the sink store <= 0.9 x
restic's repository after the runs; the pull of the last change <= 1.0 x the plain rsync of
the changed files. It prints the table and writes it to bench/results/pull-chunks.md (the
agent's log to bench/results/pull-chunks-agent.log). Everything it creates is removed at the
end, also on failure. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import zstandard  # noqa: E402
from common import (  # noqa: E402
    Change,
    Content,
    KiB,
    apply_change,
    directory_bytes,
    ensure_debian_tools,
    make_data_set,
    markdown_table,
)
from pull import CountingRelay  # noqa: E402

from agent.chunks import handover as chunked  # noqa: E402
from agent.chunks import prune, pulled  # noqa: E402
from agent.core.handover import Handover  # noqa: E402
from agent.stores.local import LocalStore  # noqa: E402
from tests.pulled import hand_over_mirror, mirror_dir  # noqa: E402
from tests.sshd import (  # noqa: E402
    SshCA,
    SshdServer,
    install_gateway_agent,
    make_client_key,
    make_shared_dir,
    share_tree,
    start_sshd,
)

RESULTS = ROOT / "bench" / "results" / "pull-chunks.md"
AGENT_LOG = RESULTS.with_name("pull-chunks-agent.log")
MiB = 1 << 20
SEED = 16
SOURCE_ID = "bench-source"
DATA_USER = "dataBackupSource"
CHANGED_DIR = "bench-changed"  # below the handover's data/: not a generation id
# the change of bench/chunks.py's storage runs
CHANGE = Change(in_place=4 * MiB, small_fraction=0.01, append=512 * KiB, new_file=MiB)


BLOCK = 64 * KiB
IN_PART = ("large.bin", "logs/app.log")  # changed in part: rewritten in place, appended


def snapshot(root: Path) -> dict[str, object]:
    """Each file's size and mtime, and the sha256 of each 64 KiB block of the files changed
    in part, to tell afterwards which bytes changed."""
    found: dict[str, object] = {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }
    for name in IN_PART:
        found[f"{name}#blocks"] = _blocks(root / name)
    return found


def _blocks(path: Path) -> list[bytes]:
    with open(path, "rb") as handle:
        return [hashlib.sha256(b).digest() for b in iter(lambda: handle.read(BLOCK), b"")]


def what_changed(before: dict[str, object], root: Path) -> tuple[list[str], int]:
    """The files that changed, and the changed bytes compressed with zstd -3 (the packs'
    level): new and rewritten files whole, of the files changed in part the changed blocks."""
    after = snapshot(root)
    names = sorted(n for n, v in after.items() if "#" not in n and before.get(n) != v)
    compressor = zstandard.ZstdCompressor(level=3)
    total = 0
    for name in names:
        if name not in IN_PART:
            total += len(compressor.compress((root / name).read_bytes()))
            continue
        old = before[f"{name}#blocks"]
        assert isinstance(old, list)
        with open(root / name, "rb") as handle:
            for number, digest in enumerate(_blocks(root / name)):
                if number >= len(old) or old[number] != digest:
                    handle.seek(number * BLOCK)
                    total += len(compressor.compress(handle.read(BLOCK)))
    return names, total


def pull(
    env: dict[str, str], relay: CountingRelay, log: list[str], name: str
) -> tuple[float, int, int]:
    relay.take()
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "agent", "sink", "pull-data"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    seconds = time.monotonic() - started
    log.append(f"## {name}\n{process.stderr}")
    if process.returncode != 0:
        raise RuntimeError(f"{name}: sink pull-data exited {process.returncode}:\n{process.stderr}")
    received = int(re.search(r"(\d+) bytes received", process.stderr)[1])
    return seconds, received, sum(relay.take())


def plain_rsync(rsh: str, relay: CountingRelay, target: Path) -> tuple[float, int]:
    relay.take()
    started = time.monotonic()
    subprocess.run(
        ["rsync", "-a", "--rsh", rsh, f"{DATA_USER}@127.0.0.1:{CHANGED_DIR}/", f"{target}/"],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return time.monotonic() - started, sum(relay.take())


def restic_backup(env: dict[str, str], path: Path) -> None:
    subprocess.run(
        ["restic", "backup", "--host", "bench", str(path)], env=env, check=True, capture_output=True
    )


def mib(n: float) -> str:
    return f"{n / MiB:.2f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    problem = ensure_debian_tools({"restic": "restic"})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    restic_version = subprocess.run(
        ["restic", "version"], capture_output=True, text=True
    ).stdout.strip()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    work = Path(tempfile.mkdtemp(prefix="bench-pull-chunks-"))
    work.chmod(0o755)
    server: SshdServer | None = None
    relay: CountingRelay | None = None
    log: list[str] = []
    try:
        handover = make_shared_dir(work / "handover")
        store = make_shared_dir(work / "store")
        env_file = work / "gateway.env"
        env_file.write_text(f"HANDOVER_DIR={handover}\nSOURCE_STORE_DIR={store}\n")
        agent = install_gateway_agent(work / "agent")
        ca_dir = work / "ca"
        ca_dir.mkdir(mode=0o700)
        ca = SshCA(ca_dir)
        server = start_sshd(
            work / "sshd", ca, agent.command("--env-file", env_file, "gateway"), env_file=env_file
        )
        relay = CountingRelay(server.port)
        key = make_client_key(work / "sink")
        cert = ca.sign(key, [DATA_USER], identity="bench-sink")
        known_hosts = work / "sink" / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{relay.port} {server.host_key_line}\n")
        sink_store = work / "sink-store"
        env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "SINK_SOURCES": f"{SOURCE_ID}=127.0.0.1:{relay.port}",
            "SINK_SSH_KEY": str(key.private),
            "SINK_SSH_CERT": str(cert),
            "SINK_KNOWN_HOSTS": str(known_hosts),
            "SINK_STORE_DIR": str(sink_store),
            # every store keeps every run, as in bench/chunks.py
            "SINK_KEEP_LAST": str(args.runs + 1),
        }
        options = server.ssh_options(key, cert, known_hosts)
        options[options.index("-p") + 1] = str(relay.port)
        rsh = shlex.join(["ssh", *options])
        restic_env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "RESTIC_REPOSITORY": str(work / "restic"),
            "RESTIC_PASSWORD": "bench-restic-password",
            "RESTIC_CACHE_DIR": str(work / "restic-cache"),
        }
        subprocess.run(
            ["restic", "init", "--repository-version", "2"],
            env=restic_env,
            check=True,
            capture_output=True,
        )

        data = mirror_dir(handover)
        data.mkdir(parents=True)
        content = Content(seed=SEED)
        print(f"writing the mixed data set ({args.size_mib} MiB) ...", flush=True)
        data_set = make_data_set(data, args.size_mib / 1024, content)
        start = datetime(2026, 11, 1, 2, tzinfo=UTC)
        rows = []
        last: dict[str, float] = {}
        for run in range(1, args.runs + 1):
            gen = (start + timedelta(days=run)).strftime("%Y-%m-%dT%H-%M-%SZ")
            changed = compressed = 0
            names: list[str] = []
            if run > 1:
                before = snapshot(data)
                changed = apply_change(data, CHANGE, content, run)
                names, compressed = what_changed(before, data)
            print(f"run {run}: {changed / MiB:.2f} MiB changed; building ...", flush=True)
            built = time.monotonic()
            hand_over_mirror(handover, store, SOURCE_ID, gen, pack_size=32 * MiB)
            build_seconds = time.monotonic() - built
            seconds, received, wire = pull(env, relay, log, f"pull {run}")
            prune.after_rotation(
                LocalStore(store),
                "source store",
                Handover(handover),
                prune.Settings(),
                f"run-{run:03d}",
            )
            chunked.free_packs(Handover(handover))
            pulled.forget_gone(
                Handover(handover), (p for p, _ in chunked.packs_of(LocalStore(store)))
            )
            restic_backup(restic_env, data)
            sink_bytes = directory_bytes(sink_store / SOURCE_ID)
            restic_bytes = directory_bytes(work / "restic")
            rows.append(
                (
                    run,
                    changed,
                    compressed,
                    build_seconds,
                    seconds,
                    received,
                    wire,
                    sink_bytes,
                    restic_bytes,
                )
            )
            print(
                f"  pull {seconds:.1f} s, {mib(wire)} on the wire; "
                f"sink {mib(sink_bytes)}, restic {mib(restic_bytes)}",
                flush=True,
            )
            if run == args.runs and names:
                copy = handover / "data" / CHANGED_DIR
                for name in names:
                    (copy / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(data / name, copy / name)
                share_tree(handover)
                last["rsync_seconds"], last["rsync_wire"] = plain_rsync(rsh, relay, work / "plain")
                last["pull_seconds"] = seconds
                shutil.rmtree(copy)

        later = [r for r in rows if r[0] > 1]
        wire_ratio = max(r[6] / r[2] for r in later) if later else 0.0
        final = rows[-1]
        store_ratio = final[7] / final[8]
        time_ratio = last["pull_seconds"] / last["rsync_seconds"] if last else 0.0
        table = markdown_table(
            (
                "run",
                "changed",
                "changed, zstd -3",
                "build",
                "pull",
                "rsync received",
                "on the wire",
                "sink store",
                "restic repo",
            ),
            [
                (
                    str(r[0]),
                    mib(r[1]),
                    mib(r[2]),
                    f"{r[3]:.1f} s",
                    f"{r[4]:.1f} s",
                    mib(r[5]),
                    mib(r[6]),
                    mib(r[7]),
                    mib(r[8]),
                )
                for r in rows
            ],
        )
        verdicts = markdown_table(
            ("target", "measured", "met"),
            [
                (
                    "wire per pull after the first <= 1.5 x changed (compressed)",
                    f"{wire_ratio:.2f} x (worst run)",
                    "yes" if wire_ratio <= 1.5 else "no",
                ),
                (
                    "sink store <= 0.9 x restic's repository",
                    f"{store_ratio:.2f} x",
                    "yes" if store_ratio <= 0.9 else "no",
                ),
                (
                    "pull of the last change <= 1.0 x `rsync -a` of the changed files",
                    f"{last.get('pull_seconds', 0):.1f} s vs "
                    f"{last.get('rsync_seconds', 0):.1f} s = {time_ratio:.2f} x"
                    + (f" (rsync moved {mib(last['rsync_wire'])})" if last else ""),
                    "yes" if time_ratio <= 1.0 else "no",
                ),
            ],
        )
        text = (
            "# Pull mode with chunked generations (bench/pull_chunks.py)\n\n"
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
            f"load average at the start {load}; {restic_version}.\n\n"
            f"Data: {data_set.describe()} ({'; '.join(data_set.parts)}). Before each run after the "
            f"first: {CHANGE.describe()}. PACK_SIZE_MB=32, zstd level 3, every store keeps "
            "every run.\n\n"
            f"{table}\n\n"
            "`on the wire`: every byte SSH moved for the whole `sink pull-data` job (list, the "
            "manifest, the packs, the index, ack), encrypted, both ways. `pull`: the whole job, "
            "including the agent's and the gateway's start for each of its SSH sessions.\n\n"
            f"{verdicts}\n"
        )
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        AGENT_LOG.write_text("\n".join(log))
        print(text)
        return 0
    finally:
        if relay is not None:
            relay.close()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
