"""The mirror: a copy of the data and log paths kept between runs in the handover, brought up
to date by passes — pre-copy passes while the application runs, repeated while what they copy
keeps shrinking, then a final pass while it is stopped.

A pass copies only what changed since the last one, at the cost of the bytes changed: large
files are compared block by block with their mirror copy and patched in place (`mirror_patch`);
everything else goes through rsync with `--whole-file` (local copies gain nothing from rsync's
delta algorithm, which reads both copies and computes rolling checksums; `--sparse` keeps holes,
as rsync truncates a file before it rewrites it whole). Modification times are
compared to the nanosecond (`--modify-window=-1`) so a same-size rewrite within one second is
not missed. Never hardlink the mirror into a generation: the mirror is updated in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.core.archive import member_name
from agent.core.excludes import Excludes, Matcher
from agent.source import mirror_patch
from agent.source.mirror_patch import Patch, Patched

logger = logging.getLogger(__name__)

RSYNC_OPTIONS = (
    "--archive",
    "--hard-links",
    "--numeric-ids",
    "--delete",
    "--inplace",
    "--whole-file",
    "--sparse",
    "--modify-window=-1",
    "--stats",
    "--no-human-readable",
    "--from0",
)
# rsync exit 24: files vanished while the file list was made; the next pass catches up.
_VANISHED = 24
_TRANSFERRED = re.compile(r"^Total transferred file size: (\d+) bytes$", re.MULTILINE)
PATCH_WORKERS = 2
MiB = 1 << 20


class MirrorError(Exception):
    pass


@dataclass
class PassReport:
    """What one pass did. `changed` is None when a path was copied for the first time."""

    seconds: float = 0.0
    rsync_bytes: int = 0
    first_copies: int = 0
    renamed: int = 0
    patched: list[Patched] = field(default_factory=list)

    @property
    def changed(self) -> int | None:
        if self.first_copies:
            return None
        return self.rsync_bytes + sum(p.changed for p in self.patched)

    def describe(self) -> str:
        """One line: what the pass copied, by which method, and why that method."""
        parts = []
        if self.first_copies:
            parts.append(f"{self.first_copies} path(s) copied for the first time (cp -a)")
        compared = [p for p in self.patched if not p.copied_whole]
        whole = [p for p in self.patched if p.copied_whole]
        if self.renamed:
            parts.append(
                f"{self.renamed} large file(s) renamed in the source (recycled) were "
                "renamed in the mirror, to be compared rather than copied"
            )
        if compared:
            parts.append(
                f"{len(compared)} large file(s) compared block by block with their "
                f"mirror copy, {_mib(sum(p.changed for p in compared))} of "
                f"{_mib(sum(p.size for p in compared))} differed and was patched in "
                "place"
            )
        if unread := sum(p.unread for p in compared):
            parts.append(
                f"of which {_mib(unread)} was written without comparing, as its "
                "mirror copy was not in memory (a copy reads once what a compare "
                "reads twice)"
            )
        if whole:
            parts.append(
                f"{len(whole)} large file(s) copied whole "
                f"({_mib(sum(p.size for p in whole))}): their last pass found more "
                f"than {mirror_patch.COPY_WHOLE_ABOVE:.0%} of them changed, so "
                "comparing would cost more than copying"
            )
        parts.append(
            f"rsync --whole-file copied {_mib(self.rsync_bytes)} in the other changed files"
        )
        changed = self.changed
        total = "" if changed is None else f"{_mib(changed)} changed: "
        return f"{total}{'; '.join(parts)} ({self.seconds:.2f} s)"


def _mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB"


def next_pass(
    changes: Sequence[int | None],
    elapsed: float,
    max_passes: int,
    max_seconds: float,
    small: int = MiB,
) -> str | None:
    """Given the bytes each pre-copy pass so far changed (None: a first copy, all of it),
    return None if another pass should run while the application runs, else why not: the
    changes are too small to be worth a pass or stopped shrinking, or a bound was reached."""
    last = changes[-1]
    if last is not None and last < small:
        return f"the last pass changed only {last} bytes"
    before = changes[-2] if len(changes) >= 2 else None
    if last is not None and before is not None and last >= before:
        return f"the changes stopped shrinking ({before} then {last} bytes)"
    if len(changes) >= max_passes:
        return f"{max_passes} passes were made (PRECOPY_MAX_PASSES)"
    if elapsed >= max_seconds:
        return f"the pre-copy took {elapsed:.0f} s (PRECOPY_MAX_SECONDS: {max_seconds:g})"
    return None


class Mirror:
    """The mirrors of one run: which of their files are large (from the last walk of the
    sources) and how much of each changed in its last pass, so that the final pass, with the
    application stopped, knows what to compare without walking for it."""

    def __init__(
        self, mirrors: Mapping[Path, Sequence[Path]], excludes: Excludes | None = None
    ) -> None:
        self.mirrors = mirrors
        self.excludes = excludes or Excludes()
        self._large: dict[Path, mirror_patch.Found] = {}
        self._tagged: dict[Path, list[bytes]] = {}
        self._fraction: dict[Path, float] = {}
        self._checked = False

    def sync(self, final: bool = False) -> PassReport:
        """Bring each mirror up to date with its source paths (each lands at
        `mirror/<member_name>`), all paths at once. A path the mirror does not hold yet is
        copied with `cp -a --reflink=auto` (faster than rsync for a first copy; it keeps the
        nanosecond mtimes). When a mirror's set of paths differs from its last one, it is
        rebuilt from scratch, so a path removed from the configuration leaves nothing behind.
        The final pass looks for large files only in the directories where the last pass found
        some, so it needs no walk of the whole tree.
        Return what the pass did. Raise MirrorError with the tools' messages on failure, after
        removing the mirrors: a pass that failed leaves them partial, so not consistent, and
        may hold the very space the copy ran out of (the next run copies them again while the
        application runs). A pass cut short by a signal keeps them; the next pass completes
        them."""
        started = time.monotonic()
        if not self._checked:
            for mirror, paths in self.mirrors.items():
                _reset_if_paths_changed(paths, mirror)
            self._checked = True
        report = PassReport()
        if not final:
            self._fraction.clear()  # what this pass finds is what the final pass goes by
        commands: list[list[str]] = []
        patches: list[Patch] = []
        exclusions: list[Path] = []
        try:
            self._plan(final, report, commands, patches, exclusions)
            failures = self._run(commands, patches, report, final)
        finally:
            for path in exclusions:
                path.unlink(missing_ok=True)
        if failures:
            partial = sorted(self.mirrors)
            for mirror in partial:
                _discard(mirror)
            self._large.clear()
            self._tagged.clear()
            self._fraction.clear()
            self._checked = False
            removed = " and ".join(map(str, partial))
            raise MirrorError(
                f"{'; '.join(failures)}; the partial mirror"
                + (f"s {removed} were" if len(partial) > 1 else f" {removed} was")
                + " removed"
            )
        report.seconds = time.monotonic() - started
        return report

    def _plan(
        self,
        final: bool,
        report: PassReport,
        commands: list[list[str]],
        patches: list[Patch],
        exclusions: list[Path],
    ) -> None:
        """The copy commands and the patches of one pass; rsync leaves the patched files to
        the patches and leaves out what EXCLUDE and EXCLUDE_IF_PRESENT exclude, deleting what
        the mirror holds of it (their filter rules are written to `exclusions`). The final
        pass, which walks no more than the directories with large files, goes by the marked
        directories the last walk found."""
        for mirror, paths in self.mirrors.items():
            for path in paths:
                target = mirror / member_name(path)
                matcher = self.excludes.below(path)
                skip = _Skip(path, matcher, self._tagged.get(path, []) if final else [])
                before = self._large.get(path, {})
                self._large[path] = mirror_patch.large_files(
                    path,
                    {rel.parent for rel in before} if final else None,
                    skip if matcher.active else None,
                )
                self._tagged[path] = skip.tagged
                exists = target.exists()
                mine: list[Patch] = []
                if exists:
                    report.renamed += self._follow_renames(
                        target, mirror_patch.renames(before, self._large[path], path)
                    )
                    mine = [
                        p
                        for rel in self._large[path]
                        if (
                            p := mirror_patch.decide(
                                path / rel, target / rel, self._fraction.get(target / rel), final
                            )
                        )
                        is not None
                    ]
                    patches.extend(mine)
                elif not matcher.rules and not skip.skipped and not (final and matcher.active):
                    # nothing to leave out (as far as the walk saw): cp is the faster copy
                    target.parent.mkdir(parents=True, exist_ok=True)
                    commands.append(
                        ["cp", "--archive", "--reflink=auto", "--", str(path), str(target)]
                    )
                    report.first_copies += 1
                    continue
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    report.first_copies += 1
                with tempfile.NamedTemporaryFile(
                    dir=mirror.parent, prefix=".filter-", delete=False
                ) as handle:
                    handle.write(
                        b"".join(
                            b"- " + _anchored(p.source.relative_to(path)) + b"\0" for p in mine
                        )
                        + matcher.rsync_rules(skip.tagged)
                    )
                exclusions.append(Path(handle.name))
                commands.append(
                    [
                        "rsync",
                        *RSYNC_OPTIONS,
                        f"--filter=. {handle.name}",
                        f"{path}/",
                        f"{target}/",
                    ]
                )

    def _follow_renames(self, target: Path, renamed: dict[Path, Path]) -> int:
        """Rename the mirror copies of files renamed in the source; return how many."""
        done = 0
        for new, old in renamed.items():
            try:
                if mirror_patch.is_large((target / old).lstat()):
                    (target / new).parent.mkdir(parents=True, exist_ok=True)
                    os.rename(target / old, target / new)
                    done += 1
            except OSError:
                continue  # rsync copies it instead
            if (fraction := self._fraction.pop(target / old, None)) is not None:
                self._fraction[target / new] = fraction
        return done

    def _run(
        self, commands: list[list[str]], patches: list[Patch], report: PassReport, final: bool
    ) -> list[str]:
        """Run the copies and the patches side by side; return what failed."""
        processes = [
            subprocess.Popen(
                c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
            )
            for c in commands
        ]
        failures: list[str] = []
        try:
            with ThreadPoolExecutor(PATCH_WORKERS) as pool:
                work = [
                    (patch, start, end)
                    for patch in patches
                    for start, end in mirror_patch.spans(patch)
                ]
                copied = list(pool.map(lambda w: _copy_span(w[0], w[1], w[2], final), work))
            for patch in patches:
                outcome = _finish(
                    patch,
                    [c for (p, _, _), c in zip(work, copied, strict=True) if p is patch],
                    final,
                )
                if isinstance(outcome, str):
                    failures.append(outcome)
                elif outcome is not None:
                    report.patched.append(outcome)
                    if not outcome.copied_whole:
                        self._fraction[patch.target] = outcome.changed / max(1, outcome.size)
            for command, process in zip(commands, processes, strict=True):
                stdout, stderr = process.communicate()
                if process.returncode == _VANISHED and command[0] == "rsync":
                    logger.warning("some files vanished during the copy of %s", command[-2])
                elif process.returncode != 0:
                    message = " ".join(stderr.strip().splitlines()[-3:])
                    failures.append(
                        f"{command[0]} of {command[-2]} failed "
                        f"(exit {process.returncode}): {message}"
                    )
                    continue
                if command[0] == "rsync":
                    found = _TRANSFERRED.search(stdout)
                    report.rsync_bytes += int(found[1]) if found else 0
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return failures


class _Skip:
    """What the walk of one source path leaves out: its excludes, and the marked directories
    it found (relative paths, for rsync's rules)."""

    def __init__(self, root: Path, matcher: Matcher, tagged: list[bytes]) -> None:
        self.root = root
        self.matcher = matcher
        self.tagged = tagged
        self.skipped = 0

    def __call__(self, rel: Path, is_dir: bool) -> bool:
        name = os.fsencode(rel)
        if self.matcher.excluded(name, is_dir):
            self.skipped += 1
            return True
        if is_dir and self.matcher.tagged(self.root / rel):
            self.tagged.append(name)
            self.skipped += 1
            return True
        return False


def _copy_span(patch: Patch, start: int, end: int, final: bool) -> tuple[int, int] | OSError:
    try:
        return mirror_patch.copy_span(patch, start, end, final)
    except OSError as exc:
        return exc


def _finish(
    patch: Patch, copied: list[tuple[int, int] | OSError], final: bool
) -> Patched | str | None:
    """Finish one patch whose spans were copied; a source that vanished meanwhile takes its
    mirror copy with it (as rsync's --delete would). Return the outcome, or the failure as a
    message."""
    try:
        written = unread = 0
        for outcome in copied:
            if isinstance(outcome, OSError):
                raise outcome
            written, unread = written + outcome[0], unread + outcome[1]
        return mirror_patch.finish(patch, written, unread, final)
    except FileNotFoundError:
        if patch.source.exists():
            return f"patching {patch.target} failed: it vanished"
        patch.target.unlink(missing_ok=True)
        return None
    except OSError as exc:
        return f"patching {patch.target} from {patch.source} failed: {exc}"


def _anchored(relative: Path) -> bytes:
    """An rsync filter pattern matching exactly this path below the transfer's root. rsync
    reads a backslash as an escape only in a pattern with a wildcard character."""
    name = os.fsencode(relative)
    if any(c in name for c in b"*?["):
        name = re.sub(rb"([*?\[\\])", rb"\\\1", name)
    return b"/" + name


def _discard(mirror: Path) -> None:
    """Remove `mirror` and its record of paths, so the next pass builds it from scratch."""
    _paths_record(mirror).unlink(missing_ok=True)
    shutil.rmtree(mirror, ignore_errors=True)
    logger.info("removed the partial mirror %s", mirror)


def _paths_record(mirror: Path) -> Path:
    return mirror.parent / f"{mirror.name}.paths.json"


def _reset_if_paths_changed(paths: Sequence[Path], mirror: Path) -> None:
    record = _paths_record(mirror)
    wanted = [str(p) for p in paths]
    try:
        previous = json.loads(record.read_text())
    except (FileNotFoundError, ValueError):
        previous = None
    if previous != wanted:
        if mirror.exists():
            logger.info("the configured paths changed; rebuilding the mirror %s", mirror)
            shutil.rmtree(mirror)
        mirror.mkdir(parents=True)
        record.write_text(json.dumps(wanted))
