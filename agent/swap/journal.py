"""The crash-safe swap of restored contents into the data paths, and its journal.

Restore unpacks a generation into a hidden staging directory of each data path; the swap then
replaces each path's contents by renames. Before each phase of renames the journal
(`<handover>/.state/restore.json`) records it, so a run that dies half-way is rolled back — or,
when the swap completed, cleaned up — by `reconcile`, which every job of the source agent runs
first (a half-restored state is never backed up). It lives below both step 1 and restore, so
neither imports the other.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from agent.core import generation
from agent.core.archive import member_name
from agent.core.excludes import Excludes, Matcher, excluded_paths
from agent.core.handover import Handover
from agent.core.manifest import fsync_dir

logger = logging.getLogger(__name__)

STAGING = ".backup-agent-restore"
REPLACED = ".backup-agent-replaced"
_OURS = (STAGING, REPLACED)


def journal_path(handover: Handover) -> Path:
    """Where the journal of a swap in progress is kept."""
    return handover.state / "restore.json"


@dataclass
class _PathState:
    path: str
    # staged → moving-aside → moving-in → done; rollback: → taking-out → putting-back → staged
    phase: str = "staged"
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    entry: str = ""  # `restore --path`: the one entry below the path that is replaced; '': all
    kept: list[str] = field(default_factory=list)  # excluded entries put back (relative)
    # the times of their parents among the replaced contents: what a rollback gives back
    kept_times: dict[str, list[int]] = field(default_factory=dict)


class Swap:
    """Replaces the contents of each data path with its staged tree by renames, recording each
    phase on disk before its renames, so `rollback` can undo it from any point. A phase moves
    entries one way only and lists what is left to move when it starts, so one interrupted by
    a kill is simply run again: the record, not the directories, says which way entries go.
    Given `entries`, each path's entry (a relative path; '' for all its contents) is what is
    replaced: `restore --path`. What `excludes` exclude in the previous contents is put back
    (in place of what a generation from before the exclude holds there): a restore leaves
    excluded paths as they are."""

    def __init__(
        self,
        record: Path,
        gen: str,
        paths: list[Path],
        entries: list[str] | None = None,
        excludes: Excludes | None = None,
    ) -> None:
        self.record = record
        self.excludes = excludes or Excludes()
        self.generation = gen
        self.states = [
            _PathState(str(p), entry=e)
            for p, e in zip(paths, entries or [""] * len(paths), strict=True)
        ]
        self.completed = False

    @classmethod
    def load(cls, record: Path) -> Swap | None:
        try:
            body = json.loads(record.read_text())
        except FileNotFoundError:
            return None
        swap = cls(record, body["generation"], [])
        swap.states = [_PathState(**state) for state in body["paths"]]
        swap.completed = body["completed"]
        return swap

    def _save(self) -> None:
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        body = {
            "generation": self.generation,
            "completed": self.completed,
            "paths": [asdict(state) for state in self.states],
        }
        with open(tmp, "w") as handle:
            json.dump(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.record)
        fsync_dir(self.record.parent)

    def _enter(self, state: _PathState, phase: str) -> None:
        state.phase = phase
        self._save()

    def run(self) -> None:
        """Swap every path; on a failure roll every path back and raise."""
        try:
            for state in self.states:
                self._swap(state)
            self.completed = True
            self._save()
        except BaseException:
            self.rollback()
            raise

    def _swap(self, state: _PathState) -> None:
        path = Path(state.path)
        staged = path / STAGING / member_name(path)
        replaced = path / REPLACED
        st = path.stat()
        state.mode, state.uid, state.gid, state.mtime_ns = (
            st.st_mode & 0o7777,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
        )
        self._enter(state, "moving-aside")
        replaced.mkdir(mode=0o700)
        _move_entries(path, replaced, state.entry)
        state.kept = _excluded(replaced, self.excludes.below(path), state.entry)
        state.kept_times = _times(replaced, state.kept)
        self._enter(state, "moving-in")
        restored = staged.stat()  # before the renames below change its times
        _move_entries(staged, path, state.entry)
        if state.kept:
            self._enter(state, "keeping")
            _keep(replaced, path, state.kept, state.kept_times)
        if state.entry:  # the path itself stays as it is
            self._enter(state, "done")
            return
        os.chown(path, restored.st_uid, restored.st_gid)
        os.chmod(path, restored.st_mode & 0o7777)
        os.utime(path, ns=(restored.st_atime_ns, restored.st_mtime_ns))
        fsync_dir(path)
        self._enter(state, "done")

    def rollback(self) -> None:
        """Put the previous contents of every path back, from whatever phase the swap or an
        interrupted earlier rollback reached; safe to run again after a kill at any point."""
        for state in reversed(self.states):
            self._roll_back(state)
        self.record.unlink()
        logger.warning(
            "restore of %s rolled back: the previous contents are in place again", self.generation
        )

    def _roll_back(self, state: _PathState) -> None:
        path = Path(state.path)
        if state.phase in ("keeping", "done") and state.kept:
            _unkeep(path, path / REPLACED, state.kept, state.kept_times)
        if state.phase in ("moving-in", "keeping", "done"):
            self._enter(state, "taking-out")
        if state.phase == "taking-out":  # whatever is in the path came from staging
            staged = path / STAGING / member_name(path)
            staged.mkdir(parents=True, exist_ok=True)
            _move_entries(path, staged, state.entry)
            self._enter(state, "putting-back")
        elif state.phase == "moving-aside":  # whatever is in the path is previous contents
            self._enter(state, "putting-back")
        if state.phase == "putting-back":  # from here on, only previous contents move
            replaced = path / REPLACED
            if replaced.is_dir():
                _move_entries(replaced, path, state.entry)
                shutil.rmtree(replaced)  # empty, but for the parents of a `--path` entry
            os.chown(path, state.uid, state.gid)
            os.chmod(path, state.mode)
            os.utime(path, ns=(state.mtime_ns, state.mtime_ns))
            fsync_dir(path)
            self._enter(state, "staged")

    def finish(self, handover: Handover, keep: bool) -> str:
        """After a completed swap: remove the staging directories and the replaced contents, or
        move those to `<handover>/.replaced/` when `keep`. Return where they were kept."""
        kept = ""
        if keep:
            stamp = generation.format_id(datetime.now(UTC))
            destination = handover.root / ".replaced" / f"{self.generation}-replaced-{stamp}"
            for state in self.states:
                path = Path(state.path)
                if not (path / REPLACED).exists():  # `--path` of what was not there
                    continue
                target = destination / member_name(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                # mv keeps owners and modes also across filesystems
                subprocess.run(
                    ["mv", "--", str(path / REPLACED), str(target)], check=True, capture_output=True
                )
            kept = str(destination)
            logger.info("the replaced contents are kept in %s", kept)
        clear_staging([Path(state.path) for state in self.states])
        self.record.unlink(missing_ok=True)
        return kept


def entries(directory: Path) -> list[Path]:
    return [entry for entry in directory.iterdir() if entry.name not in _OURS]


def _move_entries(source: Path, destination: Path, only: str = "") -> None:
    """Rename every entry of `source` (but ours) into `destination` — or, given `only` (a
    relative path), that one entry if it is there, making its parents in `destination` —
    durably: the directories are synced before the caller records that the move is done."""
    if not only:
        for entry in entries(source):
            entry.rename(destination / entry.name)
        fsync_dir(source)
        fsync_dir(destination)
        return
    if not os.path.lexists(source / only):
        return
    (destination / only).parent.mkdir(parents=True, exist_ok=True)
    (source / only).rename(destination / only)
    fsync_dir((source / only).parent)
    fsync_dir((destination / only).parent)


def _excluded(replaced: Path, matcher: Matcher, entry: str) -> list[str]:
    """The excluded entries of the previous contents, relative paths; with `restore --path`
    only those strictly below its entry: the entry itself is restored as asked, also when it
    is excluded or below an excluded directory."""
    found = [os.fsdecode(p) for p in excluded_paths(replaced, matcher)]
    if entry:
        found = [p for p in found if p.startswith(entry.rstrip("/") + "/")]
    return found


def _times(replaced: Path, kept: list[str]) -> dict[str, list[int]]:
    """The atime and mtime of each parent directory of the `kept` entries in `replaced`."""
    times = {}
    for parent in {os.path.dirname(rel) for rel in kept}:
        st = (replaced / parent).stat()
        times[parent] = [st.st_atime_ns, st.st_mtime_ns]
    return times


def _keep(replaced: Path, path: Path, kept: list[str], times: dict[str, list[int]]) -> None:
    """Put the excluded entries `kept` back from `replaced` into `path`, in place of what the
    restore put there; one whose parent the restore made something else than a directory
    stays with the replaced contents. Run again after a kill, it moves what is left. The
    directories on both sides keep their times."""
    for rel in kept:
        source, destination = replaced / rel, path / rel
        if not os.path.lexists(source):
            continue
        parent = destination.parent
        try:
            st = parent.lstat() if os.path.lexists(parent) else None
            if os.path.lexists(destination):
                remove(destination)
            parent.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError):
            logger.warning(
                "the excluded %s is not put back: the restored %s is no directory",
                destination,
                parent,
            )
            continue
        source.rename(destination)
        if st is not None:
            os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns))
        fsync_dir(parent)
    _reset_times(replaced, times)


def _unkeep(path: Path, replaced: Path, kept: list[str], times: dict[str, list[int]]) -> None:
    """Undo `_keep`: move the excluded entries back into `replaced`, with their parents'
    times, so a rollback puts them back with the rest of the previous contents."""
    for rel in kept:
        source, destination = path / rel, replaced / rel
        if os.path.lexists(source) and not os.path.lexists(destination):
            destination.parent.mkdir(parents=True, exist_ok=True)
            source.rename(destination)
    _reset_times(replaced, times)


def _reset_times(replaced: Path, times: dict[str, list[int]]) -> None:
    for parent, (atime, mtime) in times.items():
        directory = replaced / parent
        if directory.is_dir():
            os.utime(directory, ns=(atime, mtime))
            fsync_dir(directory)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def clear_staging(paths: Iterable[Path]) -> None:
    for path in paths:
        for name in _OURS:
            remove(path / name)


def reconcile(handover: Handover, data_paths: Iterable[Path]) -> None:
    """Repair what an interrupted restore left: roll back a swap that did not complete, finish
    one that did, and remove staging directories. Run before anything reads or stops the
    application (backups call it too, so a half-restored state is never backed up)."""
    swap = Swap.load(journal_path(handover))
    if swap is not None:
        if swap.completed:
            logger.warning(
                "an earlier restore of %s completed but was not cleaned up; cleaning up",
                swap.generation,
            )
        else:
            logger.warning(
                "an earlier restore of %s was interrupted; rolling it back", swap.generation
            )
            swap.rollback()
        swap.finish(handover, keep=False)
    clear_staging(data_paths)
