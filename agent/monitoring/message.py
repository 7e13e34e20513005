"""The one message model of the agent: what the alert mail says and what Apprise
notifications say (source, job, step, error, what was kept), and the summary of a job that
succeeded (notifications at NOTIFY_LEVEL=info)."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Alert:
    """What went wrong, where, and what was kept. With `warning` (the subject's headline) it
    comes from a job that goes on and reports its own outcome later, so it never says the job
    failed."""

    source: str
    job: str
    step: str
    error: str
    kept: str
    warning: str = ""
    free_space: str = ""

    level = "error"

    @property
    def subject(self) -> str:
        if self.warning:
            return f"[backup-agent] {self.source}: {self.job}: {self.warning}"
        return f"[backup-agent] {self.source}: {self.job} failed at {self.step}"

    @property
    def body(self) -> str:
        what = (
            f"Warning: {self.step} (the job goes on)\nDetails: {self.error}\n"
            if self.warning
            else f"Failed step: {self.step}\nError: {self.error}\n"
        )
        return (
            f"Source: {self.source}\n"
            f"Job: {self.job}\n"
            f"{what}"
            f"Kept: {self.kept or 'nothing was changed'}\n"
            + (f"Free space: {self.free_space}\n" if self.free_space else "")
            + f"Host: {socket.gethostname()}\n"
        )


@dataclass(frozen=True)
class Summary:
    """A job that succeeded, and what it did in one line."""

    source: str
    job: str
    summary: str
    seconds: float

    level = "info"

    @property
    def subject(self) -> str:
        return f"[backup-agent] {self.source}: {self.job} succeeded"

    @property
    def body(self) -> str:
        return (
            f"Source: {self.source}\n"
            f"Job: {self.job}\n"
            f"Done: {self.summary or 'nothing to do'}\n"
            f"Took: {self.seconds:.1f} s\n"
            f"Host: {socket.gethostname()}\n"
        )


Message = Alert | Summary
