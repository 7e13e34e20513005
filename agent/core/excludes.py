"""Excludes: which paths below the data and log paths are left out of the mirror, every
generation and the handover, and left alone by a restore (docs/excludes.md).

`EXCLUDE` holds exclude patterns in rsync's filter-rule syntax, because the mirror passes are
rsync runs: rsync applies them itself there, and this module matches them the same way
everywhere rsync does not run (the large files patched in place, the archive, the chunked
index, the log generation, the restore). `EXCLUDE_IF_PRESENT` names marker files: a directory
holding one is left out whole; a `CACHEDIR.TAG` counts only with the signature line of the
Cache Directory Tagging Specification, as tar, restic and borg check it.

The matching follows rsync's `rule_matches` (exclude.c): a pattern without a slash matches
the last component; one with an inner slash matches the last as many components; one with a
`**` is tried after every slash; one starting with `/` (or `**`) matches from the root; a
trailing `/` matches directories only; `*` and `?` stop at slashes, `**` does not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
_WILD = re.compile(rb"[*?\[]")

Skip = Callable[[bytes, bool], bool]  # (path relative to a configured path, is a directory)


class PatternError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    """One exclude pattern as rsync reads it, for the paths below one configured path."""

    pattern: bytes  # as rsync gets it (an anchored one relative to the configured path)
    directory_only: bool
    regex: re.Pattern[bytes]
    mode: str  # name: the last component; tail: the last `components`; any: after any slash;
    # start: from the root
    components: int
    leading_slash: bool = False  # a pattern starting with `**` is matched against "/" + path

    def matches(self, rel: bytes, is_dir: bool) -> bool:
        if self.directory_only and not is_dir:
            return False
        if self.mode == "name":
            return self.regex.fullmatch(rel.rpartition(b"/")[2]) is not None
        if self.mode == "start":
            return self.regex.fullmatch(b"/" + rel if self.leading_slash else rel) is not None
        if self.mode == "tail":
            parts = rel.split(b"/")
            return self.regex.fullmatch(b"/".join(parts[-self.components :])) is not None
        starts = [0] + [i + 1 for i, c in enumerate(rel) if c == 0x2F]
        return any(self.regex.fullmatch(rel, s) is not None for s in starts)


def parse_rule(text: bytes) -> Rule:
    """Given one pattern (an anchored one already relative to its configured path), return
    its rule. Raise PatternError if rsync could not read it as meant (empty, an unclosed
    `[`)."""
    if not text or text == b"/":
        raise PatternError("an empty pattern")
    pattern = text
    directory_only = len(pattern) > 1 and pattern.endswith(b"/")
    if directory_only:
        pattern = pattern[:-1]
    wild3 = len(pattern) > 4 and pattern.endswith(b"/***")
    body = pattern[:-4] if wild3 else pattern
    anchored = body.startswith(b"/")
    slashes = pattern.count(b"/")
    wild2 = b"**" in pattern
    if not slashes and not wild2:
        mode = "name"
    elif anchored or pattern.startswith(b"**"):
        mode = "start"
    elif slashes and not wild2:
        mode = "tail"
    else:
        mode = "any"
    if anchored:
        body = body[1:]
    source = _translate(body) if _WILD.search(pattern) else re.escape(body)
    if wild3:
        source += b"(?:/.*)?"
        directory_only = False
    return Rule(
        text,
        directory_only,
        re.compile(source, re.DOTALL),
        mode,
        slashes + 1,
        pattern.startswith(b"**"),
    )


def _translate(body: bytes) -> bytes:
    """rsync's wildmatch as a regular expression."""
    out = []
    i, n = 0, len(body)
    while i < n:
        c = body[i : i + 1]
        if c == b"\\" and i + 1 < n:
            out.append(re.escape(body[i + 1 : i + 2]))
            i += 2
        elif c == b"*":
            j = i
            while j < n and body[j : j + 1] == b"*":
                j += 1
            out.append(b".*" if j - i > 1 else b"[^/]*")
            i = j
        elif c == b"?":
            out.append(b"[^/]")
            i += 1
        elif c == b"[":
            i, klass = _class(body, i)
            out.append(klass)
        else:
            out.append(re.escape(c))
            i += 1
    return b"".join(out)


_CLASSES = {
    b"alnum": rb"a-zA-Z0-9",
    b"alpha": rb"a-zA-Z",
    b"blank": rb" \t",
    b"digit": rb"0-9",
    b"lower": rb"a-z",
    b"upper": rb"A-Z",
    b"space": rb" \t\n\r\f\v",
    b"punct": re.escape(rb"""!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~"""),
    b"xdigit": rb"0-9a-fA-F",
}


def _class(body: bytes, start: int) -> tuple[int, bytes]:
    """The character class starting at `body[start]` ('['): the index after it, its regex."""
    i = start + 1
    negate = body[i : i + 1] in (b"!", b"^")
    if negate:
        i += 1
    items: list[bytes] = []
    first = True
    while True:
        if i >= len(body):
            raise PatternError("a `[` without its `]`")
        c = body[i : i + 1]
        if c == b"]" and not first:
            i += 1
            break
        first = False
        if c == b"[" and body[i + 1 : i + 2] == b":":
            end = body.find(b":]", i + 2)
            name = body[i + 2 : end] if end > 0 else b""
            if name not in _CLASSES:
                raise PatternError(f"an unknown character class [:{name.decode()}:]")
            items.append(_CLASSES[name])
            i = end + 2
            continue
        if c == b"\\" and i + 1 < len(body):
            i += 1
            c = body[i : i + 1]
        if body[i + 1 : i + 2] == b"-" and i + 2 < len(body) and body[i + 2 : i + 3] != b"]":
            items.append(re.escape(c) + b"-" + re.escape(body[i + 2 : i + 3]))
            i += 3
            continue
        items.append(re.escape(c))
        i += 1
    # as in rsync's wildmatch, a class never matches a slash
    return i, b"(?!/)[" + (b"^" if negate else b"") + b"".join(items) + b"]"


def _escaped(name: bytes) -> bytes:
    """A literal path as a pattern; rsync reads a backslash as an escape only in a pattern
    with a wildcard character."""
    if _WILD.search(name):
        return re.sub(rb"([*?\[\\])", rb"\\\1", name)
    return name


def cachedir_tagged(tag: Path) -> bool:
    """Whether `tag` begins with the signature of the Cache Directory Tagging Specification."""
    try:
        with open(tag, "rb") as handle:
            return handle.read(len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE
    except OSError:
        return False


@dataclass(frozen=True)
class Matcher:
    """The excludes that apply below one configured path."""

    rules: tuple[Rule, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.rules or self.tags)

    def excluded(self, rel: bytes, is_dir: bool) -> bool:
        """Whether the entry `rel` (relative to the configured path; its parents are not
        excluded) matches a pattern."""
        return any(rule.matches(rel, is_dir) for rule in self.rules)

    def tagged(self, directory: bytes | Path) -> bool:
        """Whether `directory` holds one of the marker files (a `CACHEDIR.TAG` with its
        signature)."""
        base = os.fsencode(directory)
        for tag in self.tags:
            path = base + b"/" + os.fsencode(tag)
            if tag == CACHEDIR_TAG:
                if cachedir_tagged(Path(os.fsdecode(path))):
                    return True
            elif os.path.lexists(path):
                return True
        return False

    def skip(self, rel: bytes, is_dir: bool, where: bytes | Path) -> bool:
        """Whether the entry `rel`, found at `where`, is left out: it matches a pattern, or it
        is a directory holding a marker."""
        if self.rules and self.excluded(rel, is_dir):
            return True
        return is_dir and bool(self.tags) and self.tagged(where)

    def rsync_rules(self, tagged: Sequence[bytes] = ()) -> bytes:
        """Filter rules for an rsync of the configured path (its root the transfer's root):
        every pattern and each `tagged` directory (relative paths) as a sender-side exclude
        (`H`), so `--delete` removes what the receiver already holds of them. NUL-terminated
        (`--from0`)."""
        lines = [b"H " + rule.pattern for rule in self.rules]
        lines += [b"H /" + _escaped(rel) + b"/" for rel in tagged]
        return b"".join(line + b"\0" for line in lines)


@dataclass(frozen=True)
class Excludes:
    """EXCLUDE and EXCLUDE_IF_PRESENT: the patterns as written, the marker file names."""

    patterns: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    _rules: tuple[tuple[bool, bytes, Rule], ...] = field(default=(), compare=False, repr=False)

    def below(self, path: Path) -> Matcher:
        """The matcher for the entries below the configured path `path`: every unanchored
        pattern, and the anchored ones that start with `path` (made relative to it)."""
        prefix = os.fsencode(path).rstrip(b"/") + b"/"
        rules = []
        for anchored, text, rule in self._rules:
            if not anchored:
                rules.append(rule)
            elif text.startswith(prefix) and len(text) > len(prefix):
                rules.append(parse_rule(text[len(prefix) - 1 :]))
        return Matcher(tuple(rules), self.tags)

    def skipper(self, root: Path, paths: Sequence[Path]) -> Skip | None:
        """For a walk of `root`, which holds each of the configured `paths` at its member
        name (the mirror, or `/` itself): whether an entry (its path relative to `root`, is a
        directory) is left out. None when nothing can be."""
        active = [
            (os.fsencode(str(p).lstrip("/")) + b"/", m)
            for p in paths
            if (m := self.below(p)).active
        ]
        if not active:
            return None
        base = os.fsencode(root)

        rules = any(m.rules for _, m in active)

        def skip(path: bytes, is_dir: bool) -> bool:
            if not is_dir and not rules:
                return False  # only a directory can hold a marker
            for prefix, matcher in active:
                if path.startswith(prefix):
                    return matcher.skip(path[len(prefix) :], is_dir, base + b"/" + path)
            return False

        return skip


def parse(patterns: Sequence[str], tags: Sequence[str], roots: Sequence[Path]) -> Excludes:
    """Given the patterns (one per line of EXCLUDE), the marker names and the configured paths,
    return the excludes. Raise PatternError naming the first pattern that is malformed: one
    rsync would read otherwise than meant, or an anchored one below none of `roots`."""
    rules = []
    for text in patterns:
        raw = os.fsencode(text)
        if b"\0" in raw:
            raise PatternError(f"{text!r}: a pattern cannot hold a NUL character")
        try:
            rule = parse_rule(raw)
        except PatternError as exc:
            raise PatternError(f"{text!r}: {exc}") from None
        anchored = raw.startswith(b"/")
        if anchored:
            under = [r for r in roots if raw.startswith(os.fsencode(r).rstrip(b"/") + b"/")]
            rest = [raw[len(os.fsencode(r).rstrip(b"/")) :] for r in under]
            if not under or any(r.strip(b"/") in (b"", b"***", b"**") for r in rest):
                raise PatternError(
                    f"{text!r}: a pattern starting with `/` is an absolute path and must "
                    "start with one of DATA_PATHS or LOG_PATHS and go below it"
                )
        rules.append((anchored, raw, rule))
    for tag in tags:
        if not tag or "/" in tag or tag in (".", ".."):
            raise PatternError(f"{tag!r} is not a file name")
    return Excludes(tuple(patterns), tuple(tags), tuple(rules))


def split_patterns(value: str) -> tuple[str, ...]:
    """EXCLUDE's lines: one pattern each; blank lines and lines starting with `#` are left
    out, as in an rsync filter file; trailing carriage returns and spaces are kept."""
    return tuple(
        line.removesuffix("\r")
        for line in value.split("\n")
        if line.strip() and not line.startswith("#")
    )


def listing(root: Path, members: Sequence[str], skip: Skip, out: IO[bytes]) -> int:
    """Write to `out` every entry at and below the `members` (paths relative to `root`) that
    `skip` leaves in, NUL-terminated, parents before children (a list for tar or rsync's
    `--files-from`). Return how many entries were left out (with all below them). Raise
    OSError if the tree cannot be read."""
    base = os.fsencode(root)
    skipped = 0
    for member in members:
        name = os.fsencode(member)
        out.write(name + b"\0")
        if not os.path.isdir(base + b"/" + name) or os.path.islink(base + b"/" + name):
            continue
        stack = [name]
        while stack:
            current = stack.pop()
            with os.scandir(base + b"/" + current) as entries:
                found = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
            below = []
            for entry, is_dir in found:
                path = current + b"/" + entry
                if skip(path, is_dir):
                    skipped += 1
                    continue
                out.write(path + b"\0")
                if is_dir:
                    below.append(path)
            stack.extend(reversed(below))
    return skipped


def excluded_paths(root: Path, matcher: Matcher) -> list[bytes]:
    """The top-most excluded entries below `root` (a configured path, or its copy): relative
    paths, in no particular order. Fast enough for the restore's swap, which runs it with the
    application stopped: a marker is looked up in each directory's listing, a pattern only
    where there is one. Raise OSError if `root` cannot be read."""
    if not matcher.active:
        return []
    base = os.fsencode(root)
    tags = {os.fsencode(t) for t in matcher.tags}
    found = []
    stack = [b""]
    while stack:
        current = stack.pop()
        directory = base + b"/" + current if current else base
        with os.scandir(directory) as scan:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in scan]
        marked = current and tags and not tags.isdisjoint(n for n, _ in entries)
        if marked and matcher.tagged(directory):
            found.append(current)
            continue
        for name, is_dir in entries:
            path = current + b"/" + name if current else name
            if matcher.rules and matcher.excluded(path, is_dir):
                found.append(path)
            elif is_dir:
                stack.append(path)
    return found
