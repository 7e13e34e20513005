"""Safe extraction of a data archive: one pass over the stored bytes hashes them, decrypts them
(an encrypted generation) and hashes the plaintext, decompresses them, checks every tar member
(the policy: `core.members`) and unpacks it with GNU tar into fresh staging directories.

Nothing of an archive is trusted. A member is refused — and the whole extraction fails — when
its name is absolute or climbs with `..`, when it lies outside the generation's data paths,
when it is a device node, when a hard link names anything but an earlier member, or when it
would be written through a symbolic link. A symbolic link is restored as the link it was,
wherever it points (as tar, restic and borg do): an application's own absolute links, e.g.
`/data/current -> /data/releases/v2` made inside its container, point outside the host-side
data path, and nothing is ever written through a link. GNU tar adds its own guard (it strips
`/` and `..` and delays symbolic links), so even a member checked too late cannot be written
outside the staging directory; and a staging directory is only ever used after the stream's
sha256 matched the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import zstandard

from agent.core import encryption
from agent.core.archive import CHUNK, Digest
from agent.core.encryption import DecryptionFailed, WrongKey
from agent.core.handoff import HandOff
from agent.core.members import MemberPolicy, UnsafeMember, check_one_name, member_kind

_QUEUE_CHUNKS = 8
_UNPACK_CHUNK = 4 << 20  # decompressed bytes per step: fewer hand-overs between threads
# The checker thread runs Python code; a short switch interval lets the decompressing thread
# take the GIL back soon after each C call instead of waiting out the default 5 ms.
_SWITCH_INTERVAL = 0.0005
_F_SETPIPE_SZ = 1031


class ExtractionFailed(Exception):
    pass


class DigestMismatch(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """Unpack the members below `member` (e.g. `srv/app`; empty: all) into `directory`, which
    must be new or empty."""

    directory: Path
    member: str = ""


class _Reader:
    """A thread that pulls the stored bytes (a file or an S3 download), hashes them and hands
    them out, so reading and hashing overlap with decompression."""

    def __init__(self, chunks: Iterable[bytes | memoryview]) -> None:
        self._handoff = HandOff(_QUEUE_CHUNKS)
        self._hash = hashlib.sha256()
        self._size = 0
        self._thread = threading.Thread(target=self._run, args=(chunks,), daemon=True)
        self._thread.start()

    def _run(self, chunks: Iterable[bytes | memoryview]) -> None:
        try:
            for chunk in chunks:
                self._hash.update(chunk)
                self._size += len(chunk)
                if not self._handoff.put(chunk):
                    return
            self._handoff.put(b"")
        except BaseException as exc:
            self._handoff.put(exc)

    def read(self, size: int = -1) -> memoryview:
        return self._handoff.read(size)

    def drain(self) -> Digest:
        """Read to the end; return the size and sha256 of everything read."""
        while self.read(CHUNK):
            pass
        self._thread.join()
        return Digest(self._size, self._hash.hexdigest())

    def close(self) -> None:
        self._handoff.stop()
        self._thread.join()


class _Checker:
    """A thread that reads the decompressed stream's tar headers with tarfile and checks each
    member against the policy, beside the decompression. The stream only seeks forward: the
    contents are skipped, never copied."""

    def __init__(self, policy: MemberPolicy) -> None:
        self._policy = policy
        self._queue: queue.Queue[bytes] = queue.Queue(_QUEUE_CHUNKS)
        self._buffer = memoryview(b"")
        self._position = 0
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def feed(self, chunk: bytes) -> None:
        """Hand over the next decompressed chunk (b"" at the end). Raise the member's problem
        as soon as one was found."""
        if self.error is not None:
            raise self.error
        while not self._stop.is_set():
            try:
                self._queue.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            # closed by the stream it reads from ending; tarfile holds no file of its own
            archive = tarfile.open(fileobj=self, mode="r:")  # type: ignore[call-overload]  # noqa: SIM115
            while (member := archive.next()) is not None:
                archive.members.clear()  # memory stays flat whatever the number of members
                check_one_name(member)
                self._policy.check(member.name, member_kind(member), member.linkname)
            self.seek(1 << 62)  # the end-of-archive blocks, and any rest of the stream
        except UnsafeMember as exc:
            self.error = exc
        except (tarfile.TarError, EOFError) as exc:
            self.error = ExtractionFailed(f"the archive is damaged: {exc}")
        self._stop.set()

    def _pull(self) -> bool:
        while not self._stop.is_set():
            try:
                self._buffer = memoryview(self._queue.get(timeout=0.1))
                return bool(self._buffer)
            except queue.Empty:
                continue
        return False

    def read(self, size: int = -1) -> bytes:
        parts = []
        while size != 0 and (self._buffer or self._pull()):
            take = len(self._buffer) if size < 0 else min(size, len(self._buffer))
            parts.append(self._buffer[:take].tobytes())
            self._buffer = self._buffer[take:]
            self._position += take
            size -= take
        return b"".join(parts)

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or position < self._position:
            raise OSError("the archive stream only seeks forward")
        while self._position < position and (self._buffer or self._pull()):
            take = min(position - self._position, len(self._buffer))
            self._buffer = self._buffer[take:]
            self._position += take
        return self._position


def _start_tar(target: Target) -> subprocess.Popen[bytes]:
    target.directory.mkdir(parents=True, exist_ok=True)
    command = [
        "tar",
        "--extract",
        "--file=-",
        "--numeric-owner",
        "--same-permissions",
        f"--directory={target.directory}",
    ]
    if os.geteuid() == 0:
        command.append("--same-owner")
    errors = tempfile.TemporaryFile()  # noqa: SIM115  # closed when the process is reaped
    process = subprocess.Popen(
        command + (["--", target.member] if target.member else []),
        stdin=subprocess.PIPE,
        stderr=errors,
    )
    process.errors = errors  # type: ignore[attr-defined]
    with contextlib.suppress(OSError):  # a smaller pipe only costs speed
        fcntl.fcntl(process.stdin.fileno(), _F_SETPIPE_SZ, CHUNK)  # type: ignore[union-attr]
    return process


def _tar_error(process: subprocess.Popen[bytes]) -> str:
    errors: IO[bytes] = process.errors  # type: ignore[attr-defined]
    errors.seek(0)
    return errors.read().decode(errors="replace").strip()[-500:] or f"exit {process.returncode}"


def _write(processes: list[subprocess.Popen[bytes]], data: bytes) -> None:
    for process in list(processes):
        try:
            process.stdin.write(data)  # type: ignore[union-attr]
        except BrokenPipeError:
            # tar stops reading after the end-of-archive blocks; anything else is an error
            processes.remove(process)
            if process.wait(timeout=30) != 0:
                raise ExtractionFailed(f"tar failed: {_tar_error(process)}") from None


@dataclass(frozen=True)
class Decryption:
    """How to decrypt an encrypted archive: the identities, and the plaintext's expected
    digest."""

    identities: Sequence[object]
    plaintext: Digest


def extract(
    chunks: Iterable[bytes | memoryview],
    expected: Digest,
    targets: Sequence[Target],
    policy: MemberPolicy,
    decryption: Decryption | None = None,
) -> Digest:
    """Unpack the zstd-compressed tar arriving as `chunks` (age-encrypted, with `decryption`)
    into every target, checking each member with `policy` and hashing the stored bytes (and
    the plaintext). Return the stored bytes' digest. Raise DigestMismatch if it (or the
    plaintext's) is not the expected one, WrongKey if no identity opens the archive,
    DecryptionFailed if the ciphertext is damaged, UnsafeMember for a refused member,
    ExtractionFailed if the stream or tar fails. On any failure the targets may hold a partial
    tree: the caller removes them."""
    reader = _Reader(chunks)
    checker = _Checker(policy)
    plain_hash = hashlib.sha256()
    plain_size = [0]

    def count(data: bytes) -> None:
        plain_hash.update(data)
        plain_size[0] += len(data)

    decrypting = (
        encryption.Decrypting(reader, decryption.identities, count)
        if decryption is not None
        else None
    )
    processes: list[subprocess.Popen[bytes]] = []
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(_SWITCH_INTERVAL)
    try:
        processes = [_start_tar(target) for target in targets]
        try:
            _unpack(decrypting or reader, checker, processes)
            if decrypting is not None:
                decrypting.finish()
        except WrongKey:
            raise
        except (UnsafeMember, ExtractionFailed, DecryptionFailed) as exc:
            if decrypting is not None:
                decrypting.close()  # it no longer reads the stored bytes
            _check(reader.drain(), expected, cause=exc)  # damaged, rather than crafted?
            raise
        digest = reader.drain()
        _check(digest, expected)
        if decryption is not None:
            _check(
                Digest(plain_size[0], plain_hash.hexdigest()),
                decryption.plaintext,
                what="the decrypted archive",
            )
        return digest
    finally:
        sys.setswitchinterval(switch_interval)
        if decrypting is not None:
            decrypting.close()
        reader.close()
        checker.close()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.errors.close()  # type: ignore[attr-defined]


def _unpack(
    reader: _Reader | encryption.Decrypting,
    checker: _Checker,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    open_processes = list(processes)
    # zstandard only calls read() of its source
    decompressor = zstandard.ZstdDecompressor().stream_reader(
        cast(IO[bytes], reader), read_size=CHUNK
    )
    try:
        while data := decompressor.read(_UNPACK_CHUNK):
            _write(open_processes, data)
            checker.feed(data)
    except zstandard.ZstdError as exc:
        raise ExtractionFailed(f"the archive is damaged: {exc}") from exc
    checker.feed(b"")
    checker.finish()
    for process in open_processes:
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()  # type: ignore[union-attr]
    for process in processes:
        if process.wait() != 0:
            raise ExtractionFailed(f"tar failed: {_tar_error(process)}")


def _check(
    digest: Digest, expected: Digest, cause: BaseException | None = None, what: str = ""
) -> None:
    if digest != expected:
        raise DigestMismatch(
            f"{what + ': ' if what else ''}{digest.size} bytes with sha256 "
            f"{digest.sha256}; the manifest says {expected.size} bytes, "
            f"{expected.sha256}"
        ) from cause
