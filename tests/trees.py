"""A hashing walk over a directory tree that compares what a backup must keep: content, mode,
numeric owner, nanosecond mtime, symlink targets and hardlink groups."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Return {relative path (bytes): description} for everything below `root`."""
    result: dict[bytes, tuple] = {}
    inodes: dict[tuple[int, int], bytes] = {}
    base = os.fsencode(root)
    for directory, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            common = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                result[rel] = (*common, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
                result[rel] = (*common, st.st_mtime_ns)
            else:
                first = inodes.setdefault((st.st_dev, st.st_ino), rel) if st.st_nlink > 1 else rel
                with open(path, "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
                result[rel] = (*common, st.st_mtime_ns, st.st_size, digest, first)
    return result


def extract(archive: Path, target: Path) -> None:
    """Unpack a data.tar.zst with the standard tools, as a user would by hand."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        f"zstd -dc '{archive}' | tar -x --numeric-owner -p -C '{target}'", shell=True, check=True
    )
