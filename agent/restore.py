"""Restore: bring a data generation back into the application's data paths.

    reconcile → choose the generation → fetch, verify and unpack it into staging (application
    running) → 1.a stop the application → swap the restored contents in → 1.c start the
    application → remove (or keep) the replaced contents

The generation is unpacked next to the data it replaces, in a hidden staging directory of each
data path, and its sha256 checked against the manifest, all before the application is touched;
the application is then stopped only for renames. Before the first rename a record says what
is about to happen, so a run that dies half-way is rolled back by the next run of the agent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent import archive, generation, mirror
from agent.archive import Digest
from agent.config import SourceConfig
from agent.extraction import Decryption, MemberPolicy, Target, extract
from agent.handover import Handover
from agent.interrupts import InterruptGuard
from agent.manifest import Manifest, fsync_dir
from agent.steps import Job
from agent.stores import ReadableStore

logger = logging.getLogger(__name__)

JOB = "restore"
STAGING = ".backup-agent-restore"
REPLACED = ".backup-agent-replaced"
_OURS = (STAGING, REPLACED)


class RestoreRefused(Exception):
    """The restore cannot start as asked (no such generation, paths that do not match); nothing
    was touched. The message names the cause and the fix."""


@dataclass(frozen=True)
class Request:
    generation: str | None = None
    dry_run: bool = False
    keep_previous: bool = False
    target: Path | None = None
    allow_outside_symlinks: bool = False


@dataclass
class RestoreResult:
    generation: str
    store: str
    paths: list[str]
    downtime_seconds: float = 0.0
    previous_kept_in: str = ""


def choose(store: ReadableStore, source_id: str, wanted: str | None) -> Manifest:
    """Return the manifest of the data generation `wanted` (default: the newest complete one) in
    `store`. Raise RestoreRefused if there is none or it is not this source's."""
    complete = store.generations("data")[0]
    if wanted is None:
        if not complete:
            raise RestoreRefused(f"{store.url} holds no complete data generation; choose another "
                                 "store with --from")
        wanted = complete[-1]
    elif not generation.is_valid(wanted):
        raise RestoreRefused(f"{wanted!r} is not a generation id (e.g. 2026-11-28T02-00-00Z)")
    elif wanted not in complete:
        raise RestoreRefused(f"{store.url} holds no complete data generation {wanted}; "
                             f"complete ones: {', '.join(complete[-5:]) or 'none'}")
    m = store.read_manifest("data", wanted)
    if (m.source_id, m.kind, m.generation) != (source_id, "data", wanted):
        raise RestoreRefused(f"the manifest of {wanted} in {store.url} is of "
                             f"{m.source_id}/{m.kind}/{m.generation}, not {source_id}/data")
    if len(m.files) != 1 or m.files[0].path not in archive.ARCHIVE_NAMES:
        raise RestoreRefused(f"{wanted} in {store.url} is not a data archive generation")
    return m


@dataclass(frozen=True)
class Plan:
    """A restore that can start: the generation, and where each of its data paths goes."""

    store: ReadableStore
    manifest: Manifest
    request: Request
    paths: tuple[Path, ...]  # the data paths to replace; empty with --target
    identities: tuple[object, ...] = ()

    @property
    def expected(self) -> Digest:
        return Digest(self.manifest.files[0].size, self.manifest.files[0].sha256)

    @property
    def decryption(self) -> Decryption | None:
        entry = self.manifest.files[0]
        if not entry.encrypted:
            return None
        assert entry.plaintext_size is not None and entry.plaintext_sha256 is not None
        return Decryption(self.identities, Digest(entry.plaintext_size, entry.plaintext_sha256))

    def policy(self) -> MemberPolicy:
        roots = [mirror.member_name(Path(p)) for p in self.manifest.paths]
        return MemberPolicy(roots, self.request.allow_outside_symlinks)


def plan(config: SourceConfig, store: ReadableStore, request: Request) -> Plan:
    """Check that the request can be met, touching nothing. Return the plan. Raise
    RestoreRefused naming the cause and the fix."""
    m = choose(store, config.source_id, request.generation)
    if not m.paths:
        raise RestoreRefused(f"the manifest of {m.generation} names no data paths")
    if m.files[0].encrypted and not config.decrypt_identities:
        raise RestoreRefused(f"generation {m.generation} is encrypted; set "
                             "DECRYPT_IDENTITY_FILE to the age identity or SSH private key of "
                             "one of its recipients")
    identities = tuple(config.decrypt_identities) if m.files[0].encrypted else ()
    target = request.target
    if target is not None:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise RestoreRefused(f"--target {target} exists and is not an empty directory; "
                                 "name a new or empty directory")
        return Plan(store, m, request, (), identities)
    held = {Path(p) for p in m.paths}
    missing = [str(p) for p in config.data_paths if p not in held]
    if missing:
        raise RestoreRefused(f"generation {m.generation} holds {', '.join(sorted(m.paths))}, "
                             f"not {', '.join(missing)} of DATA_PATHS; restore it with --target "
                             "DIR and copy what you need")
    skipped = sorted(held - set(config.data_paths))
    if skipped:
        logger.warning("generation %s also holds %s, which DATA_PATHS does not name; left out",
                       m.generation, ", ".join(map(str, skipped)))
    return Plan(store, m, request, config.data_paths, identities)


def restore(config: SourceConfig, plan: Plan, guard: InterruptGuard) -> RestoreResult:
    """Carry out the plan; the caller holds the agent's lock. Return what was restored. Raise
    StepFailed naming the failed step — the previous contents are back in place and the
    application is running again in every case."""
    job = Job(JOB)
    m, store = plan.manifest, plan.store
    result = RestoreResult(m.generation, store.url, [str(p) for p in plan.paths])
    if plan.request.target is not None:
        return _restore_into_directory(plan, result, job)
    if plan.request.dry_run:
        _describe(config, plan)
        return result
    handover = Handover(config.handover_dir)
    with job.step("reconcile: finish or roll back an interrupted restore"):
        reconcile(handover, config.data_paths)
    from agent.quiescer import application_stopped, open_quiescer  # not for --target

    quiescer = open_quiescer(config, handover.quiesce_record)
    with job.step("reconcile: start containers an interrupted run left stopped"):
        quiescer.reconcile()
    targets = [Target(path / STAGING, mirror.member_name(path)) for path in plan.paths]
    try:
        with job.step(f"fetch, verify and unpack {m.generation} from {store.url} "
                      "(application running)"):
            extract(store.chunks("data", m.generation, m.files[0].path), plan.expected,
                    targets, plan.policy(), plan.decryption)
        swap = _Swap(handover.state / "restore.json", m.generation, list(plan.paths))
        with application_stopped(quiescer, config.stop_label, config.compose_project,
                                 guard, job) as window:
            with guard.shielded(), job.step("replace the contents of the data paths"):
                swap.run()
        result.downtime_seconds = window.downtime
    except BaseException:
        if not (handover.state / "restore.json").exists():  # else reconcile needs what is left
            with guard.shielded():
                _clear_staging(plan.paths)
        raise
    with guard.shielded(), job.step("keep the replaced contents" if plan.request.keep_previous
                                    else "remove the replaced contents"):
        result.previous_kept_in = swap.finish(handover, plan.request.keep_previous)
    logger.info("%s done: generation %s from %s into %s, downtime %.2f s, %.2f s in all", JOB,
                m.generation, store.url, ", ".join(result.paths), result.downtime_seconds,
                job.elapsed)
    return result


def _restore_into_directory(plan: Plan, result: RestoreResult, job: Job) -> RestoreResult:
    """Unpack the whole generation below the request's target, away from the application."""
    target = plan.request.target
    assert target is not None
    m = plan.manifest
    result.paths = [str(target / mirror.member_name(Path(p))) for p in m.paths]
    if plan.request.dry_run:
        print(f"would unpack data generation {m.generation} ({plan.expected.size} bytes) from "
              f"{plan.store.url} into {target}; nothing was changed (dry run)")
        return result
    created = not target.exists()
    try:
        with job.step(f"fetch, verify and unpack {m.generation} from {plan.store.url} into "
                      f"{target}"):
            extract(plan.store.chunks("data", m.generation, m.files[0].path), plan.expected,
                    [Target(target)], plan.policy(), plan.decryption)
    except BaseException:
        if created:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for child in target.iterdir():
                _remove(child)
        raise
    return result


def _describe(config: SourceConfig, plan: Plan) -> None:
    m = plan.manifest
    from agent.quiescer import open_quiescer

    quiescer = open_quiescer(config, Handover(config.handover_dir).quiesce_record)
    selected = quiescer.select(config.stop_label, config.compose_project)
    print(f"would restore data generation {m.generation} of {m.source_id} from {plan.store.url} "
          f"(archive {plan.expected.size} bytes, created {m.created_at})")
    for path in plan.paths:
        entries = len(_entries(path))
        print(f"  {path}: unpack into {path / STAGING} and verify while the application runs, "
              f"then replace its {entries} entries")
    print(f"  {quiescer.verb} for the swap: "
          f"{', '.join(s.name for s in selected) or quiescer.nothing_selected(config.stop_label)}")
    print("nothing was changed (dry run)")


# ---------------------------------------------------------------- the swap, crash-safe


@dataclass
class _PathState:
    path: str
    phase: str = "staged"  # staged → moving-aside → moving-in → done
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0


class _Swap:
    """Replaces the contents of each data path with its staged tree by renames, recording each
    phase on disk first, so `rollback` can undo it from any point."""

    def __init__(self, record: Path, gen: str, paths: list[Path]) -> None:
        self.record = record
        self.generation = gen
        self.states = [_PathState(str(p)) for p in paths]
        self.completed = False

    @classmethod
    def load(cls, record: Path) -> _Swap | None:
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
        body = {"generation": self.generation, "completed": self.completed,
                "paths": [asdict(state) for state in self.states]}
        with open(tmp, "w") as handle:
            json.dump(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.record)
        fsync_dir(self.record.parent)

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
        staged = path / STAGING / mirror.member_name(path)
        replaced = path / REPLACED
        st = path.stat()
        state.mode, state.uid, state.gid, state.mtime_ns = (st.st_mode & 0o7777, st.st_uid,
                                                            st.st_gid, st.st_mtime_ns)
        state.phase = "moving-aside"
        self._save()
        replaced.mkdir(mode=0o700)
        for entry in _entries(path):
            entry.rename(replaced / entry.name)
        state.phase = "moving-in"
        self._save()
        restored = staged.stat()  # before the renames below change its times
        for entry in _entries(staged):
            entry.rename(path / entry.name)
        os.chown(path, restored.st_uid, restored.st_gid)
        os.chmod(path, restored.st_mode & 0o7777)
        os.utime(path, ns=(restored.st_atime_ns, restored.st_mtime_ns))
        state.phase = "done"
        self._save()

    def rollback(self) -> None:
        """Put the previous contents of every path back, from whatever phase it reached."""
        for state in reversed(self.states):
            path = Path(state.path)
            if state.phase in ("moving-in", "done"):
                staged = path / STAGING / mirror.member_name(path)
                staged.mkdir(parents=True, exist_ok=True)
                for entry in _entries(path):
                    entry.rename(staged / entry.name)
                os.chown(path, state.uid, state.gid)
                os.chmod(path, state.mode)
                os.utime(path, ns=(state.mtime_ns, state.mtime_ns))
            if state.phase != "staged" and (path / REPLACED).is_dir():
                for entry in (path / REPLACED).iterdir():
                    entry.rename(path / entry.name)
                (path / REPLACED).rmdir()
            state.phase = "staged"
            self._save()
        self.record.unlink()
        logger.warning("restore of %s rolled back: the previous contents are in place again",
                       self.generation)

    def finish(self, handover: Handover, keep: bool) -> str:
        """After a completed swap: remove the staging directories and the replaced contents, or
        move those to `<handover>/.replaced/` when `keep`. Return where they were kept."""
        kept = ""
        if keep:
            stamp = generation.format_id(datetime.now(UTC))
            destination = handover.root / ".replaced" / f"{self.generation}-replaced-{stamp}"
            for state in self.states:
                path = Path(state.path)
                target = destination / mirror.member_name(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                # mv keeps owners and modes also across filesystems
                subprocess.run(["mv", "--", str(path / REPLACED), str(target)], check=True,
                               capture_output=True)
            kept = str(destination)
            logger.info("the replaced contents are kept in %s", kept)
        _clear_staging([Path(state.path) for state in self.states])
        self.record.unlink(missing_ok=True)
        return kept


def _entries(directory: Path) -> list[Path]:
    return [entry for entry in directory.iterdir() if entry.name not in _OURS]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clear_staging(paths: Iterable[Path]) -> None:
    for path in paths:
        for name in _OURS:
            _remove(path / name)


def reconcile(handover: Handover, data_paths: Iterable[Path]) -> None:
    """Repair what an interrupted restore left: roll back a swap that did not complete, finish
    one that did, and remove staging directories. Run before anything reads or stops the
    application (backups call it too, so a half-restored state is never backed up)."""
    swap = _Swap.load(handover.state / "restore.json")
    if swap is not None:
        if swap.completed:
            logger.warning("an earlier restore of %s completed but was not cleaned up; "
                           "cleaning up", swap.generation)
        else:
            logger.warning("an earlier restore of %s was interrupted; rolling it back",
                           swap.generation)
            swap.rollback()
        swap.finish(handover, keep=False)
    _clear_staging(data_paths)
