"""Garbage collection of a pull-mode sink store (`<SINK_STORE_DIR>/<source>/`), after each
pulled data generation's rotation and as `prune --role sink`. The sink store's generations
arrive only by pulls, so nothing waits to arrive there: a pack no complete generation lists is
condemned, and deleted by a later job (two phases; see chunks.gc). Packs are not repacked on
the sink (the source never learns of packs it did not write)."""

from __future__ import annotations

import argparse

from agent import config
from agent.chunks import prune
from agent.config import SinkConfig
from agent.runtime import logsetup
from agent.runtime.interrupts import InterruptGuard
from agent.runtime.jobs import exclusive, values
from agent.stores.local import LocalStore

SETTINGS = prune.Settings(repack_below=0)


def target(settings: SinkConfig, source_id: str) -> prune.Target:
    """The garbage collection target of `source_id`'s sink store; its usage cache and
    scratch space live in `<SINK_STORE_DIR>/.state/<source>/`."""
    state = settings.store_dir / ".state" / source_id
    return prune.Target(
        LocalStore(settings.store_dir / source_id),
        "sink store",
        {},
        state / "usage.sqlite",
        state / "gc-scratch",
    )


def prune_command(args: argparse.Namespace) -> int:
    """`prune --role sink`: rotate (SINK_KEEP_*) and collect the garbage of every source's
    sink store under the sink agent's lock, printing what went (or, with --dry-run, what
    would). A store that fails is one line on stderr and exit 1; the others go on."""
    settings = config.load_sink(values(args))
    logsetup.configure(settings.log_level, settings.log_format)

    def run(guard: InterruptGuard) -> int:
        targets = (
            (target(settings, source.id), settings.sink_keep, SETTINGS)
            for source in settings.sources
        )
        return prune.prune_targets(targets, args.dry_run)

    return exclusive(settings.lock_path, run)
