"""Test helpers for chunked generations: the tricky tree, and a decoder written from
docs/chunks-format.md alone (no agent code but the format's own parsing), so a round trip
through it shows the format holds everything a restore needs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path

import zstandard

from tests.integration.test_restore import make_realistic_tree

MiB = 1 << 20


def make_tricky_tree(root: Path) -> None:
    """The restore tests' realistic tree (modes incl. setuid, numeric owners, ns mtimes,
    symlinks, hardlinks, empty dirs, sparse files, long names, a newline and a name that is
    not UTF-8), and what else an index must keep: a fifo, an empty file, a 250-byte name, a
    dangling symlink whose target is not UTF-8."""
    make_realistic_tree(root)
    os.mkfifo(root / "a-fifo")
    (root / "uploads" / "empty-file").write_bytes(b"")
    (root / ("g" * 250)).write_bytes(b"long name")
    os.symlink(os.fsencode(root) + b"/\xff-dangling", os.fsencode(root / "odd-link"))


def read_trailer(pack: bytes) -> list[tuple[str, int, int, int]]:
    """(chunk id hex, offset, stored length, raw length) of every blob of a pack."""
    count, length, magic = struct.unpack("<II8s", pack[-16:])
    assert magic == b"BAPACK01" and length == 40 * count
    offset, blobs = 0, []
    for i in range(count):
        cid, stored, raw = struct.unpack_from("<32sII", pack, len(pack) - 16 - length + 40 * i)
        blobs.append((cid.hex(), offset, stored, raw))
        offset += stored
    return blobs


def _bytes(entry: dict[str, object], name: str) -> bytes:
    if name in entry:
        return str(entry[name]).encode()
    return base64.b64decode(str(entry[name + "_b64"]))


def restore_by_hand(store: Path, gen: str, target: Path) -> None:
    """Restore the unencrypted chunked generation `gen` of the local store `store` into
    `target` the way docs/chunks-format.md says, checking every sha256 on the way."""
    gen_dir = store / "data" / gen
    m = json.loads((gen_dir / "MANIFEST.json").read_text())
    [index_file] = m["files"]
    data = (gen_dir / index_file["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == index_file["sha256"]
    where: dict[str, tuple[bytes, int, int, int]] = {}
    for p in m["packs"]:
        body = (store / "packs" / p["id"][:2] / f"{p['id']}.pack").read_bytes()
        assert hashlib.sha256(body).hexdigest() == p["id"] and len(body) == p["size"]
        for cid, offset, stored, raw in read_trailer(body):
            where[cid] = (body, offset, stored, raw)
    lines = zstandard.ZstdDecompressor().stream_reader(data).read().splitlines()
    dirs = []
    for line in lines:
        e = json.loads(line)
        path = os.fsencode(target) + b"/" + _bytes(e, "path")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if e["type"] == "dir":
            os.makedirs(path, exist_ok=True)
            dirs.append((path, e))
            continue
        if e["type"] == "symlink":
            os.symlink(_bytes(e, "target"), path)
        elif e["type"] == "fifo":
            os.mkfifo(path)
        elif e["type"] == "hardlink":
            os.link(os.fsencode(target) + b"/" + _bytes(e, "link"), path)
            continue
        else:
            hashlib.sha256()
            with open(path, "wb") as handle:
                for cid, offset, length in e["chunks"]:
                    body, start, stored, raw = where[cid]
                    chunk = zstandard.ZstdDecompressor().decompress(body[start : start + stored])
                    assert len(chunk) == raw == length
                    handle.seek(offset)
                    handle.write(chunk)
                handle.truncate(e["size"])
            with open(path, "rb") as handle:
                assert hashlib.file_digest(handle, "sha256").hexdigest() == e["sha256"]
        os.chown(path, e["uid"], e["gid"], follow_symlinks=False)
        if e["type"] != "symlink":
            os.chmod(path, e["mode"])
        os.utime(path, ns=(e["mtime_ns"], e["mtime_ns"]), follow_symlinks=False)
    for path, e in reversed(dirs):
        os.chown(path, e["uid"], e["gid"])
        os.chmod(path, e["mode"])
        os.utime(path, ns=(e["mtime_ns"], e["mtime_ns"]))
