"""Step 1's failure paths against the real components: dockerd containers and volumes, a real
SMTP server, real filesystems (a full tmpfs), real capabilities and real signals.

Every test asserts on outcomes only: the containers' state and `StartedAt`, the exit code, the
alert mails received, and what is (not) visible in the handover.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    AGENT,
    NEVER_READY,
    ROOT,
    WAIT,
    App,
    MailBox,
    agent_env,
    run_agent,
    start_agent,
    wait_until,
)

pytestmark = pytest.mark.docker

STEP_BULK = "1.b collect application data, 1.d collect log data (bulk pass, application running)"
STEP_FINAL = "1.b collect application data, 1.d collect log data (final pass, application stopped)"
STEP_ARCHIVE = "1.b collect application data (archive, application stopped)"
STEP_FOR_MODE = {"mirror": STEP_FINAL, "direct": STEP_ARCHIVE}

# Runs a command without the two capabilities that let root read any file, so a file of
# another user with mode 000 is unreadable even though the agent runs as root.
WITHOUT_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
]

# An application that leaves a file of another user with mode 000 behind when it stops.
UNREADABLE_ON_STOP = f"""
trap 'echo secret > /data/locked; chown 4242 /data/locked; chmod 000 /data/locked; exit 0' TERM
{NEVER_READY}
while true; do echo "line $EPOCHREALTIME" >> /logs/app.log; {WAIT}; done
"""

# An application that writes 10 MB of incompressible data when it stops.
TEN_MB_ON_STOP = f"""
trap 'head -c 10485760 /dev/urandom > /data/big.bin; exit 0' TERM
{NEVER_READY}
while true; do echo "line $EPOCHREALTIME" >> /logs/app.log; {WAIT}; done
"""

# An application that notes SIGTERM in its data volume and carries on: Docker waits
# STOP_TIMEOUT seconds, then kills it. The note shows the stop is under way.
IGNORES_TERM = f"""
trap 'touch /data/term-received' TERM
{NEVER_READY}
while true; do {WAIT}; done
"""


def stop_requested(app: App) -> bool:
    return (app.data_dir / "term-received").exists()


# ---------------------------------------------------------------- helpers


def env_for(app: App, handover: Path, mail: MailBox | None = None, **extra: str) -> dict[str, str]:
    """agent_env with pre/post-command labels of this app's own, so the agent never runs the
    commands of other tests' containers on the same engine (and theirs never run ours)."""
    own = {
        "PRE_COMMAND_LABEL": f"{app.label}.pre-command",
        "POST_COMMAND_LABEL": f"{app.label}.post-command",
    }
    return agent_env(app, handover, mail, **{**own, **extra})


def run_without_dac(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WITHOUT_DAC, *AGENT, "source", "backup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def generations(handover: Path, kind: str) -> list[str]:
    directory = handover / kind
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def assert_nothing_handed_over(handover: Path) -> None:
    assert generations(handover, "data") == []
    assert generations(handover, "logs") == []
    assert not (handover / ".staging").exists()


def the_alert(mail: MailBox) -> tuple[str, str]:
    """The one alert mail received: (subject, body)."""
    messages = mail.wait_for(1)
    assert len(messages) == 1, [m["Subject"] for m in messages]
    body = messages[0].get_payload(decode=True).decode().replace("\r\n", "\n")
    # Python folds a long Subject right after "Subject:"; unfold it and drop that space.
    subject = re.sub(r"\r?\n(?=[ \t])", "", str(messages[0]["Subject"])).strip()
    return subject, body


def assert_alert_step(mail: MailBox, step: str, *in_body: str) -> str:
    """The one alert received names `step` in its subject and body, and says `in_body`."""
    subject, body = the_alert(mail)
    assert subject == f"[backup-agent] test-source: source backup failed at {step}"
    assert f"Failed step: {step}\n" in body
    for text in in_body:
        assert text in body, body
    return body


def assert_alert(mail: MailBox, step: str, *in_body: str) -> str:
    """As assert_alert_step, and the alert says no generation was handed over."""
    body = assert_alert_step(mail, step, *in_body)
    assert "Kept: no new generation was handed over" in body, body
    return body


def deaths(docker_client, app: App, since: float) -> int:
    """How often the engine saw the app's container die since `since`."""
    events = docker_client.events(
        since=int(since) - 1,
        until=time.time(),
        decode=True,
        filters={"container": app.container.id, "event": "die"},
    )
    return sum(1 for _ in events)


def wait_while_running(agent: subprocess.Popen[str], predicate, timeout: float = 30.0) -> None:
    """Wait until `predicate()` holds; fail at once, with the agent's log, if the agent ends
    first (the window the test needed has passed)."""

    def reached() -> bool:
        if agent.poll() is not None:
            raise AssertionError(
                f"the agent ended (exit {agent.returncode}) before the "
                f"condition was reached:\n{agent.communicate()[1]}"
            )
        return predicate()

    wait_until(reached, timeout=timeout)
    assert agent.poll() is None


@pytest.fixture
def full_tmpfs(make_tmpfs) -> Path:
    """A 2 MB tmpfs to use as the handover."""
    return make_tmpfs("handover", "2m")


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[str]]]:
    """Agent processes a test starts; killed at teardown if a failed test left them running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


# ---------------------------------------------------------------- 1.b: unreadable data


@pytest.mark.parametrize("collect_mode", ["mirror", "direct"])
def test_app_is_started_again_when_a_file_is_unreadable(
    make_app, tmp_path, smtp_server, collect_mode
):
    app = make_app(UNREADABLE_ON_STOP)
    (app.data_dir / "readable.txt").write_text("fine\n")
    started_before = app.started_at()
    handover = tmp_path / "handover"

    result = run_without_dac(env_for(app, handover, smtp_server, COLLECT_MODE=collect_mode))

    assert result.returncode == 1, result.stderr
    assert app.reload() == "running"
    assert app.started_at() != started_before, "the application was not stopped for the copy"
    assert (app.data_dir / "locked").stat().st_uid == 4242, "the app did not create the file"
    assert_alert(smtp_server, STEP_FOR_MODE[collect_mode], "locked", "Permission denied")
    assert_nothing_handed_over(handover)


def test_app_is_never_stopped_when_the_bulk_pass_cannot_read_a_file(
    make_app, tmp_path, smtp_server
):
    app = make_app()
    locked = app.data_dir / "locked"
    locked.write_text("secret\n")
    os.chown(locked, 4242, 4242)
    locked.chmod(0)
    started_before = app.started_at()
    handover = tmp_path / "handover"

    result = run_without_dac(env_for(app, handover, smtp_server))

    assert result.returncode == 1, result.stderr
    assert app.reload() == "running" and app.started_at() == started_before
    assert_alert(smtp_server, STEP_BULK, "locked", "Permission denied")
    assert_nothing_handed_over(handover)


# ---------------------------------------------------------------- 1.b: the handover is full


@pytest.mark.parametrize("collect_mode", ["mirror", "direct"])
def test_app_is_started_again_when_the_handover_is_full(
    make_app, full_tmpfs, smtp_server, collect_mode
):
    app = make_app(TEN_MB_ON_STOP)
    started_before = app.started_at()

    result = run_agent(
        env_for(app, full_tmpfs, smtp_server, COLLECT_MODE=collect_mode), "source", "backup"
    )

    assert result.returncode == 1, result.stderr
    assert app.reload() == "running"
    assert app.started_at() != started_before, "the application was not stopped for the copy"
    assert (app.data_dir / "big.bin").stat().st_size == 10 << 20
    assert_alert(smtp_server, STEP_FOR_MODE[collect_mode], "No space left on device")
    assert_nothing_handed_over(full_tmpfs)


# ---------------------------------------------------------------- killed or interrupted


def test_a_run_killed_while_the_app_is_stopped_is_repaired_by_the_next_run(
    make_app, tmp_path, agents
):
    # Containers are stopped in name order: `bt-a-…` stops at once, then Docker waits
    # STOP_TIMEOUT seconds for `bt-b-…`, which ignores SIGTERM — the window for the kill.
    fast = make_app(name_prefix="bt-a")
    slow = make_app(
        IGNORES_TERM, name_prefix="bt-b", stop_label=False, extra_labels={fast.label: "true"}
    )
    handover = tmp_path / "handover"
    agent = start_agent(env_for(fast, handover, STOP_TIMEOUT="10"), "source", "backup")
    agents.append(agent)

    wait_while_running(agent, lambda: stop_requested(slow))
    assert fast.reload() == "exited"
    agent.send_signal(signal.SIGKILL)
    agent.communicate(timeout=60)
    assert agent.returncode == -signal.SIGKILL
    # The engine finishes the stop the dead agent asked for; nobody starts either again.
    wait_until(lambda: slow.reload() == "exited", timeout=60)
    assert fast.reload() == "exited"

    result = run_agent(env_for(fast, handover, STOP_TIMEOUT="1"), "source", "backup")

    assert result.returncode == 0, result.stderr
    assert fast.reload() == "running" and slow.reload() == "running"
    [gen] = generations(handover, "data")
    assert json.loads((handover / "data" / gen / "MANIFEST.json").read_text())["generation"] == gen
    assert generations(handover, "logs") == [gen]
    assert not (handover / ".staging").exists()


def test_sigterm_during_the_copy_starts_the_app_and_leaves_no_half_generation(
    make_app, tmp_path, smtp_server, agents
):
    app = make_app()
    # Incompressible data at zstd level 19 compresses at about 3 MB/s: a copy of 2-3 seconds.
    # (More data only makes the agent linger longer at exit: zstd's workers finish their jobs.)
    with open(app.data_dir / "random.bin", "wb") as handle:
        handle.write(os.urandom(8 << 20))
    started_before = app.started_at()
    handover = tmp_path / "handover"
    archive = handover / ".staging" / "data" / "data.tar.zst"
    agent = start_agent(
        env_for(app, handover, smtp_server, COLLECT_MODE="direct", ZSTD_LEVEL="19"),
        "source",
        "backup",
    )
    agents.append(agent)

    wait_while_running(agent, lambda: archive.exists() and app.reload() == "exited")
    agent.send_signal(signal.SIGTERM)
    # zstd's workers finish the job they hold before the agent can exit: at level 19 that took
    # more than 30 s on a loaded machine.
    _, stderr = agent.communicate(timeout=180)

    assert agent.returncode == 128 + signal.SIGTERM, stderr
    assert app.reload() == "running"
    assert app.started_at() != started_before
    assert_alert(smtp_server, STEP_ARCHIVE, "interrupted by SIGTERM")
    assert_nothing_handed_over(handover)


# An agent that is killed or interrupted while the engine is still stopping a container cannot
# see that stop: the container is "running" until the engine's stop timeout runs out. Starting
# "every container it stopped" must then wait for that stop to end before starting.


def test_sigterm_while_a_container_is_stopping_starts_it_again(
    make_app, tmp_path, smtp_server, docker_client, agents
):
    slow = make_app(IGNORES_TERM)
    handover = tmp_path / "handover"
    since = time.time()
    agent = start_agent(env_for(slow, handover, smtp_server, STOP_TIMEOUT="10"), "source", "backup")
    agents.append(agent)
    wait_while_running(agent, lambda: stop_requested(slow))

    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=30)

    assert agent.returncode == 128 + signal.SIGTERM, stderr
    assert_alert_step(smtp_server, "1.a stop the application", "interrupted by SIGTERM")
    # The engine ends the stop it was asked for (SIGKILL after STOP_TIMEOUT); the application
    # must be running after that.
    wait_until(lambda: deaths(docker_client, slow, since) >= 1, timeout=60, interval=0.2)
    assert slow.reload() == "running", "the application was left stopped:\n" + stderr


def test_a_container_still_stopping_for_a_killed_run_is_started_by_the_next_run(
    make_app, tmp_path, agents
):
    # The killed run asked the engine to stop `slow`; the engine finishes that stop
    # STOP_TIMEOUT seconds later, while the next run is already past its reconcile step
    # (held up here by a pre-command; in real life by the bulk pass over a large data set).
    # The margins (6 s, 8 s) leave the next run seconds to start on a loaded machine.
    slow = make_app(IGNORES_TERM)
    pre_label = f"{slow.label}.pre-command"
    make_app(stop_label=False, extra_labels={pre_label: "sleep 8"})
    handover = tmp_path / "handover"
    agent = start_agent(
        env_for(slow, handover, STOP_TIMEOUT="6", PRE_COMMAND_LABEL=f"{slow.label}.none"),
        "source",
        "backup",
    )
    agents.append(agent)
    wait_while_running(agent, lambda: stop_requested(slow))
    agent.send_signal(signal.SIGKILL)
    agent.communicate(timeout=60)
    assert slow.reload() == "running", "the engine has not finished the stop yet"

    result = run_agent(
        env_for(slow, handover, STOP_TIMEOUT="1", PRE_COMMAND_LABEL=pre_label), "source", "backup"
    )

    assert result.returncode == 0, result.stderr
    assert slow.reload() == "running", "the application was left stopped:\n" + result.stderr


# ---------------------------------------------------------------- one job at a time


def test_a_second_run_while_one_is_running_exits_3_and_touches_nothing(
    make_app, tmp_path, smtp_server, docker_client, agents
):
    app = make_app(IGNORES_TERM)
    started_before = app.started_at()
    since = time.time()
    handover = tmp_path / "handover"
    # The stop of an application that ignores SIGTERM takes STOP_TIMEOUT seconds: enough for
    # the second run to start and be refused on a loaded machine (3 s was not, once).
    env = env_for(app, handover, smtp_server, STOP_TIMEOUT="20")
    first = start_agent(env, "source", "backup")
    agents.append(first)
    # The first run is now in the stop.
    wait_while_running(first, lambda: stop_requested(app))

    second = run_agent(env, "source", "backup", timeout=30)

    assert second.returncode == 3, second.stderr
    assert "another backup-agent job" in second.stderr and "skipped" in second.stderr
    assert first.poll() is None, "the first run ended before the second one was checked"
    assert app.reload() == "running" and app.started_at() == started_before
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert app.reload() == "running"
    assert deaths(docker_client, app, since) == 1, "the application was stopped twice"
    assert len(generations(handover, "data")) == 1
    assert smtp_server.messages == []


# ---------------------------------------------------------------- configuration


def test_invalid_configuration_exits_2_naming_every_bad_variable_and_touches_nothing(
    make_app, tmp_path, smtp_server
):
    app = make_app()
    started_before = app.started_at()
    handover = tmp_path / "handover"

    result = run_agent(
        env_for(app, handover, smtp_server, QUIESCE_MODE="bogus", STOP_TIMEOUT="-1"),
        "source",
        "backup",
    )

    assert result.returncode == 2, result.stderr
    assert "QUIESCE_MODE: 'bogus' is not allowed; use one of: stop, pause" in result.stderr
    assert "STOP_TIMEOUT: '-1' is not allowed; use an integer from 0 to 3600" in result.stderr
    assert app.reload() == "running" and app.started_at() == started_before
    assert not handover.exists()


# ---------------------------------------------------------------- pre-commands


def test_a_failing_pre_command_fails_the_run_before_the_app_is_stopped(
    make_app, tmp_path, smtp_server
):
    # The label key is unique to this test, so no other agent on this engine runs the command.
    label = f"backup.test-{uuid.uuid4().hex[:10]}.pre-command"
    app = make_app(extra_labels={label: "echo dumping; exit 7"})
    started_before = app.started_at()
    handover = tmp_path / "handover"

    result = run_agent(
        env_for(app, handover, smtp_server, PRE_COMMAND_LABEL=label), "source", "backup"
    )

    assert result.returncode == 1, result.stderr
    assert app.reload() == "running" and app.started_at() == started_before
    assert_alert(
        smtp_server,
        "pre-commands",
        f"{label} in container {app.container.name} exited with 7",
        "dumping",
    )
    assert_nothing_handed_over(handover)
