"""The source agent's commands: `source backup|push|run|reconcile`, `prune` and `gateway`, each
run as a job (see runtime.jobs). The modules that do the work are imported when a command runs,
so the gateway — the forced command of every SSH session — starts without boto3 or the Docker
API."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable

from agent import config
from agent.core.handover import Handover
from agent.monitoring import context
from agent.runtime import logsetup
from agent.runtime.interrupts import InterruptGuard
from agent.runtime.jobs import EXIT_BUSY, exclusive, run_job, values

logger = logging.getLogger(__name__)


def source_command(args: argparse.Namespace) -> int:
    """Run the source jobs named in `args.jobs` one after another, under one lock: a push
    also runs when the backup before it failed, so what waits still travels."""
    from agent.stores import s3

    settings = config.load_source(values(args), push="push" in args.jobs)
    logsetup.configure(settings.log_level, settings.log_format)
    if settings.s3.bucket and "reconcile" not in args.jobs:
        s3.warm_up()  # while the Docker API is imported and the backup waits on rsync
    from agent.source import backup, push
    from agent.stores.s3 import S3Store

    bodies: dict[str, tuple[str, Callable[[InterruptGuard], object]]] = {
        "backup": (backup.JOB, lambda guard: backup.backup(settings, guard)),
        "push": (
            push.JOB,
            lambda guard: push.push(settings, S3Store(settings.s3, settings.source_id), guard),
        ),
        "reconcile": (backup.RECONCILE_JOB, lambda guard: backup.reconcile(settings, guard)),
    }

    monitors = context.for_source(settings)

    def run_all(guard: InterruptGuard) -> int:
        codes = []
        for name in args.jobs:
            job, body = bodies[name]
            codes.append(run_job(job, body, settings.source_id, settings.mail, guard, monitors))
            if codes[-1] > EXIT_BUSY:
                break
        return max(codes)

    return exclusive(Handover(settings.handover_dir).lock_path, run_all)


def prune_command(args: argparse.Namespace) -> int:
    """Rotate and collect the garbage of each store of the source (the S3 sink store when
    S3_BUCKET is set, then the source store) under the agent's lock, printing what went (or,
    with --dry-run, what would). A store that fails is one line on stderr and exit 1; the
    others are still collected."""
    from agent.chunks import prune
    from agent.core.retention import Policy
    from agent.stores.local import LocalStore
    from agent.stores.s3 import S3Store

    settings = config.parse_source(values(args))
    logsetup.configure(settings.log_level, settings.log_format)
    handover = Handover(settings.handover_dir)
    targets: list[tuple[prune.PackStore, str, Policy]] = []
    if settings.s3.bucket:
        targets.append((S3Store(settings.s3, settings.source_id), "sink store", settings.sink_keep))
    targets.append((LocalStore(settings.source_store_dir), "source store", settings.source_keep))
    options = prune.settings_for(settings)

    def run(guard: InterruptGuard) -> int:
        chosen = (
            (prune.target_for(store, name, handover), policy, options)
            for store, name, policy in targets
        )
        return prune.prune_targets(chosen, args.dry_run)

    return exclusive(handover.lock_path, run)


def gateway_command(args: argparse.Namespace) -> int:
    """The forced command of the source's sshd: serve SSH_ORIGINAL_COMMAND for the user."""
    from agent.source import gateway

    settings = config.parse_gateway(values(args))
    logsetup.configure("WARNING")
    for handler in logging.getLogger().handlers:
        handler.addFilter(gateway.HidePaths(settings))
    return gateway.serve(
        os.environ.get("SSH_ORIGINAL_COMMAND", ""), gateway.current_user(), settings
    )
