"""Blobs: one chunk as stored, `zstd(chunk)`, then age-encrypted to the recipients when
encryption is on. Every blob decodes on its own (a zstd frame with its content size; an age
file), so packs can be rewritten without any key.

Pure: bytes in, bytes out. Safe to call from many threads (zstd and age release the GIL for
the heavy part; each thread gets its own compressor).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import pyrage
import zstandard

from agent.core import encryption

logger = logging.getLogger(__name__)

_local = threading.local()


class BlobError(ValueError):
    """A blob does not decode: damaged, or not what its trailer entry says."""


def _compressor(level: int) -> zstandard.ZstdCompressor:
    compressors: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("c", {})
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True
        )
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = _local.__dict__.get("d")
    if decompressor is None:
        decompressor = _local.d = zstandard.ZstdDecompressor()
    return decompressor


def encode(chunk: bytes | memoryview, level: int, recipients: Sequence[Any] = ()) -> bytes:
    """Return the blob of `chunk`: zstd at `level`, then age to `recipients` if any."""
    compressed = _compressor(level).compress(chunk)
    if recipients:
        return bytes(pyrage.encrypt(compressed, list(recipients)))
    return compressed


def decode(blob: bytes | memoryview, raw_length: int, identities: Sequence[Any] = ()) -> bytes:
    """Return the chunk in `blob`, which holds `raw_length` bytes of plaintext; decrypt with
    `identities` when given (an encrypted generation). Raise WrongKey / DecryptionFailed if
    it does not decrypt, BlobError if it does not decompress to `raw_length` bytes."""
    data = bytes(blob)
    if identities:
        try:
            data = bytes(pyrage.decrypt(data, list(identities)))
        except pyrage.DecryptError as exc:
            raise encryption._decrypt_error(exc) from None
    try:
        chunk = _decompressor().decompress(data, max_output_size=raw_length)
    except zstandard.ZstdError as exc:
        raise BlobError(f"a blob does not decompress ({exc})") from None
    if len(chunk) != raw_length:
        raise BlobError(f"a blob holds {len(chunk)} bytes, its pack says {raw_length}")
    return chunk
