"""Restore: bring a data generation back into the application's data paths.

    reconcile → choose the generation → fetch, verify and unpack it into staging (application
    running) → 1.a stop the application → swap the restored contents in → 1.c start the
    application → remove (or keep) the replaced contents

The generation is unpacked next to the data it replaces, in a hidden staging directory of each
data path, and its sha256 checked against the manifest, all before the application is touched;
the application is then stopped only for renames. Before the first rename a record says what
is about to happen, so a run that dies half-way is rolled back by the next run of the agent
(the swap and its journal: `swap.journal`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from agent.chunks import index, reader, unpack
from agent.config import SourceConfig
from agent.core import archive, generation
from agent.core.archive import Digest
from agent.core.handover import Handover
from agent.core.manifest import Manifest
from agent.core.members import MemberPolicy
from agent.recovery.extraction import Decryption, Target, extract
from agent.runtime.interrupts import InterruptGuard
from agent.runtime.steps import Job
from agent.stores import ReadableStore
from agent.swap.journal import (
    STAGING,
    Swap,
    clear_staging,
    entries,
    journal_path,
    reconcile,
    remove,
)

logger = logging.getLogger(__name__)

JOB = "restore"


class RestoreRefused(Exception):
    """The restore cannot start as asked (no such generation, paths that do not match); nothing
    was touched. The message names the cause and the fix."""


@dataclass(frozen=True)
class Request:
    generation: str | None = None
    dry_run: bool = False
    keep_previous: bool = False
    target: Path | None = None
    path: Path | None = None  # one file or subtree of the generation (`--path`)


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
            raise RestoreRefused(
                f"{store.url} holds no complete data generation; choose another store with --from"
            )
        wanted = complete[-1]
    elif not generation.is_valid(wanted):
        raise RestoreRefused(f"{wanted!r} is not a generation id (e.g. 2026-11-28T02-00-00Z)")
    elif wanted not in complete:
        raise RestoreRefused(
            f"{store.url} holds no complete data generation {wanted}; "
            f"complete ones: {', '.join(complete[-5:]) or 'none'}"
        )
    m = store.read_manifest("data", wanted)
    if (m.source_id, m.kind, m.generation) != (source_id, "data", wanted):
        raise RestoreRefused(
            f"the manifest of {wanted} in {store.url} is of "
            f"{m.source_id}/{m.kind}/{m.generation}, not {source_id}/data"
        )
    if not m.chunked and (len(m.files) != 1 or m.files[0].path not in archive.ARCHIVE_NAMES):
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
    def roots(self) -> list[str]:
        return [archive.member_name(Path(p)) for p in self.manifest.paths]

    @property
    def selected(self) -> str:
        """The member name of `--path` (`srv/app/x`), or ''."""
        path = self.request.path
        return archive.member_name(path) if path is not None else ""

    def entry_of(self, data_path: Path) -> str:
        """What the swap replaces in `data_path`: '' (all its contents) or, with `--path`,
        the selected path relative to it."""
        path = self.request.path
        return path.relative_to(data_path).as_posix() if path is not None else ""

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

    def fetch(self, directories: list[tuple[Path, str]]) -> None:
        """Fetch, verify and unpack the generation (or its `--path`) into each (directory,
        member below which the entries are taken: a data path or the `--path`; '' for all).
        Raise what extract or unpack raise; the directories may then hold a part."""
        m = self.manifest
        if not m.chunked:
            extract(
                self.store.chunks("data", m.generation, m.files[0].path),
                self.expected,
                [Target(d, member) for d, member in directories],
                MemberPolicy(self.roots),
                self.decryption,
            )
            return
        destinations = [
            unpack.Destination(d, os.fsencode(member))
            for d, member in directories
            for member in ([member] if member else self.roots)
        ]
        with reader.open_generation(self.store, m, self.identities) as opened:  # type: ignore[arg-type]
            unpack.unpack(opened, destinations, self.roots, whole=not self.selected)


def plan(config: SourceConfig, store: ReadableStore, request: Request) -> Plan:
    """Check that the request can be met, touching nothing. Return the plan. Raise
    RestoreRefused naming the cause and the fix."""
    m = choose(store, config.source_id, request.generation)
    if not m.paths:
        raise RestoreRefused(f"the manifest of {m.generation} names no data paths")
    identities = needed_identities(m, config.decrypt_identities)
    if request.path is not None:
        return _plan_path(config, Plan(store, m, request, (), identities))
    if request.target is not None:
        _check_target(request.target)
        return Plan(store, m, request, (), identities)
    held = {Path(p) for p in m.paths}
    missing = [str(p) for p in config.data_paths if p not in held]
    if missing:
        raise RestoreRefused(
            f"generation {m.generation} holds {', '.join(sorted(m.paths))}, "
            f"not {', '.join(missing)} of DATA_PATHS; restore it with --target "
            "DIR and copy what you need"
        )
    skipped = sorted(held - set(config.data_paths))
    if skipped:
        logger.warning(
            "generation %s also holds %s, which DATA_PATHS does not name; left out",
            m.generation,
            ", ".join(map(str, skipped)),
        )
    return Plan(store, m, request, config.data_paths, identities)


def needed_identities(m: Manifest, identities: Sequence[object]) -> tuple[object, ...]:
    """The identities reading generation `m` needs: none unless it is encrypted. Raise
    RestoreRefused if it is encrypted and there are none."""
    if not (m.encrypted if m.chunked else m.files[0].encrypted):
        return ()
    if not identities:
        raise RestoreRefused(
            f"generation {m.generation} is encrypted; set DECRYPT_IDENTITY_FILE to the age "
            "identity or SSH private key of one of its recipients"
        )
    return tuple(identities)


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RestoreRefused(
            f"--target {target} exists and is not an empty directory; name a new or empty directory"
        )


def _plan_path(config: SourceConfig, plan: Plan) -> Plan:
    """The plan of `--path P`: P must be absolute, inside one of the generation's data paths
    and, to restore it in place, inside one of DATA_PATHS; a chunked generation must hold it.
    Raise RestoreRefused otherwise."""
    m, path = plan.manifest, plan.request.path
    assert path is not None
    if not path.is_absolute() or ".." in path.parts:
        raise RestoreRefused(
            f"--path {path}: give the absolute path the file had when it was backed up, as "
            "`backup-agent files` lists it"
        )
    inside = [Path(p) for p in m.paths if path == Path(p) or Path(p) in path.parents]
    if not inside:
        raise RestoreRefused(
            f"--path {path} is not inside the data paths of {m.generation} ({', '.join(m.paths)})"
        )
    if m.chunked and not _holds(plan, os.fsencode(plan.selected)):
        raise RestoreRefused(
            f"generation {m.generation} holds no {path}; `backup-agent files --generation "
            f"{m.generation}` lists what it holds"
        )
    if plan.request.target is not None:
        _check_target(plan.request.target)
        return plan
    data_path = inside[0]
    if data_path not in config.data_paths:
        raise RestoreRefused(
            f"{path} lies in {data_path}, which DATA_PATHS does not name; restore it with "
            "--target DIR"
        )
    request = plan.request if path != data_path else replace(plan.request, path=None)
    return Plan(plan.store, m, request, (data_path,), plan.identities)


def _holds(plan: Plan, member: bytes) -> bool:
    try:
        with reader.open_generation(plan.store, plan.manifest, plan.identities) as opened:  # type: ignore[arg-type]
            text = index.json_text(member)
            return any(e.path == member for e in opened.entries(() if text is None else (text,)))
    except reader.ReadFailed:
        return True  # the restore itself says what is wrong, in one line


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
    from agent.quiesce.quiescer import application_stopped, open_quiescer  # not for --target

    quiescer = open_quiescer(config, handover.quiesce_record)
    with job.step("reconcile: start containers an interrupted run left stopped"):
        quiescer.reconcile()
    directories = [
        (path / STAGING, plan.selected or archive.member_name(path)) for path in plan.paths
    ]
    try:
        with job.step(
            f"fetch, verify and unpack {plan.selected or m.generation} from {store.url} "
            "(application running)"
        ):
            plan.fetch(directories)
        swap = Swap(
            journal_path(handover),
            m.generation,
            list(plan.paths),
            [plan.entry_of(path) for path in plan.paths],
            config.excludes,
        )
        with application_stopped(
            quiescer, config.stop_label, config.compose_project, guard, job
        ) as window:
            with guard.shielded(), job.step("replace the contents of the data paths"):
                swap.run()
        result.downtime_seconds = window.downtime
    except BaseException:
        if not (journal_path(handover)).exists():  # else reconcile needs what is left
            with guard.shielded():
                clear_staging(plan.paths)
        raise
    with (
        guard.shielded(),
        job.step(
            "keep the replaced contents"
            if plan.request.keep_previous
            else "remove the replaced contents"
        ),
    ):
        result.previous_kept_in = swap.finish(handover, plan.request.keep_previous)
    logger.info(
        "%s done: generation %s from %s into %s, downtime %.2f s, %.2f s in all",
        JOB,
        m.generation,
        store.url,
        ", ".join(result.paths),
        result.downtime_seconds,
        job.elapsed,
    )
    return result


def _restore_into_directory(plan: Plan, result: RestoreResult, job: Job) -> RestoreResult:
    """Unpack the whole generation below the request's target, away from the application."""
    target = plan.request.target
    assert target is not None
    m = plan.manifest
    result.paths = [str(target / member) for member in [plan.selected] if member] or [
        str(target / member) for member in plan.roots
    ]
    what = plan.selected or f"data generation {m.generation}"
    if plan.request.dry_run:
        print(
            f"would unpack {what} ({_size(plan)}) from {plan.store.url} into {target}; "
            "nothing was changed (dry run)"
        )
        return result
    created = not target.exists()
    try:
        with job.step(
            f"fetch, verify and unpack {plan.selected or m.generation} from {plan.store.url} "
            f"into {target}"
        ):
            plan.fetch([(target, plan.selected)])
    except BaseException:
        if created:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for child in target.iterdir():
                remove(child)
        raise
    return result


def _describe(config: SourceConfig, plan: Plan) -> None:
    m = plan.manifest
    from agent.quiesce.quiescer import open_quiescer

    quiescer = open_quiescer(config, Handover(config.handover_dir).quiesce_record)
    selected = quiescer.select(config.stop_label, config.compose_project)
    print(
        f"would restore data generation {m.generation} of {m.source_id} from {plan.store.url} "
        f"({_size(plan)}, created {m.created_at})"
    )
    for path in plan.paths:
        entry = plan.entry_of(path)
        what = f"{entry} in it" if entry else f"its {len(entries(path))} entries"
        print(
            f"  {path}: unpack into {path / STAGING} and verify while the application runs, "
            f"then replace {what}"
        )
    print(
        f"  {quiescer.verb} for the swap: "
        f"{', '.join(s.name for s in selected) or quiescer.nothing_selected(config.stop_label)}"
    )
    print("nothing was changed (dry run)")


def _size(plan: Plan) -> str:
    m = plan.manifest
    if m.chunked:
        return f"chunks: {m.logical_size} bytes of files in {len(m.packs)} packs"
    return f"archive {plan.expected.size} bytes"
