"""The benchmark peers, Debian's restic and borgbackup, driven as their users drive them."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common import Cpu, CpuMeter, MiB, directory_bytes, run_with_peak_rss


@dataclass
class PeerRun:
    """One timed command of a peer."""

    seconds: float
    cpu: Cpu
    peak_rss: int
    info: str = ""


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}


def _run(
    title: str, command: list[str], env: dict[str, str], meter: CpuMeter, cwd: Path
) -> tuple[subprocess.CompletedProcess[str], PeerRun]:
    meter.start()
    result, peak = run_with_peak_rss(command, env, cwd)
    cpu = meter.stop()
    if result.returncode != 0:
        raise RuntimeError(f"{title} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result, PeerRun(cpu.wall, cpu, peak.peak)


def tool_version(command: list[str]) -> str:
    out = subprocess.run(command, capture_output=True, text=True).stdout.split()
    return out[1] if len(out) > 1 else "?"


class Restic:
    """A restic repository (format version 2, compression auto, restic's default) on S3."""

    def __init__(
        self, endpoint: str, bucket: str, credentials: dict[str, str], cache_dir: Path
    ) -> None:
        self.bucket = bucket
        self.env = _base_env()
        self.env.update(
            RESTIC_REPOSITORY=f"s3:{endpoint}/{bucket}/restic",
            RESTIC_PASSWORD="bench-restic-password",
            RESTIC_CACHE_DIR=str(cache_dir),
            **credentials,
        )
        self.cwd = cache_dir.parent

    def init(self) -> None:
        """`restic init --repository-version 2` (not timed); raise unless it is version 2."""
        subprocess.run(
            ["restic", "init", "--repository-version", "2"],
            env=self.env,
            check=True,
            capture_output=True,
        )
        config = json.loads(
            subprocess.run(
                ["restic", "cat", "config"], env=self.env, check=True, capture_output=True
            ).stdout
        )
        if config.get("version") != 2:
            raise RuntimeError(f"restic made a repository of version {config.get('version')}")

    def backup(self, path: Path, meter: CpuMeter) -> PeerRun:
        """`restic backup` of `path` (the previous snapshot of the same host and path is its
        parent, so unchanged files are not read again)."""
        result, run = _run(
            "restic backup",
            ["restic", "backup", "--json", "--host", "bench", str(path)],
            self.env,
            meter,
            self.cwd,
        )
        summary = next(
            json.loads(line) for line in reversed(result.stdout.splitlines()) if '"summary"' in line
        )
        run.info = (
            f"{summary['total_files_processed']} files, "
            f"{summary['total_bytes_processed'] / MiB:.0f} MiB processed, "
            f"{summary.get('data_added', 0) / MiB:.1f} MiB added"
        )
        return run

    def restore(self, target: Path, meter: CpuMeter, include: str | None = None) -> PeerRun:
        """`restic restore latest --target` (optionally `--include` one path)."""
        command = ["restic", "restore", "latest", "--target", str(target)]
        if include is not None:
            command += ["--include", include]
        return _run("restic restore", command, self.env, meter, self.cwd)[1]

    @staticmethod
    def version() -> str:
        return tool_version(["restic", "version"])


class Borg:
    """A local borg repository (repokey-blake2, as restic always encrypts), archives
    compressed with zstd,1."""

    def __init__(self, repo: Path, base_dir: Path) -> None:
        self.repo = repo
        self.env = _base_env()
        self.env.update(
            BORG_REPO=str(repo),
            BORG_PASSPHRASE="bench-borg-passphrase",
            BORG_BASE_DIR=str(base_dir),
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )
        self.cwd = base_dir

    def init(self) -> None:
        subprocess.run(
            ["borg", "init", "--encryption", "repokey-blake2"],
            env=self.env,
            check=True,
            capture_output=True,
        )

    def create(self, name: str, path: Path, meter: CpuMeter) -> PeerRun:
        result, run = _run(
            "borg create",
            ["borg", "create", "--json", "--compression", "zstd,1", f"::{name}", str(path)],
            self.env,
            meter,
            self.cwd,
        )
        stats = json.loads(result.stdout)["archive"]["stats"]
        run.info = f"{stats['nfiles']} files, {stats['deduplicated_size'] / MiB:.1f} MiB added"
        return run

    def size(self) -> int:
        """Bytes of every file of the repository (segments, index, hints)."""
        return directory_bytes(self.repo)

    @staticmethod
    def version() -> str:
        return tool_version(["borg", "--version"])
