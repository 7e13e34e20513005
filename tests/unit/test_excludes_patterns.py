"""EXCLUDE's pattern syntax (rsync's exclude patterns) and its checks at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError
from agent.config.source import parse_source
from agent.core import excludes

BASE = {
    "SOURCE_ID": "excl-unit",
    "DATA_PATHS": "/data/db,/data/files",
    "LOG_PATHS": "/logs",
    "HANDOVER_DIR": "/backup",
    "SOURCE_STORE_DIR": "/store",
}


def excluded(pattern: str, rel: str, is_dir: bool = False) -> bool:
    return excludes.Matcher((excludes.parse_rule(pattern.encode()),)).excluded(rel.encode(), is_dir)


@pytest.mark.parametrize(
    ("pattern", "rel", "is_dir", "expected"),
    [
        ("*.tmp", "a/b/c.tmp", False, True),  # no slash: the last component, at any depth
        ("*.tmp", "a.tmp/c", False, False),
        ("cache/", "x/cache", True, True),  # trailing slash: directories only
        ("cache/", "x/cache", False, False),
        ("a/b", "x/a/b", False, True),  # an inner slash: the last components
        ("a/b", "x/a/b/c", False, False),
        ("/a/b", "x/a/b", False, False),  # anchored: from the root
        ("/a/b", "a/b", False, True),
        ("*/b", "a/x/b", False, True),  # `*` stops at a slash
        ("a/**", "x/a/b/c", False, True),  # `**` does not; tried after every slash
        ("**/b", "b", False, True),  # a leading `**/` matches at the root too
        ("a/**/b", "a/b", False, False),
        ("x/***", "x", True, True),  # `***`: the directory and all below it
        ("[!a]b", "/b", False, False),  # a class never matches a slash
        ("\\*.txt", "*.txt", False, True),
        ("\\*.txt", "a.txt", False, False),
    ],
)
def test_patterns_match_as_rsync_reads_them(
    pattern: str, rel: str, is_dir: bool, expected: bool
) -> None:
    assert excluded(pattern, rel, is_dir) is expected


def test_an_anchored_pattern_applies_below_its_configured_path_only() -> None:
    config = parse_source({**BASE, "EXCLUDE": "/data/db/pg_stat_tmp/\n*.swp"})
    db = config.excludes.below(Path("/data/db"))
    files = config.excludes.below(Path("/data/files"))
    assert db.excluded(b"pg_stat_tmp", True) and not files.excluded(b"pg_stat_tmp", True)
    assert db.excluded(b"x/.a.swp", False) and files.excluded(b"x/.a.swp", False)
    assert db.rsync_rules([b"marked"]) == b"H /pg_stat_tmp/\0H *.swp\0H /marked/\0"


def test_lines_are_patterns_and_comments_and_blank_lines_are_left_out() -> None:
    assert excludes.split_patterns("# caches\n*.tmp\n\n  \nname with spaces \r\n") == (
        "*.tmp",
        "name with spaces ",
    )


def test_the_cachedir_tag_is_the_default_marker_and_can_be_turned_off() -> None:
    assert parse_source(BASE).excludes.tags == ("CACHEDIR.TAG",)
    assert parse_source({**BASE, "EXCLUDE_IF_PRESENT": ""}).excludes.tags == ()
    assert not parse_source({**BASE, "EXCLUDE_IF_PRESENT": ""}).excludes.below(Path("/logs")).active


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("cache/[ab", "without its `]`"),
        ("/elsewhere/x", "must start with one of DATA_PATHS or LOG_PATHS"),
        ("/data/db/", "must start with one of DATA_PATHS or LOG_PATHS"),
        ("/data/dbx/y", "must start with one of DATA_PATHS or LOG_PATHS"),
        ("[[:nope:]]", "unknown character class"),
    ],
)
def test_a_malformed_pattern_is_a_configuration_error_naming_exclude(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_source({**BASE, "EXCLUDE": f"*.tmp\n{value}"})
    [problem] = raised.value.problems
    assert problem.startswith("EXCLUDE: ") and why in problem and value in problem


def test_a_marker_name_with_a_slash_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_source({**BASE, "EXCLUDE_IF_PRESENT": "CACHEDIR.TAG,a/b"})
    assert raised.value.problems[0].startswith("EXCLUDE_IF_PRESENT: ")
