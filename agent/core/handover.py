"""The transport handover point: `<handover>/{data,logs}/<generation>/`.

Work in progress lives in hidden siblings (`.staging`, `.mirror`, `.state`) and a generation
is renamed into place only when its manifest is written, so everything visible in `data/` or
`logs/` with a valid manifest is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.core import generation, manifest
from agent.core.manifest import Manifest, fsync_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Handover:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / ".state"

    @property
    def lock_path(self) -> Path:
        return self.state / "agent.lock"

    @property
    def ledger_path(self) -> Path:
        """When each generation was last verified (see core.ledger.Ledger)."""
        return self.state / "verified.json"

    @property
    def quiesce_record(self) -> Path:
        return self.state / "quiesced.json"

    def mirror(self, kind: str) -> Path:
        return self.root / ".mirror" / kind

    def staging(self, kind: str) -> Path:
        return self.root / ".staging" / kind

    def generation_dir(self, kind: str, gen: str) -> Path:
        generation.parse(gen)
        return self.root / kind / gen

    def complete(self, kind: str) -> list[Manifest]:
        """Return the manifests of the complete generations of `kind`, oldest first. Entries
        with a malformed name or without a valid manifest are skipped (and logged)."""
        found = []
        directory = self.root / kind
        if not directory.is_dir():
            return []
        for entry in sorted(directory.iterdir()):
            if not generation.is_valid(entry.name):
                logger.warning("ignoring %s: not a generation", entry)
                continue
            try:
                found.append(manifest.read(entry))
            except (FileNotFoundError, manifest.InvalidManifest) as exc:
                logger.warning("ignoring %s: incomplete (%s)", entry, exc)
        return found

    def all_ids(self) -> list[str]:
        return [
            entry.name
            for kind in generation.KINDS
            if (self.root / kind).is_dir()
            for entry in (self.root / kind).iterdir()
        ]

    def fresh_staging(self, kind: str) -> Path:
        """Return a new, empty staging directory for `kind` (after `discard_staging`)."""
        path = self.staging(kind)
        path.mkdir(parents=True)
        return path

    def discard_staging(self) -> None:
        shutil.rmtree(self.root / ".staging", ignore_errors=True)

    def publish(self, kind: str, gen: str) -> Path:
        """Rename the staged generation of `kind` (its manifest already written) into place."""
        staged = self.staging(kind)
        manifest.read(staged)
        target = self.generation_dir(kind, gen)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._share_with_gateway(staged, target.parent)
        if kind == "data" and (self.root / "packs").is_dir():
            self._share_with_gateway(self.root / "packs", self.root)  # a chunked generation's
        staged.rename(target)
        fsync_dir(target.parent)
        return target

    def _share_with_gateway(self, tree: Path, kind_dir: Path) -> None:
        """Pull sites keep the handover in a setgid directory whose group holds the SSH gateway
        users. Give that group read access to every file of the generation `tree` and read,
        write and search access to every directory of it and to `kind_dir` (`data/`, `logs/`),
        so the gateway can send it and `ack` can move or remove it — also the logs, which keep
        the owners and modes of the application's files (e.g. 0600, or 0750 directories of
        another group), whatever the agent's umask; the same for the packs of a chunked
        generation, which the sink fetches and `ack` moves to the source store. Without the
        setgid bit (push sites) nothing changes."""
        handover = self.root.stat()
        if not handover.st_mode & stat.S_ISGID:
            return
        _add_group_access(str(kind_dir), handover.st_gid, _GROUP_DIRECTORY)
        for directory, _dirs, files in os.walk(tree):
            _add_group_access(directory, handover.st_gid, _GROUP_DIRECTORY)
            for name in files:
                path = os.path.join(directory, name)
                if not os.path.islink(path):
                    _add_group_access(path, handover.st_gid, stat.S_IRGRP)


_GROUP_DIRECTORY = stat.S_IRGRP | stat.S_IWGRP | stat.S_IXGRP | stat.S_ISGID


def _add_group_access(path: str, gid: int, bits: int) -> None:
    os.chown(path, -1, gid)
    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | bits)
