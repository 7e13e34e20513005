"""Stores that keep generations: a local directory (the source store, a pull-mode sink store)
and S3 (the push-mode sink store)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from agent.core import retention
from agent.core.manifest import Manifest

logger = logging.getLogger(__name__)


class StoreError(Exception):
    """A store operation failed for good; the message names the cause and the fix."""


class VerificationFailed(Exception):
    """What a store holds differs from what its manifest or the upload says."""


class ReadableStore(Protocol):
    """A store generations can be read back from: to restore, verify or list them."""

    @property
    def url(self) -> str: ...

    def generations(self, kind: str) -> tuple[list[str], list[str]]: ...

    def read_manifest(self, kind: str, gen: str) -> Manifest: ...

    def chunks(self, kind: str, gen: str, name: str) -> Iterable[bytes | memoryview]: ...


class Store(Protocol):
    @property
    def url(self) -> str: ...

    def generations(self, kind: str) -> tuple[list[str], list[str]]: ...

    def delete_generation(self, kind: str, gen: str) -> None: ...


def rotate(
    store: Store, name: str, kind: str, policy: retention.Policy, newest_verified: str
) -> str:
    """Apply `policy` to the complete generations of `kind` in `store` (called `name` in the
    log: source store, sink store), never removing `newest_verified`, and remove incomplete
    generations older than it (abandoned uploads). Call only after `newest_verified` was
    verified. Return the log line: which store, what it kept and what it removed."""
    complete, incomplete = store.generations(kind)
    planned = retention.plan(complete, policy, protect=newest_verified)
    abandoned = retention.abandoned(incomplete, newest_verified)
    for gen in planned.remove + abandoned:
        store.delete_generation(kind, gen)
    line = retention_line(name, store.url, kind, policy, planned, abandoned)
    logger.info("%s", line)
    return line


def retention_line(
    name: str,
    url: str,
    kind: str,
    policy: retention.Policy,
    planned: retention.Plan,
    abandoned: list[str],
) -> str:
    """One line saying which store retention pruned, by what policy, and with what outcome."""
    removed = (
        f"removed {len(planned.remove)}: {', '.join(planned.remove)}"
        if planned.remove
        else "removed none"
    )
    line = (
        f"retention of {kind} in the {name} {url} (keep {policy.describe()}): "
        f"kept {len(planned.keep)}, {removed}"
    )
    if abandoned:
        line += f"; removed {len(abandoned)} incomplete: {', '.join(abandoned)}"
    return line
