"""Encryption at rest in the age format (https://age-encryption.org/v1), through pyrage.

Recipients are age public keys (`age1...`) or SSH public keys (`ssh-ed25519 ...`,
`ssh-rsa ...`); identities, needed only where a restore runs, are age secret keys or
unencrypted SSH private keys. Everything streams: age encrypts in 64 KiB chunks, each
authenticated, so memory stays flat and a truncated or changed file is detected. A stored
generation can be decrypted by hand with `age -d -i KEY FILE`.

Parsing keys is pure; `encrypt` and `Decrypting` stream between file-like objects.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import pyrage
from pyrage import ssh, x25519

from agent.core.handoff import HandOff

SUFFIX = ".age"
_QUEUE_CHUNKS = 16


class DecryptionFailed(Exception):
    """A stored file could not be decrypted: the identity does not match, or the ciphertext
    is damaged or was changed."""


class WrongKey(DecryptionFailed):
    """None of the identities is a recipient of the file."""


class Readable(Protocol):
    def read(self, size: int = -1) -> bytes | memoryview: ...


def _items(text: str) -> list[str]:
    """Comma- or newline-separated items; blank lines and `#` comments are skipped."""
    items: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        items.extend(item.strip() for item in line.split(",") if item.strip())
    return items


def recipient_items(text: str) -> list[str]:
    """The recipients named in `text`, as written (see parse_recipients)."""
    return _items(text)


def parse_recipients(text: str) -> tuple[Any, ...]:
    """Given age public keys and SSH public keys separated by commas or newlines (`#`
    comments allowed), return the recipients. Raise ValueError naming the first one that is
    not a valid key."""
    recipients = []
    for item in _items(text):
        try:
            if item.startswith("age1"):
                recipients.append(x25519.Recipient.from_str(item))
            elif item.startswith(("ssh-", "ecdsa-", "sk-")):
                recipients.append(ssh.Recipient.from_str(item))
            else:
                raise ValueError(item)
        except pyrage.RecipientError as exc:
            raise ValueError(f"{item[:40]}: {exc}") from None
    return tuple(recipients)


def parse_identities(text: str) -> tuple[Any, ...]:
    """Given the content of an age identity file (`AGE-SECRET-KEY-1...` lines, `#` comments)
    or of an unencrypted SSH private key (PEM/OpenSSH), return the identities. Raise
    ValueError if there is none or one is not valid (the message never holds the key)."""
    if "-----BEGIN" in text:
        try:
            return (ssh.Identity.from_buffer(text.encode()),)
        except pyrage.IdentityError as exc:
            raise ValueError(f"not an unencrypted SSH private key ({exc})") from None
    identities = []
    for line in (line.strip() for line in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise ValueError("a line is not an age secret key (AGE-SECRET-KEY-1...)") from None
    if not identities:
        raise ValueError("no age secret key or SSH private key found")
    return tuple(identities)


def encrypt(reader: Any, writer: Any, recipients: Sequence[Any]) -> None:
    """Encrypt everything `reader.read()` gives into `writer.write()`, streaming."""
    pyrage.encrypt_io(reader, writer, list(recipients))


def _decrypt_error(exc: BaseException) -> DecryptionFailed:
    if "No matching keys" in str(exc):
        return WrongKey(
            "the identity (DECRYPT_IDENTITY/DECRYPT_IDENTITY_FILE) is not a "
            "recipient of this generation: it was encrypted to other keys"
        )
    return DecryptionFailed(f"the encrypted file is damaged or was changed ({exc})")


def decrypt(reader: Any, writer: Any, identities: Sequence[Any]) -> None:
    """Decrypt everything `reader.read()` gives into `writer.write()`, streaming. Raise
    WrongKey or DecryptionFailed. Some plaintext may have been written before a damaged
    chunk is found: use it only after this returned."""
    try:
        pyrage.decrypt_io(reader, writer, list(identities))
    except pyrage.DecryptError as exc:
        raise _decrypt_error(exc) from None


class _Stopped(Exception):
    pass


class Decrypting:
    """A readable stream of the plaintext of `source` (a readable stream of ciphertext),
    decrypted in a thread beside the reader, through a small queue."""

    def __init__(
        self, source: Readable, identities: Sequence[Any], on_plaintext: Any = None
    ) -> None:
        self._source = source
        self._identities = list(identities)
        self._on_plaintext = on_plaintext
        self._handoff = HandOff(_QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # the ciphertext side, called by pyrage in the thread
    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: bytes) -> int:
        if self._on_plaintext is not None:
            self._on_plaintext(data)
        self._put(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def _put(self, item: bytes | BaseException) -> None:
        if not self._handoff.put(item):
            raise _Stopped()

    def _run(self) -> None:
        try:
            decrypt(_SourceAdapter(self), self, self._identities)
            self._put(b"")
        except _Stopped:
            pass
        except BaseException as exc:
            with contextlib.suppress(_Stopped):
                self._put(exc)

    # the plaintext side
    def read(self, size: int = -1) -> memoryview:
        return self._handoff.read(size)

    def finish(self) -> None:
        """Read to the end of the plaintext (raising what decryption raised) and wait for the
        thread."""
        while self.read(1 << 20):
            pass
        self._thread.join()

    def close(self) -> None:
        """Stop the thread (it no longer reads `source`)."""
        self._handoff.stop()
        self._thread.join()


class _SourceAdapter:
    """pyrage reads with `readinto` or `read`; the stored stream gives memoryviews."""

    def __init__(self, owner: Decrypting) -> None:
        self._owner = owner

    def readinto(self, buffer: Any) -> int:
        return self._owner.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return bytes(self._owner._source.read(size))
