"""EXCLUDE's patterns mean the same to the agent as to rsync: random trees and patterns, each
copied by real rsync with the pattern as a filter rule, and listed as the archive, the log
generation and the restore list them."""

from __future__ import annotations

import io
import os
import random
import subprocess
from pathlib import Path

import pytest

from agent.core import excludes

NAMES = ("a", "b", "ab", "c.tmp", "x", "[a]", "a b")
TOKENS = ("a", "b", "*", "**", "?", "/", "[ab]", "[!a]", ".tmp", "x", "***", "\\*", "[[:alpha:]]")


def _tree(root: Path, rng: random.Random) -> None:
    for _ in range(40):
        depth = rng.randint(1, 4)
        parts = [rng.choice(NAMES) for _ in range(depth)]
        path = root.joinpath(*parts)
        try:
            if rng.random() < 0.5:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
        except (FileExistsError, NotADirectoryError):
            continue


def _pattern(rng: random.Random) -> str:
    text = "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.25:
        text = "/" + text.lstrip("/")
    if rng.random() < 0.2:
        text += "/"
    return text


def _kept_by_rsync(source: Path, target: Path, pattern: str, rules: Path) -> set[bytes]:
    rules.write_bytes(b"H " + os.fsencode(pattern) + b"\0")
    subprocess.run(
        ["rsync", "--archive", "--from0", f"--filter=. {rules}", f"{source}/", f"{target}/"],
        check=True,
        capture_output=True,
    )
    return _every(os.fsencode(target))


def _kept_by_listing(source: Path, rules: excludes.Excludes) -> set[bytes]:
    """What the archive and the log generation keep: the list for tar or rsync."""
    member = os.fsencode(source).lstrip(b"/")
    skip = rules.skipper(Path("/"), [source])
    assert skip is not None
    listed = io.BytesIO()
    excludes.listing(Path("/"), [os.fsdecode(member)], skip, listed)
    return {p[len(member) + 1 :] for p in listed.getvalue().split(b"\0")[1:-1]}


def _kept_by_excluded_paths(source: Path, rules: excludes.Excludes) -> set[bytes]:
    """What the restore's swap takes for not excluded: all but what is at or below the
    excluded entries it finds."""
    top = excludes.excluded_paths(source, rules.below(source))
    every = _every(os.fsencode(source))
    return {p for p in every if not any(p == t or p.startswith(t + b"/") for t in top)}


def _every(root: bytes) -> set[bytes]:
    found = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(directory, name), root))
    return found


@pytest.mark.parametrize("seed", range(2))
def test_patterns_match_as_rsync_matches_them(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    source = tmp_path / "source"
    source.mkdir()
    _tree(source, rng)
    checked = 0
    for round_ in range(30):
        pattern = _pattern(rng)
        absolute = f"{source}{pattern}" if pattern.startswith("/") else pattern
        try:
            rules = excludes.parse([absolute], (), [source])
        except excludes.PatternError:
            continue
        ours = _kept_by_listing(source, rules)
        assert ours == _kept_by_excluded_paths(source, rules), pattern
        theirs = _kept_by_rsync(source, tmp_path / f"copy{round_}", pattern, tmp_path / "rules")
        assert ours == theirs, pattern
        checked += 1
    assert checked > 18
