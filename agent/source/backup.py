"""Step 1, source backup: stop the application only for a fast local copy, then build the
generations in the handover while it runs again.

    reconcile → previous transport failed? → pre-commands → bulk pass, then pre-copy passes
    while they shrink (running) → pre-stop commands (and a pass after them) → 1.a stop
    → final pass: 1.b data, 1.d logs → 1.c start the application
    → post-commands → the data generation (chunks, or an archive), the log generation,
    manifests → hand over
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent import __version__
from agent.chunks import handover as chunked
from agent.chunks import site
from agent.config import SourceConfig
from agent.core import archive, encryption, excludes, generation, manifest
from agent.core.handover import Handover
from agent.core.manifest import FileEntry, Manifest
from agent.quiesce.quiescer import TARGETS, AppQuiescer, application_stopped, open_quiescer
from agent.runtime import alerts, diskspace
from agent.runtime.interrupts import InterruptGuard
from agent.runtime.steps import Job, StepFailed
from agent.source import mirror
from agent.stores.local import LocalStore
from agent.swap import journal

logger = logging.getLogger(__name__)

JOB = "source backup"
PLAIN_LOGS = "logs-plain"
RECONCILE_JOB = "source reconcile"


@dataclass
class BackupResult:
    generation: str
    downtime_seconds: float
    data_size: int
    log_files: int
    elapsed_seconds: float
    bytes_read: int | None = None  # chunks: what the run read of the data (changed files)


def backup(config: SourceConfig, guard: InterruptGuard) -> BackupResult:
    """Run step 1 once; the caller holds the agent's lock. Return what was handed over.
    Raise StepFailed naming the failed step; the application is running again in every case."""
    handover = Handover(config.handover_dir)
    try:
        return _backup(config, handover, guard)
    except StepFailed as failure:
        if not failure.kept:
            failure.kept = _kept(handover)
        failure.free_space = diskspace.of_source(config)
        raise


def reconcile(config: SourceConfig, guard: InterruptGuard) -> list[str]:
    """Repair what a killed run left: roll back an interrupted restore, start again what it
    left stopped. Every job does this first; `cron` also does it when it starts, so an agent
    that was killed with the application stopped does not leave it so until the next tick.
    Return the names of what was started again. Raise StepFailed naming the failed step."""
    job = Job(RECONCILE_JOB)
    _, started = _reconcile(config, Handover(config.handover_dir), job)
    logger.info(
        "%s done: %s",
        RECONCILE_JOB,
        f"started {', '.join(started)} again" if started else "nothing to repair",
    )
    return started


def _reconcile(config: SourceConfig, handover: Handover, job: Job) -> tuple[AppQuiescer, list[str]]:
    with job.step(f"connect to {TARGETS[config.quiesce_mode]}"):
        quiescer = open_quiescer(config, handover.quiesce_record)
    with job.step(
        "reconcile: roll back an interrupted restore, start containers an "
        "interrupted run left stopped"
    ):
        journal.reconcile(handover, config.data_paths)
        started = quiescer.reconcile()
    return quiescer, started


def _backup(config: SourceConfig, handover: Handover, guard: InterruptGuard) -> BackupResult:
    job = Job(JOB)
    quiescer, _ = _reconcile(config, handover, job)
    with job.step("check for generations a failed transport left in the handover"):
        _alert_previous_transport_failed(config, handover)
    try:
        result = _collect_and_hand_over(config, handover, guard, quiescer, job)
    except BaseException:
        with guard.shielded():
            handover.discard_staging()
            if config.data_format == "chunks":
                chunked.free_packs(handover)  # those this run wrote: nothing lists them
        raise
    if config.data_format == "chunks" and not config.s3.bucket:
        with job.step("collect the source store's garbage, free the handover of unlisted packs"):
            site.pull_housekeeping(config, handover)
    logger.info(
        "%s done: generation %s, downtime %.2f s, data %d bytes written, %d log files, "
        "%.2f s in all",
        JOB,
        result.generation,
        result.downtime_seconds,
        result.data_size,
        result.log_files,
        result.elapsed_seconds,
    )
    return result


def _collect_and_hand_over(
    config: SourceConfig, handover: Handover, guard: InterruptGuard, quiescer: AppQuiescer, job: Job
) -> BackupResult:
    handover.discard_staging()
    data_staging = handover.fresh_staging("data")
    logs_staging = handover.fresh_staging("logs") if config.log_paths else None
    # encrypted logs are copied beside their generation first, then encrypted into it
    logs_copy = (
        handover.fresh_staging(PLAIN_LOGS)
        if logs_staging is not None and config.encrypt_logs
        else logs_staging
    )
    with job.step("pre-commands"):
        quiescer.run_label_commands(
            config.pre_command_label, config.stop_label, config.compose_project, config.source_id
        )
    mirrors = {handover.mirror("data"): config.data_paths}
    if config.log_paths:
        mirrors[handover.mirror("logs")] = config.log_paths
    kept = mirror.Mirror(mirrors, config.excludes)
    if config.collect_mode == "mirror":
        _precopy(config, kept, job)
    with job.step("pre-stop commands"):
        ran = quiescer.run_label_commands(
            config.pre_stop_command_label,
            config.stop_label,
            config.compose_project,
            config.source_id,
        )
    if ran and config.collect_mode == "mirror":
        # what a pre-stop command wrote (a checkpoint's pages) is copied while the application
        # still runs; the final pass is left with what the shutdown writes
        with job.step(
            "1.b collect application data, 1.d collect log data "
            "(pass after the pre-stop commands, application running)"
        ):
            report = kept.sync()
        logger.info("pass after the pre-stop commands: %s", report.describe())

    with application_stopped(
        quiescer, config.stop_label, config.compose_project, guard, job
    ) as window:
        if config.collect_mode == "mirror":
            with job.step(
                "1.b collect application data, 1.d collect log data "
                "(final pass, application stopped)"
            ):
                report = kept.sync(final=True)
            logger.info("final pass: %s", report.describe())
        else:
            with job.step("1.b collect application data (archive, application stopped)"):
                data_digest = _archive(config, Path("/"), data_staging)
            if logs_copy is not None:
                with job.step("1.d collect log data (copy, application stopped)"):
                    _copy_logs(config, Path("/"), logs_copy)
    gen = generation.new_id(
        window.stopped_at, handover.all_ids() + LocalStore(config.source_store_dir).all_ids()
    )

    post_failure: StepFailed | None = None
    try:
        with job.step("post-commands"):
            quiescer.run_label_commands(
                config.post_command_label,
                config.stop_label,
                config.compose_project,
                config.source_id,
            )
    except StepFailed as failure:
        post_failure = failure

    built: chunked.Built | None = None
    if config.data_format == "chunks":
        with job.step("build the chunked data generation (application running)"):
            built = site.build(config, handover)
    elif config.collect_mode == "mirror":
        with job.step("archive the data (application running)"):
            data_digest = _archive(config, handover.mirror("data"), data_staging)
    if config.collect_mode == "mirror" and logs_copy is not None:
        with job.step("copy the logs into their generation (application running)"):
            _copy_logs(config, handover.mirror("logs"), logs_copy)
    log_entries: tuple[FileEntry, ...] = ()
    if logs_staging is not None and logs_copy is not None and config.encrypt_logs:
        with job.step("encrypt the logs into their generation (application running)"):
            log_entries = tuple(_encrypt_tree(logs_copy, logs_staging, config.encrypt_recipients))
            shutil.rmtree(logs_copy)

    with job.step("hand over: write manifests and publish the generations"):
        stamp: dict[str, Any] = {
            "source_id": config.source_id,
            "generation": gen,
            "created_at": window.stopped_at.isoformat().replace("+00:00", "Z"),
            "downtime_seconds": round(window.downtime, 3),
            "agent_version": __version__,
        }

        def stamped(kind: str, files: tuple[FileEntry, ...], paths: tuple[Path, ...]) -> Manifest:
            return Manifest(kind=kind, files=files, paths=tuple(str(p) for p in paths), **stamp)

        data_paths = tuple(str(p) for p in config.data_paths)
        manifest.write(
            data_staging,
            stamped("data", (_archive_entry(data_digest),), config.data_paths)
            if built is None
            else chunked.chunked_manifest(
                stamp, data_paths, built, bool(config.encrypt_recipients)
            ),
        )
        if logs_staging is not None:
            log_entries = log_entries or tuple(_hash_tree(logs_staging))
            manifest.write(logs_staging, stamped("logs", log_entries, config.log_paths))
        with guard.shielded():
            handover.publish("data", gen)
            if built is not None:
                chunked.keep_parent(handover, built, config.encryption_domain)
            if logs_staging is not None:
                handover.publish("logs", gen)
        handover.discard_staging()

    if post_failure is not None:
        raise StepFailed(
            post_failure.step,
            post_failure.error,
            kept=f"generation {gen} was collected and handed over all the same",
        )
    data_size = data_digest.stored.size if built is None else built.result.added_size
    read = None if built is None else built.result.bytes_read
    return BackupResult(gen, window.downtime, data_size, len(log_entries), job.elapsed, read)


def _precopy(config: SourceConfig, kept: mirror.Mirror, job: Job) -> None:
    """Bring the mirror up to date while the application runs: the bulk pass, then further
    passes while what they copy keeps shrinking (within PRECOPY_MAX_PASSES and
    PRECOPY_MAX_SECONDS), so the stop begins with the smallest remainder, as live migration
    does."""
    started = time.monotonic()
    changes: list[int | None] = []
    stop_reason = None
    while stop_reason is None:
        kind = "bulk pass" if not changes else "pre-copy pass"
        with job.step(
            f"1.b collect application data, 1.d collect log data ({kind}, application running)"
        ):
            report = kept.sync()
        changes.append(report.changed)
        logger.info("%s %d: %s", kind, len(changes), report.describe())
        stop_reason = mirror.next_pass(
            changes,
            time.monotonic() - started,
            config.precopy_max_passes,
            config.precopy_max_seconds,
        )
    logger.info("pre-copy done after %d pass(es): %s", len(changes), stop_reason)


def _archive(config: SourceConfig, root: Path, staging: Path) -> archive.Archived:
    """tar → zstd (→ age, with ENCRYPT_RECIPIENTS) into the staging directory, hashed."""
    members = [archive.member_name(p) for p in config.data_paths]
    name = archive.ENCRYPTED_ARCHIVE_NAME if config.encrypt_recipients else archive.ARCHIVE_NAME
    return archive.create(
        root,
        members,
        staging / name,
        config.zstd_level,
        config.zstd_threads,
        config.encrypt_recipients,
        config.excludes.skipper(root, config.data_paths),
    )


def _archive_entry(archived: archive.Archived) -> FileEntry:
    if archived.plaintext is None:
        return FileEntry(archive.ARCHIVE_NAME, archived.stored.size, archived.stored.sha256)
    return FileEntry(
        archive.ENCRYPTED_ARCHIVE_NAME,
        archived.stored.size,
        archived.stored.sha256,
        archived.plaintext.size,
        archived.plaintext.sha256,
    )


def _copy_logs(config: SourceConfig, root: Path, staging: Path) -> None:
    """Copy each log path (below `root`) into the log generation's staging directory,
    preserving metadata and using reflinks where the filesystem has them; what EXCLUDE and
    EXCLUDE_IF_PRESENT exclude is left out (rsync copies the list of what is left in)."""
    for path in config.log_paths:
        name = archive.member_name(path)
        target = staging / name
        target.mkdir(parents=True, exist_ok=True)
        skip = config.excludes.skipper(root, [path])
        with tempfile.NamedTemporaryFile(dir=staging.parent, prefix=".logs-") as names:
            if skip is not None and excludes.listing(root, [name], skip, names):
                names.flush()
                command = [
                    "rsync",
                    "--archive",
                    "--hard-links",
                    "--numeric-ids",
                    "--sparse",
                    "--from0",
                    f"--files-from={names.name}",
                    f"{root}/",
                    f"{staging}/",
                ]
            else:
                command = ["cp", "--archive", "--reflink=auto", f"{root / name}/.", f"{target}/"]
            process = subprocess.run(command, capture_output=True, text=True, check=False)
        if process.returncode != 0:
            raise OSError(f"copy of {path} failed: {process.stderr.strip()[-500:]}")


def _encrypt_tree(plain: Path, target: Path, recipients: tuple[object, ...]) -> list[FileEntry]:
    """Encrypt every regular file below `plain` into the same place below `target`, named
    `<name>.age`, with the file's owner, mode and times; directories keep their owner and
    mode. Return the manifest entries (stored and plaintext digests). Symbolic links and
    other special files are left out."""
    entries = []
    for directory, dirs, files in os.walk(plain):
        dirs.sort()
        here = Path(directory)
        into = target / here.relative_to(plain)
        into.mkdir(exist_ok=True)
        _copy_metadata(here, into)
        for name in sorted(files):
            source = here / name
            if not source.is_file() or source.is_symlink():
                continue
            stored = into / (name + encryption.SUFFIX)
            digests = archive.encrypt_file(source, stored, recipients)
            _copy_metadata(source, stored)
            assert digests.plaintext is not None
            entries.append(
                FileEntry(
                    str(stored.relative_to(target)),
                    digests.stored.size,
                    digests.stored.sha256,
                    digests.plaintext.size,
                    digests.plaintext.sha256,
                )
            )
    return entries


def _copy_metadata(source: Path, target: Path) -> None:
    st = source.stat()
    with contextlib.suppress(PermissionError):  # not root: as `cp --archive` does, the files
        os.chown(target, st.st_uid, st.st_gid)  # are this agent's
    os.chmod(target, st.st_mode & 0o7777)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def _hash_tree(root: Path) -> list[FileEntry]:
    entries = []
    for path in archive.walk_files(root):
        if path.parent == root and path.name == manifest.NAME:
            continue
        digest = archive.hash_file(path)
        entries.append(FileEntry(str(path.relative_to(root)), digest.size, digest.sha256))
    return entries


def _waiting(handover: Handover) -> list[Manifest]:
    return [m for kind in generation.KINDS for m in handover.complete(kind)]


def stale(waiting: list[Manifest], now: datetime, max_age_hours: int, max_count: int) -> bool:
    """Whether generations waiting in the handover mean the transport is failing: one is older
    than `max_age_hours` (0: any waiting generation), or more than `max_count` of one kind wait
    (0: no limit; each run hands over one generation of each kind, so a missed transport adds
    one of each)."""
    if max_count and any(n > max_count for n in Counter(m.kind for m in waiting).values()):
        return True
    limit = now - timedelta(hours=max_age_hours)
    return any(generation.parse(m.generation) <= limit for m in waiting)


def _alert_previous_transport_failed(config: SourceConfig, handover: Handover) -> None:
    """Backpressure: nothing waiting is ever dropped, but a transport that does not take it
    is alerted."""
    waiting = _waiting(handover)
    if stale(
        waiting, datetime.now(UTC), config.handover_alert_age_hours, config.handover_alert_count
    ):
        names = ", ".join(f"{m.kind}/{m.generation}" for m in waiting)
        counts = Counter(m.kind for m in waiting)
        alerts.send(
            config.mail,
            alerts.Alert(
                source=config.source_id,
                job=JOB,
                step="previous transport failed",
                error=f"{' and '.join(f'{n} {kind}' for kind, n in counts.items())} generations "
                f"from earlier runs are still waiting in the handover {handover.root}: {names}",
                kept="all of them, untouched; the next transport takes them, oldest first",
                warning="generations from an earlier run still wait in the handover",
            ),
        )


def _kept(handover: Handover) -> str:
    waiting = ", ".join(f"{m.kind}/{m.generation}" for m in _waiting(handover))
    mirrors = [
        str(handover.mirror(kind)) for kind in generation.KINDS if handover.mirror(kind).exists()
    ]
    return (
        f"no new generation was handed over (its staging copy was removed); "
        f"generations waiting in the handover: {waiting or 'none'}"
        + (f"; the mirror {' and '.join(mirrors)} is kept for the next run" if mirrors else "")
    )
