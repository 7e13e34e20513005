"""EXCLUDE and EXCLUDE_IF_PRESENT against the real file system, rsync, tar and Docker: what is
excluded is absent from the mirror (both passes, also when it was there before), from the
archive, the chunked index and the log generation; a restore leaves it as it is in the target;
a malformed pattern stops the agent at start-up."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core import excludes
from agent.core.archive import member_name
from agent.source import mirror_patch
from agent.source.mirror import Mirror
from agent.swap.journal import REPLACED, STAGING, Swap
from tests.conftest import agent_env, run_agent
from tests.trees import extract, snapshot

SIGNED = excludes.CACHEDIR_SIGNATURE + b"\n# This file is a cache directory tag.\n"
PATTERNS = "*.tmp\ncache/\n# a comment line\n**/scratch/**\n"


def _paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def make_tree(root: Path, seed: int) -> None:
    """Kept and excluded entries side by side; a large file (patched in place by the mirror)
    among the excluded ones."""
    rng = random.Random(seed)
    for rel in ("keep/a.txt", "keep/b.tmp", "cache/x", "deep/cache/y", "deep/scratch/z/w"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rng.randbytes(1000))
    (root / "deep/scratch/gone.txt").write_bytes(b"its contents are excluded, not itself")
    (root / "big.tmp").write_bytes(rng.randbytes(mirror_patch.LARGE_FILE + 1))
    (root / "tagged/sub").mkdir(parents=True)
    (root / "tagged/sub/file").write_bytes(b"in a cache directory")
    (root / "tagged" / "CACHEDIR.TAG").write_bytes(SIGNED)
    (root / "unsigned").mkdir()
    (root / "unsigned" / "CACHEDIR.TAG").write_bytes(b"no signature here")


KEPT = {
    "keep",
    "keep/a.txt",
    "deep",
    "deep/scratch",
    "unsigned",
    "unsigned/CACHEDIR.TAG",
}


def _excludes(patterns: str, roots: list[Path], tags: tuple[str, ...] = ("CACHEDIR.TAG",)):
    return excludes.parse(excludes.split_patterns(patterns), tags, roots)


def test_excluded_paths_stay_out_of_both_mirror_passes_and_leave_an_existing_mirror(
    tmp_path: Path,
) -> None:
    source = tmp_path / "app" / "data"
    source.mkdir(parents=True)
    make_tree(source, 1)
    mirrors = tmp_path / "handover" / ".mirror" / "data"
    copy = mirrors / member_name(source)
    Mirror({mirrors: [source]}).sync()  # a mirror from before the excludes: it holds all
    assert "big.tmp" in _paths(copy) and "tagged/sub/file" in _paths(copy)

    kept = Mirror({mirrors: [source]}, _excludes(PATTERNS, [source]))
    kept.sync()
    assert _paths(copy) == KEPT
    # between the passes: a new excluded file, a changed one, a kept one changed
    (source / "keep" / "new.tmp").write_bytes(b"new")
    (source / "cache" / "x").write_bytes(b"changed")
    (source / "keep" / "a.txt").write_bytes(b"changed too")
    report = kept.sync(final=True)

    assert _paths(copy) == KEPT
    assert (copy / "keep" / "a.txt").read_bytes() == b"changed too"
    assert not report.patched  # the large excluded file is neither copied nor patched


def test_a_first_copy_with_excludes_leaves_them_out_and_an_unanchored_rule_spares_others(
    tmp_path: Path,
) -> None:
    data, logs = tmp_path / "data", tmp_path / "logs"
    for root in (data, logs):
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "debug.log").write_text("x")
        (root / "sub" / "app.log").write_text("y")
    mirrors = tmp_path / "handover" / ".mirror"
    rules = _excludes(f"{logs}/sub/debug.log\n", [data, logs])
    Mirror({mirrors / "data": [data], mirrors / "logs": [logs]}, rules).sync()

    assert _paths(mirrors / "logs" / member_name(logs)) == {"sub", "sub/app.log"}
    assert _paths(mirrors / "data" / member_name(data)) == {
        "sub",
        "sub/app.log",
        "sub/debug.log",
    }


def _swap(tmp_path: Path, patterns: str) -> tuple[Path, Swap]:
    """A data path with a restored tree staged into it, and its swap."""
    path = tmp_path / "data"
    (path / "keep").mkdir(parents=True)
    (path / "keep" / "a.txt").write_text("before")
    (path / "keep" / "local.tmp").write_text("excluded, in the target")
    (path / "cache").mkdir()
    (path / "cache" / "c").write_text("excluded directory")
    (path / "tagged").mkdir()
    (path / "tagged" / "CACHEDIR.TAG").write_bytes(SIGNED)
    staged = path / STAGING / member_name(path)
    (staged / "keep").mkdir(parents=True)
    (staged / "keep" / "a.txt").write_text("restored")
    (staged / "keep" / "local.tmp").write_text("from a generation before the exclude")
    (staged / "tagged").mkdir()
    (staged / "tagged" / "old").write_text("from a generation before the tag")
    _set_times(staged, 1_700_000_000_000_000_000)
    _set_times(path, 1_600_000_000_000_000_000)
    swap = Swap(tmp_path / "restore.json", "gen", [path], None, _excludes(patterns, [path]))
    return path, swap


def _set_times(root: Path, ns: int) -> None:
    """Every entry at and below `root` given the same times, children first (so scenes made
    at different moments compare equal)."""
    for directory, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            os.utime(os.path.join(directory, name), ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(ns, ns))


def test_a_swap_leaves_excluded_paths_of_the_target_as_they_are(tmp_path: Path) -> None:
    path, swap = _swap(tmp_path, PATTERNS)
    swap.run()

    assert (path / "keep" / "a.txt").read_text() == "restored"
    assert (path / "keep" / "local.tmp").read_text() == "excluded, in the target"
    assert (path / "cache" / "c").read_text() == "excluded directory"
    assert sorted(os.listdir(path / "tagged")) == ["CACHEDIR.TAG"]
    assert not _paths(path / REPLACED) & {"keep/local.tmp", "cache", "tagged"}


def test_restore_path_of_one_entry_keeps_what_is_excluded_below_it_and_nothing_else(
    tmp_path: Path,
) -> None:
    path, _ = _swap(tmp_path, PATTERNS)
    (path / "cache" / "other").write_text("another cache file")
    staged = path / STAGING / member_name(path)
    (staged / "cache").mkdir()
    (staged / "cache" / "c").write_text("asked for by name")
    Swap(tmp_path / "one.json", "gen", [path], ["cache/c"], _excludes(PATTERNS, [path])).run()
    assert (path / "cache" / "c").read_text() == "asked for by name"
    assert (path / "cache" / "other").read_text() == "another cache file"

    path, _ = _swap(tmp_path / "dir", PATTERNS)
    Swap(tmp_path / "two.json", "gen", [path], ["keep"], _excludes(PATTERNS, [path])).run()
    assert (path / "keep" / "a.txt").read_text() == "restored"
    assert (path / "keep" / "local.tmp").read_text() == "excluded, in the target"


@pytest.mark.parametrize("phase", ["keeping", "done"])
def test_a_swap_rolled_back_after_putting_excluded_paths_back_restores_all_before(
    tmp_path: Path, phase: str
) -> None:
    path, swap = _swap(tmp_path, PATTERNS)
    before = snapshot(path)
    del before[os.fsencode(STAGING)]
    before = {k: v for k, v in before.items() if not k.startswith(os.fsencode(STAGING) + b"/")}
    swap.run()
    if phase == "keeping":  # killed half-way through putting them back
        state = swap.states[0]
        state.phase = "keeping"
        (path / "cache").rename(path / REPLACED / "cache")
        swap._save()

    Swap.load(tmp_path / "restore.json").rollback()  # as reconcile does after a kill

    after = snapshot(path)
    after = {k: v for k, v in after.items() if not k.startswith(os.fsencode(STAGING))}
    assert after == before


def test_a_malformed_pattern_fails_at_start_up_naming_exclude(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "SOURCE_ID": "excl-malformed",
        "DATA_PATHS": str(tmp_path / "data"),
        "HANDOVER_DIR": str(tmp_path / "handover"),
        "SOURCE_STORE_DIR": str(tmp_path / "store"),
        "QUIESCE_MODE": "signal",
        "SIGNAL_PROCESSES": "^never-running-excl$",
    }
    (tmp_path / "data").mkdir()
    result = run_agent({**env, "EXCLUDE": "*.tmp\ncache/[ab"}, "source", "backup")
    assert result.returncode == 2, result.stderr
    assert "EXCLUDE: 'cache/[ab'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "handover").exists()


@pytest.mark.docker
@pytest.mark.parametrize("collect", ["mirror", "direct"])
def test_excluded_paths_are_absent_from_the_archive_and_the_log_generation(
    make_app, tmp_path: Path, collect: str
) -> None:
    app = make_app()
    make_tree(app.data_dir, 2)
    (app.logs_dir / "debug").mkdir()
    (app.logs_dir / "debug" / "trace.log").write_text("noisy")
    (app.logs_dir / "kept.log").write_text("kept")
    env = agent_env(
        app,
        tmp_path / "handover",
        COLLECT_MODE=collect,
        DATA_FORMAT="archive",
        EXCLUDE=f"{PATTERNS}{app.logs_dir}/debug/\n",
    )
    result = run_agent(env, "source", "backup")
    assert result.returncode == 0, result.stderr

    [gen] = (tmp_path / "handover" / "data").iterdir()
    extract(gen / "data.tar.zst", tmp_path / "x")
    assert _paths(tmp_path / "x" / member_name(app.data_dir)) == KEPT
    [logs] = (tmp_path / "handover" / "logs").iterdir()
    logged = _paths(logs / member_name(app.logs_dir))
    assert "kept.log" in logged and not {p for p in logged if p.startswith("debug")}
    if collect == "mirror":
        assert _paths(tmp_path / "handover" / ".mirror" / "data" / member_name(app.data_dir))
        assert (
            _paths(tmp_path / "handover" / ".mirror" / "data" / member_name(app.data_dir)) == KEPT
        )
        assert "debug" not in _paths(
            tmp_path / "handover" / ".mirror" / "logs" / member_name(app.logs_dir)
        )
    found = subprocess.run(
        ["grep", "-rl", "in a cache directory", str(tmp_path / "handover")],
        capture_output=True,
        check=False,
    )
    assert found.stdout == b""  # nowhere in the handover, the mirror included


@pytest.mark.docker
def test_a_chunked_generation_lacks_excluded_paths_and_a_restore_leaves_them_in_place(
    make_app, s3, tmp_path: Path
) -> None:
    app = make_app()
    make_tree(app.data_dir, 3)
    env = {
        **agent_env(app, tmp_path / "handover"),
        **s3.env(),
        "DATA_FORMAT": "chunks",
        "LOG_PATHS": "",
        "EXCLUDE": PATTERNS,
    }
    assert run_agent(env, "source", "run").returncode == 0
    out = tmp_path / "out"
    result = run_agent(env, "restore", "--from", "s3", "--target", str(out))
    assert result.returncode == 0, result.stderr
    assert _paths(out / member_name(app.data_dir)) == KEPT
    mirrored = tmp_path / "handover" / ".mirror" / "data" / member_name(app.data_dir)
    assert _paths(mirrored) == KEPT

    (app.data_dir / "keep" / "a.txt").write_text("changed after the backup")
    (app.data_dir / "keep" / "later.tmp").write_text("excluded, made after the backup")
    (app.data_dir / "cache" / "x").write_text("a cache that changed")
    excluded = {
        rel: (app.data_dir / rel).read_bytes()
        for rel in ("keep/later.tmp", "keep/b.tmp", "cache/x", "tagged/sub/file", "big.tmp")
    }
    result = run_agent(env, "restore", "--from", "s3")
    assert result.returncode == 0, result.stderr

    assert (app.data_dir / "keep" / "a.txt").read_bytes() == (
        out / member_name(app.data_dir) / "keep" / "a.txt"
    ).read_bytes()
    assert {rel: (app.data_dir / rel).read_bytes() for rel in excluded} == excluded
    assert app.reload() == "running"


CHANGES = {"os.rename", "os.mkdir", "os.rmdir", "os.remove", "os.chmod", "os.chown", "os.utime"}


def _killed_swap(at: int, path: Path, record: Path) -> int:
    """Run a swap of `path` in a forked child that SIGKILLs itself just before its `at`-th
    file system change (Python's audit events); return its wait status."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child never returns
        seen = 0

        def hook(event: str, args: tuple) -> None:
            nonlocal seen
            if event in CHANGES:
                seen += 1
                if seen == at:
                    os.kill(os.getpid(), signal.SIGKILL)

        code = 1
        try:
            sys.addaudithook(hook)
            Swap(record, "gen", [path], None, _excludes(PATTERNS, [path])).run()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(child, 0)[1]


def _outcome(path: Path) -> dict:
    return {
        k: v
        for k, v in snapshot(path).items()
        if not k.startswith((os.fsencode(STAGING), os.fsencode(REPLACED)))
    }


def test_a_swap_killed_at_any_point_ends_as_before_or_restored_with_excluded_paths_kept(
    tmp_path: Path,
) -> None:
    """Killed just before each of its file system changes in turn, then reconciled as the next
    job does: the data path holds the previous contents exactly, or the restored ones with the
    excluded paths of the target put back."""
    from agent.core.handover import Handover
    from agent.swap import journal

    path, swap = _swap(tmp_path / "whole", PATTERNS)
    swap.run()
    swap.finish(Handover(tmp_path / "whole" / "handover"), keep=False)
    restored = _outcome(path)
    outcomes = set()
    for at in range(1, 200):
        scene = tmp_path / f"at{at}"
        path, _ = _swap(scene, PATTERNS)
        previous = _outcome(path)
        status = _killed_swap(at, path, scene / "restore.json")
        handover = Handover(scene / "handover")
        (handover.state).mkdir(parents=True, exist_ok=True)
        if (scene / "restore.json").exists():
            (scene / "restore.json").rename(journal.journal_path(handover))
        journal.reconcile(handover, [path])
        after = _outcome(path)
        assert after in (previous, restored), at
        outcomes.add("previous" if after == previous else "restored")
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, at
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
    else:
        pytest.fail("the swap made more than 200 changes")
    assert outcomes == {"previous", "restored"} and at > 10
