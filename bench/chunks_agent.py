"""The agent as bench/chunks.py runs it: on the host, one configuration per store, in a fresh
process per job, its process tree's peak RSS sampled."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common import Cpu, CpuMeter, run_with_peak_rss

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ID = "bench-source"
PREFIX = "bench"

STEP_LINE = re.compile(r"agent\.(?:runtime\.)?steps: (?P<step>.+): done in (?P<seconds>[\d.]+) s$")


@dataclass
class AgentRun:
    title: str
    wall: float
    cpu: Cpu
    peak_rss: int
    stderr: str
    steps: dict[str, float] = field(default_factory=dict)
    data_format: str = ""
    rss_parts: str = ""  # the processes at the peak


class Agent:
    """One agent configuration: a handover, a source store and an S3 bucket of its own, the
    settings `settings` on top of the defaults."""

    def __init__(
        self,
        name: str,
        place: Path,
        data_dir: Path,
        label: str,
        server,
        bucket: str,
        admin: tuple[str, str],
        settings: dict[str, str],
    ) -> None:
        self.name, self.place, self.bucket = name, place, bucket
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "HOME", "LANG", "DOCKER_HOST", "PYTHONPATH")
        }
        self.env.update(
            SOURCE_ID=SOURCE_ID,
            DATA_PATHS=str(data_dir),
            LOG_PATHS="",
            HANDOVER_DIR=str(place / "handover"),
            SOURCE_STORE_DIR=str(place / "source-store"),
            STOP_LABEL=f"{label}=true",
            STOP_TIMEOUT="5",
            # labels no container has: never run other containers' hooks
            PRE_COMMAND_LABEL=f"{label}.pre-command",
            POST_COMMAND_LABEL=f"{label}.post-command",
            S3_ENDPOINT_URL=server.endpoint,
            S3_BUCKET=bucket,
            S3_PREFIX=PREFIX,
            AWS_ACCESS_KEY_ID=admin[0],
            AWS_SECRET_ACCESS_KEY=admin[1],
            **settings,
        )

    def _agent(self, title: str, arguments: list[str], meter: CpuMeter) -> AgentRun:
        meter.start()
        result, peak = run_with_peak_rss(
            [sys.executable, "-m", "agent", "--env-file", os.devnull, *arguments], self.env, ROOT
        )
        cpu = meter.stop()
        if result.returncode != 0:
            raise RuntimeError(
                f"agent failed in {title!r} (exit {result.returncode}):\n{result.stderr[-4000:]}"
            )
        steps: dict[str, float] = {}
        for line in result.stderr.splitlines():
            match = STEP_LINE.search(line)
            if match:
                name = re.sub(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", "<gen>", match["step"])
                name = re.sub(r"s3://\S+", "<store>", name)
                name = re.sub(r"var/lib/docker/volumes/\S+", "<path>", name)
                name = re.sub(r" (to|from|into) /\S+", r" \1 <dir>", name)
                steps[name] = steps.get(name, 0.0) + float(match["seconds"])
        return AgentRun(
            title,
            cpu.wall,
            cpu,
            peak.peak,
            result.stderr + result.stdout,
            steps,
            rss_parts=peak.describe(),
        )

    def run(self, kind: str, meter: CpuMeter) -> AgentRun:
        """`backup-agent source run` (`kind` names it: first run, ...); the run's data format
        is read from the newest manifest in the source store."""
        done = self._agent(f"{self.name}: source run, {kind}", ["source", "run"], meter)
        manifests = sorted(
            Path(self.env["SOURCE_STORE_DIR"]).glob("**/data/*/MANIFEST.json"),
            key=lambda p: p.parent.name,
        )
        if manifests:
            done.data_format = json.loads(manifests[-1].read_text()).get("data_format", "archive")
        return done

    def restore(self, kind: str, arguments: list[str], meter: CpuMeter) -> AgentRun:
        """`backup-agent restore ARGUMENTS` (`kind` names it)."""
        return self._agent(f"{self.name}: {kind}", ["restore", *arguments], meter)

    def remove(self) -> None:
        """Remove the handover and the source store (the bucket stays)."""
        shutil.rmtree(self.place, ignore_errors=True)
