"""The `backup-agent` command. A container entrypoint only has to call it.

Exit codes: 0 done; 1 the job failed (an alert was sent); 2 invalid configuration or usage
(nothing was touched); 3 another job of this agent is running (this run was skipped);
128+N interrupted by signal N (the application was started again).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import __version__, alerts, config, lock, logsetup
from agent.interrupts import InterruptGuard, Interrupted
from agent.lock import LockBusy
from agent.steps import StepFailed
from agent.stores import ReadableStore
from agent.verification import Ledger, Stored

logger = logging.getLogger("agent")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BUSY = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backup-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"backup-agent {__version__}")
    parser.add_argument("--env-file", type=Path, default=Path(".env"),
                        help="a .env file to read settings from (default: ./.env if present); "
                             "the environment wins")
    commands = parser.add_subparsers(dest="command", required=True)

    show = commands.add_parser("config", help="print the effective configuration, secrets masked")
    show.add_argument("--role", choices=config.ALL_ROLES, help="only this role's settings")
    show.add_argument("--markdown", action="store_true",
                      help="print the settings table of the README instead")
    show.set_defaults(run=_show_config)

    source = commands.add_parser("source", help="jobs of the source agent")
    source_jobs = source.add_subparsers(dest="job", required=True)
    source_jobs.add_parser("backup", help="step 1: stop the application, collect its data and "
                           "logs into the handover, start it again").set_defaults(run=_source_jobs,
                                                                                  jobs=("backup",))
    source_jobs.add_parser("push", help="step 2 (push): upload waiting generations to S3, "
                           "verify, rotate, move to the source store").set_defaults(
                               run=_source_jobs, jobs=("push",))
    source_jobs.add_parser("run", help="backup, then push (one cron line for push "
                           "sites)").set_defaults(run=_source_jobs, jobs=("backup", "push"))
    source_jobs.add_parser("reconcile", help="start again what a killed run left stopped and "
                           "roll back an interrupted restore (every job does it first; `cron` "
                           "when it starts)").set_defaults(run=_source_jobs, jobs=("reconcile",))
    commands.add_parser("gateway", help="the forced command of the source's sshd: serves "
                        "SSH_ORIGINAL_COMMAND (list, ack, read-only rsync)").set_defaults(
                            run=_gateway)

    restore = commands.add_parser(
        "restore", help="restore a data generation into the data paths: verify it while the "
        "application runs, stop it, swap the contents in, start it again")
    restore.add_argument("--from", dest="origin", default="source-store", metavar="STORE",
                         help="source-store (default), handover, s3, or the directory of a "
                              "pull-mode sink store (SINK_STORE_DIR, or its <source-id> folder)")
    restore.add_argument("--generation", help="the generation id (default: the newest complete)")
    restore.add_argument("--dry-run", action="store_true",
                         help="show what would happen and change nothing")
    restore.add_argument("--keep-previous", action="store_true",
                         help="keep the replaced contents in <HANDOVER_DIR>/.replaced/ instead "
                              "of removing them")
    restore.add_argument("--target", type=Path,
                         help="unpack into this new or empty directory instead, without "
                              "touching the application")
    restore.add_argument("--allow-outside-symlinks", action="store_true",
                         help="restore symbolic links that point outside the data paths")
    restore.set_defaults(run=_restore)

    listing = commands.add_parser("list", help="the generations in every store of this role")
    listing.add_argument("--role", choices=config.ALL_ROLES,
                         help="source or sink (default: from SOURCE_ID / SINK_SOURCES)")
    listing.add_argument("--json", action="store_true", help="JSON for scripts")
    listing.set_defaults(run=_list)

    check = commands.add_parser("verify", help="re-hash stored generations against their "
                                "manifests; alert on a mismatch or a missing file")
    check.add_argument("--role", choices=config.ALL_ROLES,
                       help="source or sink (default: from SOURCE_ID / SINK_SOURCES)")
    scope = check.add_mutually_exclusive_group()
    scope.add_argument("--latest", dest="everything", action="store_false",
                       help="the newest complete generation of each kind in each store "
                            "(default)")
    scope.add_argument("--all", dest="everything", action="store_true",
                       help="every complete generation")
    check.set_defaults(run=_verify, everything=False)

    cron = commands.add_parser("cron", help="the container's entrypoint: run this role's jobs on "
                               "their CRON_* schedules, one at a time, logging to stdout")
    cron.add_argument("--role", choices=config.ALL_ROLES,
                      help="source or sink (default: from SOURCE_ID / SINK_SOURCES)")
    cron.set_defaults(run=_cron)
    health = commands.add_parser("health", help="exit 0 when the scheduled jobs are healthy, 1 "
                                 "when the last run failed or none succeeded in time")
    health.add_argument("--role", choices=config.ALL_ROLES,
                        help="source or sink (default: from SOURCE_ID / SINK_SOURCES)")
    health.set_defaults(run=_health)

    sink = commands.add_parser("sink", help="jobs of the sink agent")
    sink_jobs = sink.add_subparsers(dest="job", required=True)
    sink_jobs.add_parser("pull-data", help="step 2 (pull): fetch, verify, store, rotate, "
                         "acknowledge data generations").set_defaults(run=_sink_pull, kind="data")
    sink_jobs.add_parser("pull-logs", help="step 3: the same for log generations").set_defaults(
        run=_sink_pull, kind="logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as exc:
        print(f"backup-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except config.ConfigError as exc:
        print("backup-agent: invalid configuration (nothing was touched):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:  # `backup-agent config | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _values(args: argparse.Namespace) -> dict[str, str]:
    return config.read_values(os.environ, args.env_file)


def _show_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(config.markdown_table())
        return EXIT_OK
    for name, value, explicit in config.effective(_values(args), args.role):
        print(f"{name}={value}" + ("" if explicit else "  # default"))
    return EXIT_OK


def _source_jobs(args: argparse.Namespace) -> int:
    """Run the source jobs named in `args.jobs` one after another, under one lock: a push
    also runs when the backup before it failed, so what waits still travels."""
    from agent import push, source_backup
    from agent.handover import Handover
    from agent.stores.s3 import S3Store

    settings = config.parse_source(_values(args), push="push" in args.jobs)
    config.check_paths(settings)
    logsetup.configure(settings.log_level, settings.log_format)
    bodies: dict[str, tuple[str, Callable[[InterruptGuard], object]]] = {
        "backup": (source_backup.JOB, lambda guard: source_backup.backup(settings, guard)),
        "push": (push.JOB, lambda guard: push.push(settings, S3Store(settings.s3,
                                                                     settings.source_id), guard)),
        "reconcile": (source_backup.RECONCILE_JOB,
                      lambda guard: source_backup.reconcile(settings, guard)),
    }

    def run_all(guard: InterruptGuard) -> int:
        codes = []
        for name in args.jobs:
            codes.append(_run_job(*bodies[name], settings.source_id, settings.mail, guard))
            if codes[-1] > EXIT_BUSY:
                break
        return max(codes)

    return _exclusive(Handover(settings.handover_dir).lock_path, run_all)


def _exclusive(lock_path: Path, run: Callable[[InterruptGuard], int]) -> int:
    """Run while holding the agent's lock, with SIGTERM/SIGINT turned into exceptions; a run
    that finds the lock taken is skipped with exit code 3."""
    try:
        with lock.exclusive(lock_path), InterruptGuard() as guard:
            return run(guard)
    except LockBusy as exc:
        logger.error("%s", exc)
        return EXIT_BUSY


def _run_job(job: str, body: Callable[[InterruptGuard], object], source: str,
             mail: config.MailConfig, guard: InterruptGuard) -> int:
    """Run a job's body and turn its outcome into an exit code, alerting on every failure."""
    try:
        body(guard)
    except StepFailed as failure:
        cause = failure.__context__ if isinstance(failure.__context__, StepFailed) else None
        error = failure.error + (f" (while handling: {cause})" if cause else "")
        if not failure.alerted:
            alerts.send(mail, alerts.Alert(source, job, failure.step, error, failure.kept))
        if isinstance(failure.__cause__, Interrupted):
            return 128 + failure.__cause__.signum
        return EXIT_FAILED
    except Interrupted as exc:
        alerts.send(mail, alerts.Alert(source, job, "interrupted", str(exc),
                                       "everything as it was; the next run takes it up again"))
        return 128 + exc.signum
    except Exception as exc:
        logger.exception("%s failed unexpectedly", job)
        alerts.send(mail, alerts.Alert(source, job, "unexpected error", repr(exc), ""))
        return EXIT_FAILED
    return EXIT_OK


def _gateway(args: argparse.Namespace) -> int:
    from agent import gateway

    settings = config.parse_gateway(_values(args))
    logsetup.configure("WARNING")
    return gateway.serve(os.environ.get("SSH_ORIGINAL_COMMAND", ""), gateway.current_user(),
                         settings)


def _sink_pull(args: argparse.Namespace) -> int:
    from agent import sink

    settings = config.parse_sink(_values(args))
    config.check_sink_paths(settings)
    logsetup.configure(settings.log_level, settings.log_format)
    return _exclusive(sink.state_dir(settings) / "agent.lock", lambda guard: _run_job(
        sink.JOBS[args.kind], lambda _: sink.pull(settings, args.kind), "sink", settings.mail,
        guard))


class UsageError(Exception):
    """The command cannot run as given; nothing was touched."""


def _role(args: argparse.Namespace, values: dict[str, str]) -> str:
    if args.role:
        return str(args.role)
    roles = [role for role, env in ((config.SOURCE, "SOURCE_ID"), (config.SINK, "SINK_SOURCES"))
             if values.get(env)]
    if len(roles) != 1:
        raise UsageError("cannot tell the role: set SOURCE_ID (source) or SINK_SOURCES (sink), "
                         "or pass --role")
    return roles[0]


@dataclass(frozen=True)
class _RoleStores:
    """What `list`, `verify` and `health` need of a role: its stores, its ledger, its lock,
    its name in alerts and its mail settings."""

    stores: list[Stored]
    ledger: Ledger
    lock_path: Path
    name: str
    mail: config.MailConfig
    identities: tuple[object, ...] = ()


def _role_stores(role: str, values: dict[str, str]) -> _RoleStores:
    from agent import sink
    from agent.handover import Handover
    from agent.stores.local import LocalStore
    from agent.stores.s3 import S3Store

    if role == config.SINK:
        settings = config.parse_sink(values)
        logsetup.configure(settings.log_level, settings.log_format)
        stored = [Stored("sink store", s.id, LocalStore(settings.store_dir / s.id))
                  for s in settings.sources]
        return _RoleStores(stored, Ledger(sink.ledger_path(settings)),
                     sink.state_dir(settings) / "agent.lock", "sink", settings.mail,
                     settings.decrypt_identities)
    source = config.parse_source(values)
    logsetup.configure(source.log_level, source.log_format)
    handover = Handover(source.handover_dir)
    stored = [Stored("handover", source.source_id, LocalStore(source.handover_dir)),
              Stored("source store", source.source_id, LocalStore(source.source_store_dir))]
    if source.s3.bucket:
        stored.append(Stored("sink store", source.source_id, S3Store(source.s3, source.source_id)))
    return _RoleStores(stored, Ledger(handover.ledger_path), handover.lock_path, source.source_id,
                 source.mail, source.decrypt_identities)


def _list(args: argparse.Namespace) -> int:
    from agent import catalog

    values = _values(args)
    role = _role_stores(_role(args, values), values)
    found, problems = catalog.rows(role.stores, role.ledger)
    for problem in problems:
        print(f"backup-agent: cannot list {problem}", file=sys.stderr)
    print(catalog.as_json(found) if args.json else catalog.as_table(found))
    return EXIT_FAILED if problems else EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from agent import verification

    values = _values(args)
    role = _role_stores(_role(args, values), values)
    return _exclusive(role.lock_path, lambda guard: _run_job(
        verification.JOB, lambda _: verification.verify(role.stores, role.ledger,
                                                        args.everything, role.identities),
        role.name, role.mail, guard))


def _restore(args: argparse.Namespace) -> int:
    from agent import restore
    from agent.handover import Handover
    from agent.stores import StoreError

    settings = config.parse_source(_values(args))
    logsetup.configure(settings.log_level, settings.log_format)
    request = restore.Request(args.generation, args.dry_run, args.keep_previous, args.target,
                              args.allow_outside_symlinks)
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
        code = _run_job(restore.JOB, lambda g: results.append(restore.restore(settings, plan, g)),
                        settings.source_id, settings.mail, guard)
        for result in results if not args.dry_run else ():
            print(f"restored data generation {result.generation} from {result.store} into "
                  f"{', '.join(result.paths)}"
                  + (f"; the application was stopped for {result.downtime_seconds:.2f} s"
                     if args.target is None else "")
                  + (f"; the replaced contents are in {result.previous_kept_in}"
                     if result.previous_kept_in else ""))
        return code

    return _exclusive(Handover(settings.handover_dir).lock_path, run)


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
        raise UsageError(f"--from {origin}: use source-store, handover, s3 or the absolute "
                         "path of a sink store directory")
    if (directory / settings.source_id).is_dir():
        directory = directory / settings.source_id
    return LocalStore(directory)


def _cron_setup(args: argparse.Namespace) -> tuple[str, config.CronConfig, Path]:
    """The role, its schedules and the status file `health` reads; every setting of the role
    is checked now, so a bad one stops the container at start (exit 2)."""
    from agent import sink
    from agent.handover import Handover

    values = _values(args)
    role = _role(args, values)
    problems = []
    try:
        schedule = config.parse_cron(values, role)
    except config.ConfigError as exc:
        problems, schedule = exc.problems, config.CronConfig((), ())
    try:
        if role == config.SINK:
            status = sink.state_dir(config.parse_sink(values)) / "cron.json"
        else:
            jobs = {job for job, _ in schedule.schedules} | set(schedule.at_start)
            source = config.parse_source(values, push=bool(jobs & {"run", "push"}))
            status = Handover(source.handover_dir).state / "cron.json"
    except config.ConfigError as exc:
        problems += exc.problems
    if problems:
        raise config.ConfigError(problems)
    return role, schedule, status


def _cron(args: argparse.Namespace) -> int:
    from agent import cron

    role, schedule, status_path = _cron_setup(args)
    logsetup.send_to(sys.stdout)
    values = _values(args)
    logsetup.configure(values.get("LOG_LEVEL", "INFO"), values.get("LOG_FORMAT", "plain"))

    def run(job: str) -> int:
        return main(["--env-file", str(args.env_file), *cron.command(job, role)])

    scheduler = cron.Scheduler(schedule.schedules, run, cron.Status(status_path))
    # A source agent killed while the application was stopped (its container restarted, e.g.
    # a sidecar) repairs that now, not at the next tick.
    first = ("reconcile",) if role == config.SOURCE else ()
    return scheduler.serve(first + schedule.at_start)


def _health(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from agent import cron

    _, schedule, status_path = _cron_setup(args)
    try:
        status = cron.Status(status_path).load()
    except (FileNotFoundError, ValueError):
        print(f"unhealthy: no status in {status_path}; is `backup-agent cron` running?")
        return EXIT_FAILED
    problems = cron.assess(status, schedule.schedules, datetime.now(UTC))
    for problem in problems:
        print(f"unhealthy: {problem}")
    if not problems:
        print("healthy: " + ", ".join(f"{job} last succeeded "
                                      f"{status['jobs'].get(job, {}).get('last_success', 'never')}"
                                      for job, _ in schedule.schedules))
    return EXIT_FAILED if problems else EXIT_OK
