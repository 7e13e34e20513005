"""The SSH gateway on the source: the forced command of sshd for the data and log users.

It allows exactly three things, and only on the part of the handover that belongs to the
user it runs as (`data` for SSH_DATA_USER, `logs` for SSH_LOG_USER):

    list                  the complete generations waiting, as JSON
    rsync --server ...    a read-only rsync of that part, handed to Debian's `rrsync -ro`;
                          for the data user also of the packs of chunked generations: a
                          transfer of `packs/` reads the handover's, one of `stored-packs/`
                          the source store's (see chunks.pulled)
    ack <generation>      the sink holds a verified copy: data → 2.c move to the source store
                          and rotate it; logs → free the handover. For a chunked generation
                          the sink sends its report (chunks.pulled.SinkReport) on standard
                          input, bounded and checked

Anything else is refused with a message and logged. The command arrives in
SSH_ORIGINAL_COMMAND and is never given to a shell.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shlex
import shutil
import sys
from typing import NoReturn

from agent import stores
from agent.chunks import handover as chunked
from agent.chunks import ids, pulled, transport
from agent.config import GatewayConfig
from agent.core import generation, manifest
from agent.core.handover import Handover
from agent.core.manifest import Manifest
from agent.stores import VerificationFailed
from agent.stores.local import LocalStore

logger = logging.getLogger(__name__)

EXIT_REFUSED = 1


class Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def kind_of(user: str, config: GatewayConfig) -> str:
    """Return the handover part the SSH user may read. Raise Refused for any other user."""
    kinds = {config.data_user: "data", config.log_user: "logs"}
    if user not in kinds:
        raise Refused(f"user {user!r} is neither SSH_DATA_USER nor SSH_LOG_USER")
    return kinds[user]


def serve(command: str, user: str, config: GatewayConfig) -> int:
    """Carry out one SSH command for `user`. Return the exit code for the client."""
    try:
        kind = kind_of(user, config)
        words = shlex.split(command)
        if words[:2] == ["rsync", "--server"]:
            return _rsync(kind, command, config)
        if words == ["list"]:
            return _list(kind, config)
        if len(words) == 2 and words[0] == "ack":
            return _ack(kind, words[1], config)
        raise Refused("allowed: `list`, `ack <generation>`, or a read-only rsync")
    except ValueError as exc:
        return _refuse(user, command, f"cannot parse the command ({exc})")
    except Refused as refusal:
        return _refuse(user, command, refusal.reason)
    except OSError as exc:  # one line for the sink's alert, not a traceback
        logger.error("%r for %s failed: %s", command[:200], user, exc)
        hint = (
            "; the gateway users need read and write access to HANDOVER_DIR and "
            "SOURCE_STORE_DIR through their group"
            if isinstance(exc, PermissionError)
            else ""
        )
        print(
            f"backup-agent gateway: failed: {hide_paths(str(exc), config)}{hint}", file=sys.stderr
        )
        return EXIT_REFUSED


def hide_paths(text: str, config: GatewayConfig) -> str:
    """`text` with the handover's and the source store's paths replaced by the names of their
    settings: the gateway's standard error goes to the SSH client, which has no business
    learning the source's file system."""
    roots = {
        str(config.handover_dir): "HANDOVER_DIR",
        str(config.source_store_dir): "SOURCE_STORE_DIR",
    }
    for path in sorted(roots, key=len, reverse=True):
        text = text.replace(path, roots[path])
    return text


class HidePaths(logging.Filter):
    """A filter for the gateway's log handler: every line with hide_paths applied."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__()
        self.config = config

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = hide_paths(record.getMessage(), self.config), None
        return True


def _refuse(user: str, command: str, reason: str) -> int:
    logger.warning("refused %r for %s: %s", command[:200], user, reason)
    print(f"backup-agent gateway: refused: {reason}", file=sys.stderr)
    return EXIT_REFUSED


def _rsync(kind: str, command: str, config: GatewayConfig) -> NoReturn:
    """Hand the rsync to `rrsync -ro` restricted to this kind's part of the handover, or, for
    a data transfer of exactly `packs/` or `stored-packs/` (the sink's --files-from of the
    packs it lacks), to the handover's or the source store's packs; rrsync checks the options
    and refuses anything but reading."""
    directory = Handover(config.handover_dir).root / kind
    head, dot, tail = command.rpartition(" . ")
    roots = {
        f"{pulled.HANDOVER_PACKS}/": config.handover_dir / ids.PACKS_DIR,
        f"{pulled.STORED_PACKS}/": config.source_store_dir / ids.PACKS_DIR,
    }
    if kind == "data" and dot and tail in roots:
        directory = roots[tail]
        os.environ["SSH_ORIGINAL_COMMAND"] = f"{head} . ./"
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("rsync of %s for the sink", directory)
    sys.stdout.flush()
    os.execv(config.rrsync, [config.rrsync, "-ro", str(directory)])  # replaces the process


def _list(kind: str, config: GatewayConfig) -> int:
    waiting = [
        {"generation": m.generation, "files": len(m.files), "size": m.total_size}
        for m in Handover(config.handover_dir).complete(kind)
    ]
    print(json.dumps(waiting))
    return 0


def _ack(kind: str, gen: str, config: GatewayConfig) -> int:
    """The sink holds a verified copy of `gen`: free the handover of it."""
    if not generation.is_valid(gen):
        raise Refused(f"not a generation id: {gen!r}")
    os.umask(0o007)  # what it makes in the shared handover and source store stays shared
    handover = Handover(config.handover_dir)
    directory = handover.generation_dir(kind, gen)
    try:
        m = manifest.read(directory)
    except (FileNotFoundError, manifest.InvalidManifest):
        raise Refused(f"no complete {kind} generation {gen} in the handover") from None
    if kind == "data":
        source_store = LocalStore(config.source_store_dir)
        if m.chunked:
            _chunked_2c(handover, source_store, m)
        source_store.move_in(directory, kind, gen)
        done = f"2.c moved it to the source store {source_store.url}; " + stores.rotate(
            source_store, "source store", kind, config.source_keep, newest_verified=gen
        )
    else:
        (directory / manifest.NAME).unlink()
        shutil.rmtree(directory)
        done = f"freed the handover {handover.root} of it"
    # The sink logs this line: the gateway's own log (stderr, warnings only) goes to the sink.
    print(f"acknowledged {kind} generation {gen}: {done}")
    return 0


def _chunked_2c(handover: Handover, source_store: LocalStore, m: Manifest) -> None:
    """Before the generation directory of the chunked `m` moves: keep the sink's report (read
    from standard input), then move into the source store the packs it lacks (each checked
    against its id; those another waiting generation lists are copied, so they stay for the
    sink), and check it holds every pack `m` lists. The source agent frees the handover of
    what is left and collects the source store's garbage, under its lock."""
    try:
        report = pulled.SinkReport.decode(sys.stdin.buffer.read(pulled.REPORT_LIMIT + 1))
    except ValueError as exc:
        raise Refused(f"an unreadable report of the sink ({str(exc)[:200]})") from None
    pulled.record_report(handover, report)
    others = chunked.waiting_packs(handover, besides=m.generation)
    try:
        transport.send_packs(source_store, m.packs, handover, None, keep=others)
        transport.check_present(source_store, m)
    except VerificationFailed as exc:
        raise Refused(f"generation {m.generation} cannot move to the source store: {exc}") from None


def current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name
