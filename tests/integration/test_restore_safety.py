"""Restore refuses crafted and tampered archives, against a real application container, a real
SMTP server and GNU tar.

Each archive is made here with Python's tarfile (PAX format) and zstandard, sealed with a
correct manifest in a local store directory, and restored with `restore --from <dir>` into the
data volume of a running container. The tests assert outcomes only: the exit code, the
member named on stderr, the alert mail, the data path byte for byte as before, nothing written
outside, no staging left behind, and the application running and never restarted (an archive
is checked before the application is touched).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from agent.core import archive, manifest
from agent.core.manifest import FileEntry, Manifest
from agent.swap.journal import REPLACED, STAGING
from tests.conftest import App, MailBox, agent_env, run_agent
from tests.trees import snapshot

pytestmark = pytest.mark.docker

GEN = "2026-11-20T02-00-00Z"
MTIME = 1_700_000_000


# ---------------------------------------------------------------- crafting archives


Member = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, kind: bytes, mode: int, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, MTIME
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def file(name: str, content: bytes = b"content\n", mode: int = 0o644) -> Member:
    return _info(name, tarfile.REGTYPE, mode, size=len(content)), content


def directory(name: str) -> Member:
    return _info(name, tarfile.DIRTYPE, 0o755), None


def symlink(name: str, target: str) -> Member:
    return _info(name, tarfile.SYMTYPE, 0o777, linkname=target), None


def hardlink(name: str, target: str) -> Member:
    return _info(name, tarfile.LNKTYPE, 0o644, linkname=target), None


def char_device(name: str, major: int = 1, minor: int = 3) -> Member:
    return _info(name, tarfile.CHRTYPE, 0o666, devmajor=major, devminor=minor), None


def write_archive(path: Path, members: Sequence[Member]) -> None:
    """A zstd-compressed PAX tar of `members`, exactly as given (tarfile does not rewrite
    absolute or `..` names it is handed as TarInfo)."""
    with open(path, "wb") as raw:
        with zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False) as compressed:
            with tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for info, content in members:
                    tar.addfile(info, io.BytesIO(content) if content is not None else None)


def archive_tree(path: Path, source: Path, arcname: str) -> None:
    """A zstd-compressed PAX tar of the tree at `source`, its members named below `arcname`."""
    with open(path, "wb") as raw:
        with zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False) as compressed:
            with tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.add(source, arcname=arcname)


def put_generation(store: Path, data_dir: Path, make: Callable[[Path], None]) -> Path:
    """A complete data generation in the local store directory `store`: the archive `make`
    writes, then its manifest (size and sha256 of the archive, the data path). Return the
    archive's path."""
    gen_dir = store / "data" / GEN
    gen_dir.mkdir(parents=True)
    target = gen_dir / archive.ARCHIVE_NAME
    make(target)
    digest = archive.hash_file(target)
    manifest.write(
        gen_dir,
        Manifest(
            source_id="test-source",
            kind="data",
            generation=GEN,
            created_at=GEN,
            downtime_seconds=0.1,
            agent_version="test",
            files=(FileEntry(archive.ARCHIVE_NAME, digest.size, digest.sha256),),
            paths=(str(data_dir),),
        ),
    )
    return target


def member(app: App, *parts: str) -> str:
    """The archive member name of a path below the app's data path."""
    return "/".join([str(app.data_dir).lstrip("/"), *parts])


def ordinary(app: App) -> list[Member]:
    """What a real data archive starts with: the data path and a few files."""
    return [
        directory(member(app)),
        directory(member(app, "docs")),
        file(member(app, "docs", "readme.txt"), b"restored\n"),
        file(member(app, "db.bin"), os.urandom(4096)),
    ]


# ---------------------------------------------------------------- the scene


@dataclass
class Scene:
    """An application with live data, an outside directory an attacker would like to reach,
    and a local store directory to restore from."""

    app: App
    mail: MailBox
    tmp: Path
    outside: Path
    store: Path

    @property
    def env(self) -> dict[str, str]:
        return agent_env(self.app, self.tmp / "handover", self.mail)

    def restore(self, *extra: str):
        return run_agent(self.env, "restore", "--from", str(self.store), *extra)


@pytest.fixture
def scene(make_app, smtp_server, tmp_path) -> Scene:
    app = make_app()
    (app.data_dir / "victim").mkdir()
    (app.data_dir / "victim" / "config.ini").write_text("[live]\nvalue = 1\n")
    (app.data_dir / "live.db").write_bytes(os.urandom(10_000))
    os.symlink("victim/config.ini", app.data_dir / "current")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch\n")
    return Scene(app, smtp_server, tmp_path, outside, tmp_path / "store")


@dataclass
class Before:
    data: dict
    parent: list[str]
    outside: dict
    started_at: str


def observe(s: Scene) -> Before:
    return Before(
        snapshot(s.app.data_dir),
        sorted(os.listdir(s.app.data_dir.parent)),
        snapshot(s.outside),
        s.app.started_at(),
    )


def assert_refused_untouched(s: Scene, before: Before, result, *, names: str) -> None:
    """The restore failed (exit 1), said why, alerted, and changed nothing anywhere."""
    assert result.returncode == 1, result.stderr
    assert names in result.stderr, result.stderr
    [mail] = s.mail.wait_for(1)
    assert "restore failed" in mail["Subject"]
    assert names in mail.get_content()
    assert snapshot(s.app.data_dir) == before.data, "the data path was changed"
    assert not (s.app.data_dir / STAGING).exists()
    assert not (s.app.data_dir / REPLACED).exists()
    assert sorted(os.listdir(s.app.data_dir.parent)) == before.parent, (
        "something appeared beside the data path"
    )
    assert snapshot(s.outside) == before.outside, "something was written outside"
    assert os.stat(s.outside / "secret").st_nlink == 1, "the outside file was hard-linked"
    assert s.app.reload() == "running"
    assert s.app.started_at() == before.started_at, (
        "the application was stopped for an archive that could not be restored"
    )


def refused_case(s: Scene, members: Sequence[Member], *extra: str) -> tuple[Before, object]:
    put_generation(s.store, s.app.data_dir, lambda path: write_archive(path, members))
    before = observe(s)
    return before, s.restore(*extra)


# ---------------------------------------------------------------- unsafe members


def test_an_absolute_member_is_refused_and_nothing_is_touched(scene):
    planted = scene.outside / "planted-absolute"
    name = str(planted)
    before, result = refused_case(scene, [*ordinary(scene.app), file(name, b"evil\n")])

    assert_refused_untouched(scene, before, result, names=repr(name))
    assert "absolute path" in result.stderr
    assert not planted.exists()


def test_a_member_climbing_out_with_dot_dot_is_refused_and_nothing_is_touched(scene):
    up = "/".join([".."] * len(scene.app.data_dir.parts))  # from the data path up to /
    planted = scene.outside / "planted-dotdot"
    name = member(scene.app, up, str(planted).lstrip("/"))
    before, result = refused_case(scene, [*ordinary(scene.app), file(name, b"evil\n")])

    assert_refused_untouched(scene, before, result, names=repr(name))
    assert not planted.exists()


def test_a_member_next_to_the_data_path_is_refused_and_nothing_is_touched(scene):
    name = member(scene.app, "..", "planted-beside")
    before, result = refused_case(scene, [*ordinary(scene.app), file(name, b"evil\n")])

    assert_refused_untouched(scene, before, result, names=repr(name))
    assert not (scene.app.data_dir.parent / "planted-beside").exists()


def test_a_member_outside_the_data_paths_is_refused_and_nothing_is_touched(scene):
    name = str(scene.outside / "planted-elsewhere").lstrip("/")
    before, result = refused_case(scene, [*ordinary(scene.app), file(name, b"evil\n")])

    assert_refused_untouched(scene, before, result, names=repr(name))
    assert "outside the generation's data paths" in result.stderr


def test_a_device_node_is_refused_and_nothing_is_touched(scene):
    name = member(scene.app, "null")
    before, result = refused_case(scene, [*ordinary(scene.app), char_device(name)])

    assert_refused_untouched(scene, before, result, names=repr(name))
    assert "device node" in result.stderr


@pytest.mark.parametrize("relative", [False, True], ids=["absolute-link", "dot-dot-link"])
def test_a_hard_link_to_a_file_outside_is_refused_and_nothing_is_touched(scene, relative):
    secret = scene.outside / "secret"
    target = (
        member(scene.app, *[".."] * len(scene.app.data_dir.parts), str(secret)[1:])
        if relative
        else str(secret)
    )
    name = member(scene.app, "stolen")
    before, result = refused_case(scene, [*ordinary(scene.app), hardlink(name, target)])

    assert_refused_untouched(scene, before, result, names=repr(name))
    assert "hard link" in result.stderr
    assert secret.read_text() == "do not touch\n"


def test_a_hard_link_to_a_live_file_not_in_the_archive_is_refused(scene):
    # a link name that is inside the data path, but no earlier member: tar would link to
    # whatever is at that path
    name = member(scene.app, "stolen")
    before, result = refused_case(
        scene, [*ordinary(scene.app), hardlink(name, member(scene.app, "live.db"))]
    )

    assert_refused_untouched(scene, before, result, names=repr(name))
    assert os.stat(scene.app.data_dir / "live.db").st_nlink == 1


@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_a_symbolic_link_pointing_outside_is_restored_as_the_link_it_was(scene, target):
    # as tar, restic and borg do: the link itself is data; only writing through it is not
    name = member(scene.app, "link")
    link = (
        str(scene.outside)
        if target == "absolute"
        else "/".join([".."] * len(scene.app.data_dir.parts) + [str(scene.outside)[1:]])
    )
    put_generation(
        scene.store,
        scene.app.data_dir,
        lambda path: write_archive(path, [*ordinary(scene.app), symlink(name, link)]),
    )
    before = observe(scene)

    result = scene.restore()

    assert result.returncode == 0, result.stderr
    restored = scene.app.data_dir / "link"
    assert restored.is_symlink() and os.readlink(restored) == link
    assert restored.resolve() == scene.outside.resolve()
    assert (scene.app.data_dir / "docs" / "readme.txt").read_text() == "restored\n"
    assert not (scene.app.data_dir / "live.db").exists(), "the previous contents were replaced"
    assert snapshot(scene.outside) == before.outside
    assert not (scene.app.data_dir / STAGING).exists()
    assert not (scene.app.data_dir / REPLACED).exists()
    assert scene.app.reload() == "running"
    assert scene.app.started_at() != before.started_at, "stopped for the swap, started again"
    assert scene.mail.wait_for(1, timeout=0.5) == [], "a successful restore sends no alert"


def test_links_the_app_made_inside_its_container_and_a_dangling_link_restore_as_they_were(scene):
    # /data/current -> /data/releases/v2 resolves inside the container; on the host it points
    # outside /var/lib/docker/volumes/<volume>/_data
    app, data = scene.app, scene.app.data_dir
    made = app.container.exec_run(
        [
            "sh",
            "-c",
            "mkdir -p /data/releases/v2 && "
            "echo v2 > /data/releases/v2/version && "
            "ln -s /data/releases/v2 /data/current.new && "
            "mv -T /data/current.new /data/current",
        ]
    )
    assert made.exit_code == 0, made.output
    os.symlink("/nonexistent/target", data / "dangling")
    expected = snapshot(data)
    assert run_agent(scene.env, "source", "backup").returncode == 0
    os.unlink(data / "current")
    os.unlink(data / "dangling")
    (data / "live.db").write_bytes(b"changed after the backup")

    result = run_agent(scene.env, "restore", "--from", "handover")

    assert result.returncode == 0, result.stderr
    assert snapshot(data) == expected
    assert os.readlink(data / "current") == "/data/releases/v2"
    assert os.readlink(data / "dangling") == "/nonexistent/target"
    assert app.reload() == "running"
    seen = app.container.exec_run(["cat", "/data/current/version"])
    assert (seen.exit_code, seen.output) == (0, b"v2\n"), "the app follows its link again"


def test_allow_outside_symlinks_is_still_accepted_and_says_it_is_no_longer_needed(scene):
    put_generation(
        scene.store,
        scene.app.data_dir,
        lambda path: write_archive(
            path, [*ordinary(scene.app), symlink(member(scene.app, "link"), "/etc")]
        ),
    )

    result = scene.restore("--allow-outside-symlinks")

    assert result.returncode == 0, result.stderr
    assert "--allow-outside-symlinks is deprecated" in result.stderr
    assert os.readlink(scene.app.data_dir / "link") == "/etc"


def test_a_member_written_through_a_symbolic_link_into_the_live_data_is_refused(scene):
    # The link points inside the data path — allowed by itself — at the live directory the
    # staging area sits in; a file below the link would land in the running application's
    # data before any check of the whole archive.
    victim = scene.app.data_dir / "victim"
    name = member(scene.app, "link", "config.ini")
    members = [
        *ordinary(scene.app),
        symlink(member(scene.app, "link"), str(victim)),
        file(name, b"[planted]\n"),
    ]
    before, result = refused_case(scene, members)

    assert_refused_untouched(scene, before, result, names=repr(name))
    assert "through the symbolic link" in result.stderr
    assert (victim / "config.ini").read_text() == "[live]\nvalue = 1\n"


def test_a_member_written_through_a_symbolic_link_to_the_outside_is_refused(scene):
    name = member(scene.app, "link", "planted-through")
    members = [
        *ordinary(scene.app),
        symlink(member(scene.app, "link"), str(scene.outside)),
        file(name, b"evil\n"),
    ]
    before, result = refused_case(scene, members)

    assert_refused_untouched(scene, before, result, names=repr(name))
    assert not (scene.outside / "planted-through").exists()


def test_a_directory_written_through_a_relative_symbolic_link_is_refused(scene):
    name = member(scene.app, "up", "planted-dir")
    members = [
        *ordinary(scene.app),
        symlink(member(scene.app, "up"), "."),
        directory(name),
        file(name + "/x", b"evil\n"),
    ]
    before, result = refused_case(scene, members)

    assert_refused_untouched(scene, before, result, names=repr(name))


def test_a_symbolic_link_renamed_by_a_gnu_sparse_name_record_is_refused(scene):
    # tarfile sees a link deep below the data path that resolves inside it; GNU tar creates
    # it at the top of the data path, where the same target resolves outside
    up = "/".join([".."] * 4)
    link = f"{up}{scene.outside}"
    info, _ = symlink(member(scene.app, "a", "b", "c", "d", "link"), link)
    info.pax_headers = {
        "GNU.sparse.name": member(scene.app, "link"),
        "path": member(scene.app, "a", "b", "c", "d", "link"),
    }
    before, result = refused_case(scene, [*ordinary(scene.app), (info, None)])

    assert_refused_untouched(scene, before, result, names="link")


# ---------------------------------------------------------------- tampered archives


def test_an_archive_that_does_not_match_its_manifest_is_not_restored(scene):
    archive_path = put_generation(
        scene.store, scene.app.data_dir, lambda path: write_archive(path, ordinary(scene.app))
    )
    # a different, well-formed archive of the same data path under the old manifest
    other = scene.tmp / "other.tar.zst"
    write_archive(other, [*ordinary(scene.app), file(member(scene.app, "backdoor"), b"x")])
    archive_path.write_bytes(other.read_bytes())
    before = observe(scene)

    result = scene.restore()

    assert_refused_untouched(scene, before, result, names="the manifest says")


def test_an_archive_with_a_flipped_byte_is_not_restored(scene):
    def make(path: Path) -> None:
        write_archive(
            path,
            [*ordinary(scene.app), file(member(scene.app, "big.txt"), b"line of text\n" * 20_000)],
        )

    archive_path = put_generation(scene.store, scene.app.data_dir, make)
    content = bytearray(archive_path.read_bytes())
    content[len(content) // 2] ^= 0x01
    archive_path.write_bytes(bytes(content))
    before = observe(scene)

    result = scene.restore()

    assert_refused_untouched(scene, before, result, names="the manifest says")


# ---------------------------------------------------------------- archives that restore


def make_tree(root: Path) -> None:
    """What a restore must bring back: contents, modes, numeric owners, mtimes (whole seconds:
    tarfile writes float mtimes), symbolic links inside, hard links, empty directories."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "dir" / "a.txt").write_text("alpha\n" * 1000)
    (root / "dir" / "sub" / "b.bin").write_bytes(os.urandom(50_000))
    os.chmod(root / "dir" / "a.txt", 0o640)
    os.chown(root / "dir" / "a.txt", 1234, 5678)
    os.link(root / "dir" / "a.txt", root / "hardlink")
    os.symlink("dir/a.txt", root / "symlink")
    os.symlink("does-not-exist", root / "dangling-inside")
    (root / "name with spaces").write_text("s")
    for directory, dirs, files in os.walk(root, topdown=False):
        for name in [*files, *dirs, "."]:
            os.utime(os.path.join(directory, name), ns=(MTIME * 10**9,) * 2, follow_symlinks=False)


def test_a_valid_crafted_archive_restores_the_tree_it_holds(scene, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    expected = snapshot(source)
    put_generation(
        scene.store, scene.app.data_dir, lambda path: archive_tree(path, source, member(scene.app))
    )
    before = observe(scene)

    result = scene.restore()

    assert result.returncode == 0, result.stderr
    assert snapshot(scene.app.data_dir) == expected
    assert not (scene.app.data_dir / STAGING).exists()
    assert not (scene.app.data_dir / REPLACED).exists()
    assert snapshot(scene.outside) == before.outside
    assert sorted(os.listdir(scene.app.data_dir.parent)) == before.parent
    assert scene.app.reload() == "running"
    assert scene.app.started_at() != before.started_at
    assert scene.mail.wait_for(1, timeout=0.5) == [], "a successful restore sends no alert"


def test_an_archive_of_the_agent_with_hard_linked_symbolic_links_restores(scene):
    # GNU tar archives a symlink with two names as a symlink and a hard link to it (a tree
    # copied with `cp -al` has these); such an archive is the agent's own and must restore.
    data = scene.app.data_dir
    os.symlink("victim/config.ini", data / "link-a")
    os.link(data / "link-a", data / "link-b", follow_symlinks=False)
    os.symlink(str(data / "victim"), data / "abs-a")
    os.link(data / "abs-a", data / "abs-b", follow_symlinks=False)
    expected = snapshot(data)
    backup = run_agent(scene.env, "source", "backup")
    assert backup.returncode == 0, backup.stderr
    (data / "live.db").write_bytes(b"changed after the backup")
    (data / "new-file").write_text("not in the backup")

    result = run_agent(scene.env, "restore", "--from", "handover")

    assert result.returncode == 0, result.stderr
    assert snapshot(data) == expected
    for a, b in (("link-a", "link-b"), ("abs-a", "abs-b")):
        assert os.lstat(data / a).st_ino == os.lstat(data / b).st_ino
        assert stat.S_ISLNK(os.lstat(data / b).st_mode)
    assert scene.app.reload() == "running"
