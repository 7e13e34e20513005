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
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

RSYNC_OPTIONS = (
    "--archive", "--hard-links", "--numeric-ids", "--delete", "--inplace", "--no-whole-file",
    "--modify-window=-1",
)
# rsync exit 24: files vanished while the file list was made; the next pass catches up.
_VANISHED = 24


class MirrorError(Exception):
    pass


def member_name(path: Path) -> str:
    """The name a source path has inside the mirror, an archive or a log generation:
    the absolute path without its leading slash."""
    return str(path).lstrip("/")


def sync(mirrors: Mapping[Path, Sequence[Path]]) -> None:
    """Bring each mirror up to date with its source paths (each lands at
    `mirror/<member_name>`), all paths at once. A path the mirror does not hold yet is copied
    with `cp -a --reflink=auto`, which is faster than rsync for a first copy and keeps the
    nanosecond mtimes the next pass compares; afterwards rsync copies only what changed. When
    a mirror's set of paths differs from its last one, it is rebuilt from scratch, so a path
    removed from the configuration leaves nothing behind.
    Raise MirrorError with the tool's message on failure."""
    commands: list[list[str]] = []
    for mirror, paths in mirrors.items():
        _reset_if_paths_changed(paths, mirror)
        for path in paths:
            target = mirror / member_name(path)
            if target.exists():
                commands.append(["rsync", *RSYNC_OPTIONS, f"{path}/", f"{target}/"])
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                commands.append(["cp", "--archive", "--reflink=auto", "--", str(path),
                                 str(target)])
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, errors="replace") for c in commands]
    try:
        failures = []
        for command, process in zip(commands, processes, strict=True):
            _, stderr = process.communicate()
            if process.returncode == _VANISHED and command[0] == "rsync":
                logger.warning("some files vanished during the copy of %s", command[-2])
            elif process.returncode != 0:
                message = " ".join(stderr.strip().splitlines()[-3:])
                failures.append(f"{command[0]} of {command[-2]} failed "
                                f"(exit {process.returncode}): {message}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if failures:
        raise MirrorError("; ".join(failures))


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
