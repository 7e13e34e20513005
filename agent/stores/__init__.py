"""Stores that keep generations: a local directory (the source store, a pull-mode sink store)
and S3 (the push-mode sink store)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from agent import retention
from agent.manifest import Manifest

logger = logging.getLogger(__name__)


class StoreError(Exception):
    """A store operation failed for good; the message names the cause and the fix."""


class VerificationFailed(Exception):
    """What a store holds differs from what its manifest or the upload says."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str
    region: str
    bucket: str
    prefix: str
    access_key_id: str
    secret_access_key: str
    session_token: str
    addressing_style: str
    ca_bundle: str
    part_size: int
    concurrency: int
    retry_seconds: int


class ReadableStore(Protocol):
    """A store generations can be read back from: to restore, verify or list them."""

    @property
    def url(self) -> str: ...

    def generations(self, kind: str) -> tuple[list[str], list[str]]: ...

    def read_manifest(self, kind: str, gen: str) -> Manifest: ...

    def chunks(self, kind: str, gen: str, name: str) -> Iterable[bytes | memoryview]: ...


class Store(Protocol):
    def generations(self, kind: str) -> tuple[list[str], list[str]]: ...

    def delete_generation(self, kind: str, gen: str) -> None: ...


def rotate(store: Store, kind: str, policy: retention.Policy, newest_verified: str) -> list[str]:
    """Apply `policy` to the complete generations of `kind` in `store`, never removing
    `newest_verified`, and remove incomplete generations older than it (abandoned uploads).
    Call only after `newest_verified` was verified. Return the removed ids."""
    complete, incomplete = store.generations(kind)
    removed = retention.plan(complete, policy, protect=newest_verified).remove
    removed += retention.abandoned(incomplete, newest_verified)
    for gen in removed:
        store.delete_generation(kind, gen)
    if removed:
        logger.info("removed %s generations: %s", kind, ", ".join(removed))
    return removed
