"""Which members of an archive a restore unpacks: the pure policy (names, kinds and link targets,
in archive order) that safe extraction applies to every tar member before GNU tar sees it."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field


class UnsafeMember(Exception):
    """The archive holds a member that must not be unpacked."""


@dataclass
class MemberPolicy:
    """Decides, member by member, whether an archive may be unpacked. Pure: it sees only the
    members' names, types and link targets, in archive order.

    `roots` are the generation's data paths as member names (`srv/app`); every member must be
    one of them or lie below one. Symbolic links may point anywhere; no member is written
    through one."""

    roots: Sequence[str]
    _seen_files: set[str] = field(default_factory=set)
    _symlinks: set[str] = field(default_factory=set)

    def check(self, name: str, kind: str, link: str = "") -> None:
        """Check one member: `kind` is one of file, dir, symlink, hardlink, fifo, device.
        Raise UnsafeMember naming the member and the reason."""
        if name.startswith("/"):
            raise UnsafeMember(f"{name!r}: absolute path")
        parts = name.rstrip("/").split("/")
        if ".." in parts or "." in parts or "" in parts or "\0" in name:
            # `.` too: `srv/app/./link/x` must not slip past the symbolic link check below
            raise UnsafeMember(f"{name!r}: a path with `..`, `.` or empty components")
        clean = "/".join(parts)
        if not any(clean == root or clean.startswith(root + "/") for root in self.roots):
            raise UnsafeMember(
                f"{name!r}: outside the generation's data paths "
                f"({', '.join('/' + r for r in self.roots)})"
            )
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in self._symlinks:
                raise UnsafeMember(
                    f"{name!r}: would be written through the symbolic link "
                    f"{'/'.join(parts[:depth])!r}"
                )
        if kind == "device":
            raise UnsafeMember(f"{name!r}: a device node")
        if kind == "hardlink" and link.rstrip("/") in self._symlinks:
            # GNU tar archives a hard-linked symbolic link (e.g. from `cp -al`) as a link and
            # hard links to it: one more name of a checked link, never written through
            self._symlinks.add(clean)
            return
        if kind == "hardlink" and link.rstrip("/") not in self._seen_files:
            raise UnsafeMember(
                f"{name!r}: a hard link to {link!r}, which is not an earlier file of the archive"
            )
        if kind == "symlink":
            if not link or "\0" in link:
                raise UnsafeMember(f"{name!r}: an empty symbolic link")
            self._symlinks.add(clean)
        elif kind in ("file", "hardlink"):
            self._seen_files.add(clean)


def check_one_name(member: tarfile.TarInfo) -> None:
    """Refuse a member whose PAX records give it two names: GNU tar extracts it by its
    `GNU.sparse.name`, Python's tarfile reads the last record, so the policy would check a name
    tar does not write."""
    names = {
        member.pax_headers[key].rstrip("/")
        for key in ("path", "GNU.sparse.name")
        if key in member.pax_headers
    }
    if len(names | {member.name.rstrip("/")}) > 1:
        raise UnsafeMember(
            f"{member.name!r}: the archive gives it two names "
            f"({', '.join(sorted(map(repr, names)))})"
        )


def member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.isdir():
        return "dir"
    if member.isfifo():
        return "fifo"
    if member.ischr() or member.isblk():
        return "device"
    if member.isreg():
        return "file"
    raise UnsafeMember(f"{member.name!r}: unknown member type {member.type!r}")
