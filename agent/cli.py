"""The `backup-agent` command: parses the command line and dispatches to the command's module
(`runtime.commands`, `source.jobs`, `sink.jobs`, `recovery.jobs`). A container entrypoint only
has to call it.

Exit codes: 0 done; 1 the job failed (an alert was sent); 2 invalid configuration or usage
(nothing was touched); 3 another job of this agent is running (this run was skipped);
128+N interrupted by signal N (the application was started again).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from agent import __version__, config
from agent.runtime.jobs import EXIT_CONFIG, EXIT_OK, UsageError

Command = Callable[[argparse.Namespace], int]


def _command(module: str, function: str) -> Command:
    """`module.function`, imported when the command runs: a command imports only what it needs
    (every cron job and health check starts a process, and the tests start thousands)."""

    def run(args: argparse.Namespace) -> int:
        command: Command = getattr(importlib.import_module(module), function)
        return command(args)

    return run


SOURCE_JOBS, SINK_JOBS = "agent.source.jobs", "agent.sink.jobs"
RECOVERY_JOBS, COMMANDS = "agent.recovery.jobs", "agent.runtime.commands"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backup-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"backup-agent {__version__}")
    parser.add_argument(
        "--env-file",
        type=Path,
        default=Path(".env"),
        help="a .env file to read settings from (default: ./.env if present); the environment wins",
    )
    subcommands = parser.add_subparsers(dest="command", required=True)

    show = subcommands.add_parser(
        "config", help="print the effective configuration, secrets masked"
    )
    show.add_argument("--role", choices=config.ALL_ROLES, help="only this role's settings")
    show.add_argument(
        "--markdown",
        action="store_true",
        help="print the settings table (docs/settings.md) instead",
    )
    show.set_defaults(run=_command(COMMANDS, "config_command"))

    source = subcommands.add_parser("source", help="jobs of the source agent")
    source_commands = source.add_subparsers(dest="job", required=True)
    source_commands.add_parser(
        "backup",
        help="step 1: stop the application, collect its data and "
        "logs into the handover, start it again",
    ).set_defaults(run=_command(SOURCE_JOBS, "source_command"), jobs=("backup",))
    source_commands.add_parser(
        "push",
        help="step 2 (push): upload waiting generations to S3, "
        "verify, rotate, move to the source store",
    ).set_defaults(run=_command(SOURCE_JOBS, "source_command"), jobs=("push",))
    source_commands.add_parser(
        "run", help="backup, then push (one cron line for push sites)"
    ).set_defaults(run=_command(SOURCE_JOBS, "source_command"), jobs=("backup", "push"))
    source_commands.add_parser(
        "reconcile",
        help="start again what a killed run left stopped and "
        "roll back an interrupted restore (every job does it first; `cron` "
        "when it starts)",
    ).set_defaults(run=_command(SOURCE_JOBS, "source_command"), jobs=("reconcile",))
    subcommands.add_parser(
        "gateway",
        help="the forced command of the source's sshd: serves "
        "SSH_ORIGINAL_COMMAND (list, ack, read-only rsync)",
    ).set_defaults(run=_command(SOURCE_JOBS, "gateway_command"))

    restore = subcommands.add_parser(
        "restore",
        help="restore a data generation into the data paths: verify it while the "
        "application runs, stop it, swap the contents in, start it again",
    )
    restore.add_argument(
        "--from",
        dest="origin",
        default="source-store",
        metavar="STORE",
        help="source-store (default), handover, s3, or the directory of a "
        "pull-mode sink store (SINK_STORE_DIR, or its <source-id> folder)",
    )
    restore.add_argument("--generation", help="the generation id (default: the newest complete)")
    restore.add_argument(
        "--dry-run", action="store_true", help="show what would happen and change nothing"
    )
    restore.add_argument(
        "--keep-previous",
        action="store_true",
        help="keep the replaced contents in <HANDOVER_DIR>/.replaced/ instead of removing them",
    )
    restore.add_argument(
        "--target",
        type=Path,
        help="unpack into this new or empty directory instead, without touching the application",
    )
    restore.add_argument(
        "--path",
        type=Path,
        help="restore only this file or directory (its absolute path as `files` lists it), "
        "in place or into --target",
    )
    restore.add_argument(
        "--allow-outside-symlinks",
        action="store_true",
        help="deprecated, no effect: symbolic links are restored as they were, wherever they point",
    )
    restore.set_defaults(run=_command(RECOVERY_JOBS, "restore_command"))

    files = subcommands.add_parser(
        "files", help="list the entries of a data generation (like `restic ls`)"
    )
    _browse_arguments(files)
    files.add_argument(
        "path", nargs="?", default="", help="only this absolute path and what lies below it"
    )
    files.add_argument("--json", action="store_true", help="one JSON object a line")
    files.set_defaults(run=_command(RECOVERY_JOBS, "files_command"))
    export = subcommands.add_parser(
        "export",
        help="write a data generation (either format) to stdout as a tar stream: "
        "`backup-agent export | tar -x`",
    )
    _browse_arguments(export)
    export.set_defaults(run=_command(RECOVERY_JOBS, "export_command"))

    listing = subcommands.add_parser("list", help="the generations in every store of this role")
    listing.add_argument(
        "--role",
        choices=config.ALL_ROLES,
        help="source or sink (default: from SOURCE_ID / SINK_SOURCES)",
    )
    listing.add_argument("--json", action="store_true", help="JSON for scripts")
    listing.add_argument(
        "--record",
        action="store_true",
        help="save the listing for the status page and the metrics instead of printing it "
        "(`cron` does it after every job when METRICS_PORT or METRICS_TEXTFILE is set)",
    )
    listing.set_defaults(run=_command(RECOVERY_JOBS, "list_command"))

    check = subcommands.add_parser(
        "verify",
        help="re-hash stored generations against their "
        "manifests; alert on a mismatch or a missing file",
    )
    check.add_argument(
        "--role",
        choices=config.ALL_ROLES,
        help="source or sink (default: from SOURCE_ID / SINK_SOURCES)",
    )
    scope = check.add_mutually_exclusive_group()
    scope.add_argument(
        "--latest",
        dest="everything",
        action="store_false",
        help="the newest complete generation of each kind in each store (default)",
    )
    scope.add_argument(
        "--all", dest="everything", action="store_true", help="every complete generation"
    )
    check.add_argument(
        "--read-data-subset",
        type=_percent,
        default=100.0,
        metavar="N%",
        help="read and hash only a random N%% of the packs of chunked generations (every "
        "pack's presence and size is still checked)",
    )
    check.set_defaults(run=_command(RECOVERY_JOBS, "verify_command"), everything=False)

    pruning = subcommands.add_parser(
        "prune",
        help="rotate the data generations of the source's stores (the S3 sink store and the "
        "source store) and collect their garbage: condemn packs no generation lists, delete "
        "those condemned by an earlier run, repack mostly dead ones",
    )
    pruning.add_argument(
        "--dry-run", action="store_true", help="print what would go and change nothing"
    )
    pruning.add_argument(
        "--role",
        choices=config.ALL_ROLES,
        help="source (default: from SOURCE_ID / SINK_SOURCES) or sink: the sink store of "
        "every source of SINK_SOURCES (pull mode)",
    )
    pruning.set_defaults(run=_prune_command)

    cron = subcommands.add_parser(
        "cron",
        help="the container's entrypoint: run this role's jobs on "
        "their CRON_* schedules, one at a time, logging to stdout",
    )
    cron.add_argument(
        "--role",
        choices=config.ALL_ROLES,
        help="source or sink (default: from SOURCE_ID / SINK_SOURCES)",
    )
    cron.set_defaults(run=_cron_command)
    health = subcommands.add_parser(
        "health",
        help="exit 0 when the scheduled jobs are healthy, 1 "
        "when the last run failed or none succeeded in time",
    )
    health.add_argument(
        "--role",
        choices=config.ALL_ROLES,
        help="source or sink (default: from SOURCE_ID / SINK_SOURCES)",
    )
    health.set_defaults(run=_command(COMMANDS, "health_command"))

    sink = subcommands.add_parser("sink", help="jobs of the sink agent")
    sink_commands = sink.add_subparsers(dest="job", required=True)
    sink_commands.add_parser(
        "pull-data",
        help="step 2 (pull): fetch, verify, store, rotate, acknowledge data generations",
    ).set_defaults(run=_command(SINK_JOBS, "pull_command"), kind="data")
    sink_commands.add_parser("pull-logs", help="step 3: the same for log generations").set_defaults(
        run=_command(SINK_JOBS, "pull_command"), kind="logs"
    )
    return parser


def _prune_command(args: argparse.Namespace) -> int:
    from agent.runtime.jobs import role, values

    if role(args, values(args)) == "sink":
        return _command("agent.sink.housekeeping", "prune_command")(args)
    return _command(SOURCE_JOBS, "prune_command")(args)


def _cron_command(args: argparse.Namespace) -> int:
    from agent.runtime import commands

    return commands.cron_command(args, main)


def _browse_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--from",
        dest="origin",
        default="source-store",
        metavar="STORE",
        help="source-store (default), handover, s3, or the directory of a pull-mode sink store",
    )
    command.add_argument("--generation", help="the generation id (default: the newest complete)")


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        value = -1.0
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a percentage above 0 and up to 100, e.g. 10%"
        )
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Command = args.run
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
