"""The SSH gateway on the source: the forced command of sshd for the data and log users.

It allows exactly three things, and only on the part of the handover that belongs to the
user it runs as (`data` for SSH_DATA_USER, `logs` for SSH_LOG_USER):

    list                  the complete generations waiting, as JSON
    rsync --server ...    a read-only rsync of that part, handed to Debian's `rrsync -ro`
    ack <generation>      the sink holds a verified copy: data → 2.c move to the source store
                          and rotate it; logs → free the handover

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

from agent import generation, manifest, stores
from agent.config import GatewayConfig
from agent.handover import Handover
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
            return _rsync(kind, config)
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
        hint = ("; the gateway users need read and write access to HANDOVER_DIR and "
                "SOURCE_STORE_DIR through their group" if isinstance(exc, PermissionError) else "")
        print(f"backup-agent gateway: failed: {exc}{hint}", file=sys.stderr)
        return EXIT_REFUSED


def _refuse(user: str, command: str, reason: str) -> int:
    logger.warning("refused %r for %s: %s", command[:200], user, reason)
    print(f"backup-agent gateway: refused: {reason}", file=sys.stderr)
    return EXIT_REFUSED


def _rsync(kind: str, config: GatewayConfig) -> int:
    """Hand the rsync to `rrsync -ro` restricted to this kind's part of the handover; rrsync
    checks the options and refuses anything but reading."""
    directory = Handover(config.handover_dir).root / kind
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("rsync of %s for the sink", directory)
    sys.stdout.flush()
    os.execv(config.rrsync, [config.rrsync, "-ro", str(directory)])
    return EXIT_REFUSED  # not reached: execv replaces the process


def _list(kind: str, config: GatewayConfig) -> int:
    waiting = [{"generation": m.generation, "files": len(m.files), "size": m.total_size}
               for m in Handover(config.handover_dir).complete(kind)]
    print(json.dumps(waiting))
    return 0


def _ack(kind: str, gen: str, config: GatewayConfig) -> int:
    """The sink holds a verified copy of `gen`: free the handover of it."""
    if not generation.is_valid(gen):
        raise Refused(f"not a generation id: {gen!r}")
    handover = Handover(config.handover_dir)
    directory = handover.generation_dir(kind, gen)
    try:
        manifest.read(directory)
    except (FileNotFoundError, manifest.InvalidManifest):
        raise Refused(f"no complete {kind} generation {gen} in the handover") from None
    if kind == "data":
        source_store = LocalStore(config.source_store_dir)
        source_store.move_in(directory, kind, gen)
        logger.info("2.c moved %s to the source store %s", gen, config.source_store_dir)
        stores.rotate(source_store, kind, config.source_keep, newest_verified=gen)
    else:
        (directory / manifest.NAME).unlink()
        shutil.rmtree(directory)
        logger.info("freed the handover of logs generation %s", gen)
    print(f"acknowledged {kind} generation {gen}")
    return 0


def current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name
