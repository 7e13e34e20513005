"""The commands that read generations back: `restore` (step 4), `list` and `verify`, each run as
a job (see runtime.jobs) over the stores of the agent's role."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent import config
from agent.core.handover import Handover
from agent.core.ledger import Ledger
from agent.monitoring import context
from agent.monitoring.context import Monitoring
from agent.recovery.verification import Stored
from agent.runtime import logsetup
from agent.runtime.interrupts import InterruptGuard
from agent.runtime.jobs import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    exclusive,
    role,
    run_job,
    values,
)
from agent.stores import ReadableStore

if TYPE_CHECKING:
    from agent.recovery import catalog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _RoleStores:
    """What `list`, `verify` and `health` need of a role: its stores, its ledger, its lock,
    its name in alerts and its mail settings."""

    stores: list[Stored]
    ledger: Ledger
    lock_path: Path
    name: str
    mail: config.MailConfig
    monitors: Monitoring
    identities: tuple[object, ...] = ()


def _role_stores(role: str, values: Mapping[str, str]) -> _RoleStores:
    from agent.stores.local import LocalStore
    from agent.stores.s3 import S3Store

    if role == config.SINK:
        settings = config.parse_sink(values)
        logsetup.configure(settings.log_level, settings.log_format)
        stored = [
            Stored("sink store", s.id, LocalStore(settings.store_dir / s.id))
            for s in settings.sources
        ]
        return _RoleStores(
            stored,
            Ledger(settings.ledger_path),
            settings.lock_path,
            "sink",
            settings.mail,
            context.for_sink(settings),
            settings.decrypt_identities,
        )
    source = config.parse_source(values)
    logsetup.configure(source.log_level, source.log_format)
    handover = Handover(source.handover_dir)
    stored = [
        Stored("handover", source.source_id, LocalStore(source.handover_dir)),
        Stored("source store", source.source_id, LocalStore(source.source_store_dir)),
    ]
    if source.s3.bucket:
        stored.append(Stored("sink store", source.source_id, S3Store(source.s3, source.source_id)))
    return _RoleStores(
        stored,
        Ledger(handover.ledger_path),
        handover.lock_path,
        source.source_id,
        source.mail,
        context.for_source(source),
        source.decrypt_identities,
    )


def list_command(args: argparse.Namespace) -> int:
    from agent.recovery import catalog

    raw = values(args)
    stores = _role_stores(role(args, raw), raw)
    found, problems = catalog.rows(stores.stores, stores.ledger)
    for problem in problems:
        print(f"backup-agent: cannot list {problem}", file=sys.stderr)
    if args.record:
        _record_listing(stores.monitors, found, problems)
    else:
        print(catalog.as_json(found) if args.json else catalog.as_table(found))
    return EXIT_FAILED if problems else EXIT_OK


def _record_listing(where: Monitoring, found: list[catalog.Row], problems: list[str]) -> None:
    """Save what `list` found for the status page and the metrics (`cron` does it after every
    job when they are on)."""
    from agent.monitoring import record, state

    rows = [asdict(row) for row in found]
    state.update(
        where.state_path,
        where.role,
        where.name,
        lambda body: state.with_stores(body, rows, problems, time.time()),
    )
    record.refresh_textfile(where)


def verify_command(args: argparse.Namespace) -> int:
    from agent.recovery import verification

    raw = values(args)
    stores = _role_stores(role(args, raw), raw)
    return exclusive(
        stores.lock_path,
        lambda guard: run_job(
            verification.JOB,
            lambda _: verification.verify(
                stores.stores,
                stores.ledger,
                args.everything,
                stores.identities,
                args.read_data_subset,
            ),
            stores.name,
            stores.mail,
            guard,
            stores.monitors,
        ),
    )


def restore_command(args: argparse.Namespace) -> int:
    from agent.recovery import restore
    from agent.stores import StoreError

    settings = config.parse_source(values(args))
    logsetup.configure(settings.log_level, settings.log_format)
    if args.allow_outside_symlinks:
        logger.warning(
            "--allow-outside-symlinks is deprecated and has no effect: symbolic "
            "links are restored as they were, wherever they point; drop the option"
        )
    request = restore.Request(
        args.generation, args.dry_run, args.keep_previous, args.target, args.path
    )
    results: list[restore.RestoreResult] = []

    def run(guard: InterruptGuard) -> int:
        try:
            plan = restore.plan(settings, _restore_origin(args.origin, settings), request)
        except (restore.RestoreRefused, UsageError) as exc:
            print(f"backup-agent: restore refused (nothing was touched): {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except StoreError as exc:
            print(f"backup-agent: {exc}", file=sys.stderr)
            return EXIT_FAILED

        def body(g: InterruptGuard) -> restore.RestoreResult:
            results.append(restore.restore(settings, plan, g))
            return results[-1]

        code = run_job(
            restore.JOB,
            body,
            settings.source_id,
            settings.mail,
            guard,
            None if args.dry_run or args.target else context.for_source(settings),
        )
        for result in results if not args.dry_run else ():
            print(
                f"restored data generation {result.generation} from {result.store} into "
                f"{', '.join(result.paths)}"
                + (
                    f"; the application was stopped for {result.downtime_seconds:.2f} s"
                    if args.target is None
                    else ""
                )
                + (
                    f"; the replaced contents are in {result.previous_kept_in}"
                    if result.previous_kept_in
                    else ""
                )
            )
        return code

    return exclusive(Handover(settings.handover_dir).lock_path, run)


def _browse(
    args: argparse.Namespace, body: Callable[[config.SourceConfig, ReadableStore], object]
) -> int:
    """Run `files` or `export`: a refused request exits 2, a generation that cannot be read 1."""
    from agent.recovery import browse
    from agent.recovery.restore import RestoreRefused
    from agent.stores import StoreError

    settings = config.parse_source(values(args))
    logsetup.configure(settings.log_level, settings.log_format)
    try:
        body(settings, _restore_origin(args.origin, settings))
    except RestoreRefused as exc:
        print(f"backup-agent: {args.command} refused: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (browse.BrowseFailed, StoreError) as exc:
        print(f"backup-agent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def files_command(args: argparse.Namespace) -> int:
    from agent.recovery import browse

    return _browse(
        args,
        lambda settings, store: browse.files(
            settings, store, args.generation, args.path, args.json
        ),
    )


def export_command(args: argparse.Namespace) -> int:
    from agent.recovery import browse

    if sys.stdout.isatty():
        raise UsageError(
            "export writes a tar stream to stdout, not to a terminal: pipe it, e.g. "
            "`backup-agent export | tar -x`, or redirect it to a file"
        )
    return _browse(
        args,
        lambda settings, store: browse.export(settings, store, args.generation, sys.stdout.buffer),
    )


def _restore_origin(origin: str, settings: config.SourceConfig) -> ReadableStore:
    from agent.stores.local import LocalStore
    from agent.stores.s3 import S3Store

    if origin == "source-store":
        return LocalStore(settings.source_store_dir)
    if origin == "handover":
        return LocalStore(settings.handover_dir)
    if origin == "s3":
        if not settings.s3.bucket:
            raise UsageError("--from s3 needs S3_BUCKET and the other S3_* settings")
        return S3Store(settings.s3, settings.source_id)
    directory = Path(origin)
    if not directory.is_absolute() or not directory.is_dir():
        raise UsageError(
            f"--from {origin}: use source-store, handover, s3 or the absolute "
            "path of a sink store directory"
        )
    if (directory / settings.source_id).is_dir():
        directory = directory / settings.source_id
    return LocalStore(directory)
