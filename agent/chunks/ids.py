"""Chunk ids, pack ids and the chunk-id key.

A chunk id is 32 bytes: `sha256(chunk)` without encryption, `HMAC-SHA256(key, chunk)` with
it, so someone who can read the store cannot test whether it holds a known file. A pack id
is the sha256 of the pack's bytes (hex), so verifying a pack needs no key. The key is 32
random bytes made once per source (and again when the recipients change), kept in the
role's `.state/`; every encrypted generation carries it, age-encrypted to its recipients
(`CHUNK-ID-KEY.age` beside its index), so whoever holds an identity can check the chunk ids
of any kept generation, whatever key later generations were made with.

Everything here is pure except `load_or_create_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.core import encryption

logger = logging.getLogger(__name__)

ID_SIZE = 32
KEY_SIZE = 32
KEY_FILE = "chunk-id.key"
PACKS_DIR = "packs"
PACK_SUFFIX = ".pack"
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")


class InvalidId(ValueError):
    """A chunk or pack id from outside (an index, a trailer, a listing) is malformed."""


def chunk_id(data: bytes | memoryview, key: bytes | None) -> bytes:
    """Return the id of the plaintext chunk `data`: keyed when `key` is given."""
    if key is None:
        return hashlib.sha256(data).digest()
    return hmac.digest(key, data, "sha256")


def check_hex(text: object) -> str:
    """Return `text` if it is a 64-digit lower-case hex id. Raise InvalidId otherwise."""
    if not isinstance(text, str) or not _HEX_ID.match(text):
        raise InvalidId(f"not a chunk or pack id: {str(text)[:80]!r}")
    return text


def pack_key(pack_id: str) -> str:
    """Return the name of pack `pack_id` below a store's root: `packs/<2 hex>/<id>.pack`."""
    check_hex(pack_id)
    return f"{PACKS_DIR}/{pack_id[:2]}/{pack_id}{PACK_SUFFIX}"


def parse_pack_key(name: str) -> str | None:
    """Given a name below `packs/` of a store (`<2 hex>/<id>.pack`, or with the `packs/`
    prefix), return the pack id, or None if the name is not a pack's (a temporary file,
    something foreign)."""
    parts = name.split("/")
    if parts[0] == PACKS_DIR:
        parts = parts[1:]
    if len(parts) != 2 or not parts[1].endswith(PACK_SUFFIX):
        return None
    pack_id = parts[1][: -len(PACK_SUFFIX)]
    if not _HEX_ID.match(pack_id) or parts[0] != pack_id[:2]:
        return None
    return pack_id


def new_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def load_or_create_key(state_dir: Path) -> bytes:
    """Return the chunk-id key kept in `state_dir`, making it (durably, mode 0600) the first
    time. Raise ValueError if the file there is not a key (the message says what to do)."""
    path = state_dir / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        state_dir.mkdir(parents=True, exist_ok=True)
        key = new_key()
        tmp = path.with_name(f".{KEY_FILE}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        logger.info("made a new chunk-id key in %s", path)
        return key
    if len(key) != KEY_SIZE:
        raise ValueError(
            f"{path} is not a chunk-id key ({len(key)} bytes, not {KEY_SIZE}): "
            "remove it and a new one is made (the next run stores everything "
            "once more)"
        )
    return key


def encrypt_key(key: bytes, recipients: Sequence[Any]) -> bytes:
    """Return the key age-encrypted to `recipients`: the content of a generation's
    CHUNK-ID-KEY.age."""
    out = io.BytesIO()
    encryption.encrypt(io.BytesIO(key), out, recipients)
    return out.getvalue()


def decrypt_key(data: bytes, identities: Sequence[Any]) -> bytes:
    """Return the key from the content of a CHUNK-ID-KEY.age. Raise DecryptionFailed
    (WrongKey) if the identities cannot open it, ValueError if it holds no key."""
    out = io.BytesIO()
    encryption.decrypt(io.BytesIO(data), out, identities)
    key = out.getvalue()
    if len(key) != KEY_SIZE:
        raise ValueError("it does not hold a chunk-id key")
    return key
