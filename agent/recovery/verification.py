"""Verify stored generations again, long after they were written, and record each success in
the ledger (`core.ledger`), for `list`.

    for each store, kind and generation (the newest, or all): read the manifest → re-hash every
    file it lists (an encrypted file: its stored ciphertext; with an identity, its plaintext
    too, decrypted in the same read) → record the success, or collect the failure → alert once
    for all failures
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.chunks import checking
from agent.chunks.checking import PackChecks
from agent.core import encryption, generation, manifest
from agent.core.ledger import Ledger
from agent.core.manifest import FileEntry, Manifest
from agent.runtime.steps import Job, StepFailed
from agent.stores import ReadableStore, StoreError, VerificationFailed

logger = logging.getLogger(__name__)

JOB = "verify"


@dataclass(frozen=True)
class Stored:
    """One store of generations as a role sees it: what it is called and whose it is."""

    name: str  # handover, source store, sink store
    source_id: str
    store: ReadableStore


class _Hashing:
    """Reads chunks of a stored file (for pyrage: `read`/`readinto`), or takes the plaintext
    (`write`), hashing and counting what passes."""

    def __init__(self, chunks: object = None) -> None:
        self._chunks = iter(chunks) if chunks is not None else None  # type: ignore[call-overload]
        self._pending = memoryview(b"")
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        if not self._pending:
            chunk = next(self._chunks, b"")  # type: ignore[arg-type]
            self.write(chunk)
            self._pending = memoryview(chunk)
        take = len(self._pending) if size < 0 else min(size, len(self._pending))
        data, self._pending = self._pending[:take], self._pending[take:]
        return data.tobytes()

    def readinto(self, buffer: object) -> int:
        data = self.read(len(buffer))  # type: ignore[arg-type]
        buffer[: len(data)] = data  # type: ignore[index]
        return len(data)

    def write(self, data: bytes | memoryview) -> int:
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def rest(self) -> None:
        """Hash the rest of the chunks, without copying them."""
        self.write(self._pending)
        self._pending = memoryview(b"")
        for chunk in self._chunks:  # type: ignore[union-attr]
            self.write(chunk)


def _check_file(
    store: ReadableStore, kind: str, gen: str, entry: FileEntry, identities: Sequence[object]
) -> None:
    stored = _Hashing(store.chunks(kind, gen, entry.path))
    plain = _Hashing() if entry.encrypted and identities else None
    failure = None
    try:
        if plain is not None:
            try:
                encryption.decrypt(stored, plain, identities)
            except encryption.WrongKey as exc:
                raise VerificationFailed(f"{entry.path}: {exc}") from None
            except encryption.DecryptionFailed as exc:
                failure = f"{entry.path}: {exc}"
        stored.rest()
    except (FileNotFoundError, StoreError) as exc:
        raise VerificationFailed(f"{entry.path} is missing or unreadable: {exc}") from None
    if (stored.size, stored.hash.hexdigest()) != (entry.size, entry.sha256):
        raise VerificationFailed(
            f"{entry.path}: {stored.size} bytes with sha256 "
            f"{stored.hash.hexdigest()}; the manifest says {entry.size} "
            f"bytes, {entry.sha256}"
        )
    if failure:
        raise VerificationFailed(failure)
    if plain is not None and (plain.size, plain.hash.hexdigest()) != (
        entry.plaintext_size,
        entry.plaintext_sha256,
    ):
        raise VerificationFailed(
            f"{entry.path} decrypted: {plain.size} bytes with sha256 "
            f"{plain.hash.hexdigest()}; the manifest says "
            f"{entry.plaintext_size} bytes, {entry.plaintext_sha256}"
        )


def verify_generation(
    stored: Stored,
    kind: str,
    gen: str,
    identities: Sequence[object] = (),
    packs: PackChecks | None = None,
) -> Manifest:
    """Re-hash every file of the generation against its manifest; with `identities`, also
    decrypt every encrypted file and hash its plaintext. A chunked generation's packs are
    checked too (agent.chunks.checking; `packs` remembers what this run read already).
    Return the manifest. Raise VerificationFailed naming the first file that is missing or
    differs (or cannot be decrypted), or a manifest that is invalid or of another source,
    kind or generation."""
    store = stored.store
    try:
        m = store.read_manifest(kind, gen)
    except (manifest.InvalidManifest, FileNotFoundError, StoreError) as exc:
        raise VerificationFailed(f"the manifest cannot be read: {exc}") from None
    if (m.source_id, m.kind, m.generation) != (stored.source_id, kind, gen):
        raise VerificationFailed(f"the manifest is of {m.source_id}/{m.kind}/{m.generation}")
    for entry in m.files:
        _check_file(store, kind, gen, entry, identities)
    if m.chunked:
        checking.verify_chunked(store, m, identities, packs or PackChecks())  # type: ignore[arg-type]
    return m


@dataclass
class VerifyResult:
    verified: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def verify(
    stores: Sequence[Stored],
    ledger: Ledger,
    everything: bool,
    identities: Sequence[object] = (),
    percent: float = 100.0,
) -> VerifyResult:
    """Verify the newest complete generation of each kind in each store (`everything`: all of
    them; `identities`: decrypting encrypted files too), recording every success in `ledger`.
    Of chunked generations, each pack is read once, or only a random `percent` of them.
    Raise StepFailed listing every failure after all were checked."""
    job = Job(JOB)
    result = VerifyResult()
    for stored in stores:
        packs = PackChecks(percent)
        for kind in generation.KINDS:
            try:
                complete = stored.store.generations(kind)[0]
            except StoreError as exc:
                result.failed.append(f"{stored.name} {stored.store.url}: {exc}")
                continue
            for gen in complete if everything else complete[-1:]:
                label = f"{stored.name} {stored.store.url}/{kind}/{gen}"
                try:
                    with job.step(f"verify {label}"):
                        m = verify_generation(stored, kind, gen, identities, packs)
                except StepFailed as failure:
                    result.failed.append(f"{label}: {failure.error}")
                    continue
                ledger.record(stored.store.url, kind, gen)
                result.verified.append(f"{label} ({m.total_size} bytes)")
    logger.info(
        "%s done: %d generation(s) verified, %d failed, %.2f s",
        JOB,
        len(result.verified),
        len(result.failed),
        job.elapsed,
    )
    if result.failed:
        raise StepFailed(
            f"verify ({len(result.failed)} failed)",
            "; ".join(result.failed),
            kept="the stored generations are left as they are; restore from one that verifies",
        )
    return result
