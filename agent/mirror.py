"""The mirror: a copy of the data and log paths kept between runs in the handover, brought up
to date with rsync — a bulk pass while the application runs, a final pass while it is stopped.

Only what changed since the last pass is copied: modification times are compared to the
nanosecond (`--modify-window=-1`) so a same-size rewrite within one second is not missed, and
large files are patched in place (`--inplace --no-whole-file`). Never hardlink the mirror into
a generation: the mirror is updated in place.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

RSYNC_OPTIONS = (
    "--archive", "--hard-links", "--numeric-ids", "--delete", "--inplace", "--no-whole-file",
    "--modify-window=-1", "--stats",
)
# rsync exit 24: files vanished while the file list was made; the next pass catches up.
_VANISHED = 24


class MirrorError(Exception):
    pass


@dataclass
class SyncStats:
    files_transferred: int = 0
    bytes_transferred: int = 0


def member_name(path: Path) -> str:
    """The name a source path has inside the mirror, an archive or a log generation:
    the absolute path without its leading slash."""
    return str(path).lstrip("/")


def sync(paths: Sequence[Path], mirror: Path) -> SyncStats:
    """Bring `mirror` up to date with `paths` (each lands at `mirror/<member_name>`). When the
    set of paths differs from the mirror's last one, the mirror is rebuilt from scratch, so a
    path removed from the configuration leaves nothing behind. Return what was copied.
    Raise MirrorError with rsync's message on failure."""
    _reset_if_paths_changed(paths, mirror)
    total = SyncStats()
    for path in paths:
        target = mirror / member_name(path)
        target.mkdir(parents=True, exist_ok=True)
        stats = rsync(f"{path}/", f"{target}/")
        total.files_transferred += stats.files_transferred
        total.bytes_transferred += stats.bytes_transferred
    return total


def rsync(source: str, target: str, extra: Sequence[str] = ()) -> SyncStats:
    """Run one local rsync of `source` into `target`; return its statistics."""
    process = subprocess.run(["rsync", *RSYNC_OPTIONS, *extra, source, target],
                             capture_output=True, text=True, errors="replace", check=False)
    if process.returncode == _VANISHED:
        logger.warning("some files vanished during the copy of %s", source)
    elif process.returncode != 0:
        message = " ".join(process.stderr.strip().splitlines()[-3:])
        raise MirrorError(f"rsync of {source} failed (exit {process.returncode}): {message}")
    return _parse_stats(process.stdout)


def _parse_stats(output: str) -> SyncStats:
    stats = SyncStats()
    for line in output.splitlines():
        key, _, value = line.partition(":")
        number = value.strip().split(" ")[0].replace(",", "")
        if key == "Number of regular files transferred" and number.isdigit():
            stats.files_transferred = int(number)
        elif key == "Total transferred file size" and number.isdigit():
            stats.bytes_transferred = int(number)
    return stats


def _reset_if_paths_changed(paths: Sequence[Path], mirror: Path) -> None:
    record = mirror.parent / f"{mirror.name}.paths.json"
    wanted = [str(p) for p in paths]
    try:
        previous = json.loads(record.read_text())
    except (FileNotFoundError, ValueError):
        previous = None
    if previous != wanted:
        if mirror.exists():
            logger.info("the configured paths changed; rebuilding the mirror %s", mirror)
            shutil.rmtree(mirror)
        mirror.mkdir(parents=True)
        record.write_text(json.dumps(wanted))
