"""`files`: the entries of a data generation of either format, as `restic ls` lists a
snapshot: one line each (or one JSON object a line with `--json`), paths absolute as they
were backed up. A chunked generation is listed from its index (checked against the manifest
first); an archive generation from its tar headers, read as the archive streams by (its
sha256 checked at the end).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from agent.chunks import index
from agent.chunks.export import ArchiveStream
from agent.chunks.index import Entry
from agent.chunks.reader import Objects, ReadFailed, open_generation
from agent.core.manifest import Manifest

logger = logging.getLogger(__name__)

_KINDS = {"dir": "d", "file": "-", "symlink": "l", "hardlink": "h", "fifo": "p"}


def _selected(path: bytes, prefix: bytes) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + b"/")


def _pax_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * 1_000_000_000
    whole, _, fraction = text.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * 1_000_000_000 + int((fraction + "0" * 9)[:9]))


def _from_member(member: tarfile.TarInfo) -> Entry | None:
    """The index entry a tar member would have (paths relative to `/`)."""
    kinds = {
        tarfile.DIRTYPE: "dir",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
        tarfile.FIFOTYPE: "fifo",
    }
    kind = kinds.get(member.type, "file" if member.isreg() else "")
    if not kind:
        return None
    link = os.fsencode(member.linkname) if member.linkname else None
    return Entry(
        os.fsencode(member.name.rstrip("/")),
        kind,
        member.mode,
        member.uid,
        member.gid,
        _pax_ns(member),
        size=member.size if kind == "file" else 0,
        target=link if kind == "symlink" else None,
        link=link if kind == "hardlink" else None,
    )


def items(
    store: Objects, m: Manifest, identities: Sequence[Any], prefix: bytes = b""
) -> Iterator[Entry]:
    """Yield the entries of data generation `m` at or below `prefix` (an absolute path as
    bytes; empty: all), paths relative to `/` as in the index. Raise NeedsKey / ReadFailed as
    reading the generation does."""
    member = prefix.rstrip(b"/").lstrip(b"/")
    if m.chunked:
        with open_generation(store, m, identities) as opened:
            for entry in opened.entries():
                if _selected(entry.path, member):
                    yield entry
        return
    stream = ArchiveStream(store, m, identities)
    try:
        try:
            with tarfile.open(
                fileobj=stream,
                mode="r|",
                encoding="utf-8",  # type: ignore[call-overload]
                errors="surrogateescape",
            ) as archive:
                for info in archive:
                    archive.members.clear()  # memory stays flat in the number of members
                    item = _from_member(info)
                    if item is not None and _selected(item.path, member):
                        yield item
        except tarfile.TarError as exc:
            raise ReadFailed(f"the archive is damaged: {exc}") from None
        stream.check()
    finally:
        stream.close()


def _text(value: bytes) -> str:
    """A name for a terminal: control characters and bytes that are not UTF-8 escaped."""
    decoded = value.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in decoded)


def as_line(item: Entry) -> str:
    """`drwxr-xr-x 999/999        4096 2026-11-28 02:00:00 /srv/app/db` (ls -l like)."""
    kind = _KINDS[item.type]
    mode = stat.filemode(item.mode)[1:]
    when = datetime.fromtimestamp(item.mtime_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")
    size = item.size if item.type == "file" else 0
    line = f"{kind}{mode} {item.uid}/{item.gid} {size:>12} {when} {_text(b'/' + item.path)}"
    if item.target is not None:
        line += f" -> {_text(item.target)}"
    if item.link is not None:
        line += f" link to {_text(b'/' + item.link)}"
    return line


def as_json(item: Entry) -> str:
    """One JSON object: path (absolute; or path_b64 when the name is not UTF-8), type, mode,
    uid, gid, mtime_ns; size and sha256 (chunked generations) for files; target / link."""
    body: dict[str, Any] = {}
    index._put_bytes(body, "path", b"/" + item.path)
    body.update(type=item.type, mode=item.mode, uid=item.uid, gid=item.gid, mtime_ns=item.mtime_ns)
    if item.type == "file":
        body["size"] = item.size
        if item.sha256:
            body["sha256"] = item.sha256
    if item.target is not None:
        index._put_bytes(body, "target", item.target)
    if item.link is not None:
        index._put_bytes(body, "link", b"/" + item.link)
    return json.dumps(body, separators=(",", ":"))
