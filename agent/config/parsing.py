"""Reading the raw values of the settings (environment, `.env`, `NAME_FILE`) and the pure parser
that turns them into typed values, collecting one problem per invalid setting."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dotenv import dotenv_values

from agent.config.settings import SETTINGS, SETTINGS_BY_ENV, VERBATIM
from agent.core.retention import Policy

T = TypeVar("T")


class ConfigError(Exception):
    """Invalid configuration: one message per invalid setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


SOURCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^[^\s=,]*$")
EMAIL_RE = re.compile(r"^[^@\s,]+@[^@\s,]+$")


@dataclass(frozen=True)
class LabelSelector:
    key: str
    value: str | None

    def docker_filter(self) -> str:
        return self.key if self.value is None else f"{self.key}={self.value}"


class Values(dict[str, str]):
    """The raw value of every declared setting that is set, and `unreadable`: the settings that
    could not be read (both `NAME` and `NAME_FILE` set, `NAME_FILE` unreadable), name → problem.
    The parse functions report those together with every other problem."""

    def __init__(self, values: Mapping[str, str], unreadable: Mapping[str, str]) -> None:
        super().__init__(values)
        self.unreadable = dict(unreadable)


def read_values(environ: Mapping[str, str], env_file: Path | None = None) -> Values:
    """Given the process environment and an optional `.env` file, return the raw value of every
    declared setting that is set. `NAME_FILE` is replaced by the file's content (one trailing
    newline stripped). A setting given both as `NAME` and `NAME_FILE`, or whose file is missing
    or unreadable, is left out and named in `Values.unreadable`."""
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        try:
            merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        except OSError as exc:
            raise ConfigError(
                [
                    f"--env-file {env_file}: cannot read it ({exc.strerror}); make "
                    "it readable by the user backup-agent runs as (the gateway's "
                    "users read gateway.env through their group: chgrp backupgw, "
                    "chmod 0640)"
                ]
            ) from None
    merged.update(environ)
    values: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for setting in SETTINGS:
        direct = merged.get(setting.env)
        file_name = merged.get(setting.env + "_FILE")
        if direct is not None and file_name is not None:
            unreadable[setting.env] = (
                f"{setting.env}: both {setting.env} and {setting.env}_FILE are set; set only one"
            )
        elif file_name is not None:
            try:
                values[setting.env] = Path(file_name).read_text().removesuffix("\n")
            except OSError as exc:
                unreadable[setting.env] = (
                    f"{setting.env}_FILE: cannot read {file_name!r} "
                    f"({exc.strerror}); point it at a readable file"
                )
        elif direct is not None:
            values[setting.env] = direct
    return Values(values, unreadable)


class Parser:
    """Collects problems while turning raw values into typed ones."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.unreadable = values.unreadable if isinstance(values, Values) else {}
        self.problems: list[str] = []

    def raw(self, env: str) -> str:
        setting = SETTINGS_BY_ENV[env]
        value = self.values.get(env, setting.default)
        value = value if env in VERBATIM else value.strip()
        if setting.required and not value and env not in self.unreadable:
            self.problems.append(f"{env}: required; {setting.help}")
        return value

    def all_problems(self) -> list[str]:
        """Every problem found: the settings that could not be read, then the others, except
        what follows from an unread setting's stand-in value."""
        return [
            *self.unreadable.values(),
            *(p for p in self.problems if p.split(":", 1)[0] not in self.unreadable),
        ]

    def finish(self) -> None:
        """Raise ConfigError listing every problem found, if there is one."""
        if problems := self.all_problems():
            raise ConfigError(problems)

    def check(self, env: str, convert: Callable[[str], T], allowed: str, fallback: T) -> T:
        value = self.raw(env)
        try:
            return convert(value)
        except ValueError:
            self.problems.append(f"{env}: {value!r} is not allowed; {allowed}")
            return fallback

    def choice(self, env: str, choices: tuple[str, ...]) -> str:
        def convert(value: str) -> str:
            if value not in choices:
                raise ValueError
            return value

        return self.check(env, convert, "use one of: " + ", ".join(choices), choices[0])

    def integer(self, env: str, low: int, high: int | None = None) -> int:
        def convert(value: str) -> int:
            number = int(value)
            if number < low or (high is not None and number > high):
                raise ValueError
            return number

        span = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        return self.check(env, convert, "use " + span, low)

    def paths(self, env: str) -> tuple[Path, ...]:
        def convert(value: str) -> tuple[Path, ...]:
            items = [item.strip() for item in value.split(",") if item.strip()]
            paths = tuple(Path(os.path.normpath(item)) for item in items)
            if any(not p.is_absolute() or p == Path("/") for p in paths):
                raise ValueError
            return paths

        return self.check(env, convert, "use comma-separated absolute directories other than /", ())

    def path(self, env: str) -> Path:
        def convert(value: str) -> Path:
            path = Path(os.path.normpath(value))
            if not path.is_absolute() or path == Path("/"):
                raise ValueError
            return path

        return self.check(env, convert, "use an absolute directory other than /", Path("/invalid"))

    def label_key(self, env: str) -> str:
        def convert(value: str) -> str:
            if not LABEL_KEY_RE.match(value):
                raise ValueError
            return value

        return self.check(env, convert, "use a Docker label key such as `backup.pre-command`", "")

    def selector(self, env: str) -> LabelSelector:
        return self.check(
            env,
            parse_label_selector,
            "use `key` or `key=value`, e.g. `backup.stop-during-backup=true`",
            LabelSelector("invalid", None),
        )

    def pattern(self, env: str, regex: re.Pattern[str], allowed: str) -> str:
        def convert(value: str) -> str:
            if value and not regex.match(value):
                raise ValueError
            return value

        return self.check(env, convert, allowed, "")

    def boolean(self, env: str) -> bool:
        def convert(value: str) -> bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")

        return self.check(env, convert, "use true or false", False)

    def policy(self, prefix: str) -> Policy:
        return Policy(
            last=self.integer(f"{prefix}_LAST", 1),
            daily=self.integer(f"{prefix}_DAILY", 0),
            weekly=self.integer(f"{prefix}_WEEKLY", 0),
            monthly=self.integer(f"{prefix}_MONTHLY", 0),
        )

    def emails(self, env: str) -> tuple[str, ...]:
        def convert(value: str) -> tuple[str, ...]:
            items = tuple(item.strip() for item in value.split(",") if item.strip())
            if not all(EMAIL_RE.match(item) for item in items):
                raise ValueError
            return items

        return self.check(env, convert, "use comma-separated mail addresses", ())


def parse_label_selector(text: str) -> LabelSelector:
    """Given `key` or `key=value`, return the selector. Raise ValueError if malformed."""
    key, sep, value = text.partition("=")
    if not LABEL_KEY_RE.match(key) or (sep and not (value and LABEL_VALUE_RE.match(value))):
        raise ValueError(text)
    return LabelSelector(key, value if sep else None)


def named(p: Parser) -> set[str]:
    """The settings a problem was found with already: their paths are not checked."""
    return {problem.split(":", 1)[0] for problem in p.all_problems()} | set(p.unreadable)


def directory_problem(env: str, directory: Path) -> list[str]:
    """A problem if `directory` is not a writable directory and cannot be created as one: its
    nearest existing ancestor must then be a writable directory."""
    existing = directory
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        reason = "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = (
            "Permission denied"
            if existing == directory
            else (f"cannot be created: {existing} is not writable")
        )
    else:
        return []
    return [
        f"{env}: {directory} is not a writable directory ({reason}); mount a writable volume there"
    ]
