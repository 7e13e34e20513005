"""MemberPolicy: which archive members a restore unpacks. Pure: names, kinds and link targets
in archive order, as the tar header checker hands them over."""

from __future__ import annotations

import pytest

from agent.core.members import MemberPolicy, UnsafeMember

ROOT = "srv/app"


def policy(*roots: str) -> MemberPolicy:
    return MemberPolicy(list(roots or [ROOT]))


def refused(p: MemberPolicy, name: str, kind: str = "file", link: str = "") -> str:
    with pytest.raises(UnsafeMember) as caught:
        p.check(name, kind, link)
    assert repr(name) in str(caught.value) or repr(name.rstrip("/")) in str(caught.value), (
        "the message names the member"
    )
    return str(caught.value)


# ---------------------------------------------------------------- names


def test_members_of_a_data_path_are_allowed():
    p = policy()
    p.check("srv/app/", "dir")
    p.check("srv/app/sub/", "dir")
    p.check("srv/app/sub/file.txt", "file")
    p.check("srv/app/empty", "file")


def test_the_data_path_itself_is_allowed_with_or_without_a_trailing_slash():
    policy().check("srv/app", "dir")
    policy().check("srv/app/", "dir")


def test_members_of_every_data_path_are_allowed():
    p = policy("srv/app", "var/lib/db")
    p.check("srv/app/a", "file")
    p.check("var/lib/db/b", "file")


def test_an_absolute_name_is_refused():
    assert "absolute" in refused(policy(), "/srv/app/file")


def test_an_absolute_name_outside_is_refused():
    refused(policy(), "/etc/passwd")


@pytest.mark.parametrize(
    "name",
    [
        "srv/app/../../etc/passwd",
        "srv/app/sub/../../../etc/cron.d/x",
        "srv/app/..",
        "../srv/app/file",
        "srv/app/sub/../file",  # even a climb that stays inside
    ],
)
def test_a_name_with_dot_dot_is_refused(name):
    assert "`..`" in refused(policy(), name)


def test_a_name_with_an_empty_component_is_refused():
    refused(policy(), "srv/app//file")


def test_a_name_with_a_nul_byte_is_refused():
    refused(policy(), "srv/app/fi\0le")


@pytest.mark.parametrize("name", ["etc/passwd", "srv/other/file", "srv", "srv/", "x"])
def test_a_name_outside_the_data_paths_is_refused(name):
    assert "outside the generation's data paths" in refused(policy(), name)


def test_a_sibling_that_shares_the_data_paths_prefix_is_outside():
    refused(policy(), "srv/application/file")
    refused(policy(), "srv/app2")


def test_a_name_starting_with_dot_slash_is_refused():
    refused(policy(), "./srv/app/file")


# ---------------------------------------------------------------- kinds


@pytest.mark.parametrize("name", ["srv/app/null", "srv/app/sda"])
def test_a_device_node_is_refused(name):
    assert "device" in refused(policy(), name, "device")


def test_a_fifo_is_allowed():
    policy().check("srv/app/queue", "fifo")


def test_a_fifo_outside_is_refused():
    refused(policy(), "tmp/queue", "fifo")


# ---------------------------------------------------------------- hard links


def test_a_hard_link_to_an_earlier_file_is_allowed():
    p = policy()
    p.check("srv/app/a", "file")
    p.check("srv/app/b", "hardlink", "srv/app/a")


def test_a_hard_link_to_an_earlier_hard_link_is_allowed():
    p = policy()
    p.check("srv/app/a", "file")
    p.check("srv/app/b", "hardlink", "srv/app/a")
    p.check("srv/app/c", "hardlink", "srv/app/b")


def test_a_hard_link_to_a_later_member_is_refused():
    p = policy()
    assert "not an earlier file" in refused(p, "srv/app/b", "hardlink", "srv/app/a")
    p.check("srv/app/a", "file")  # too late


@pytest.mark.parametrize(
    "link",
    ["etc/shadow", "/etc/shadow", "/srv/app/a", "srv/app/../../etc/shadow", "../../etc/shadow"],
)
def test_a_hard_link_to_a_path_outside_or_not_in_the_archive_is_refused(link):
    p = policy()
    p.check("srv/app/a", "file")
    refused(p, "srv/app/b", "hardlink", link)


def test_a_hard_link_to_a_directory_is_refused():
    p = policy()
    p.check("srv/app/dir/", "dir")
    refused(p, "srv/app/b", "hardlink", "srv/app/dir")


def test_a_hard_link_to_a_refused_member_is_refused():
    p = policy()
    with pytest.raises(UnsafeMember):
        p.check("etc/shadow", "file")
    refused(p, "srv/app/b", "hardlink", "etc/shadow")


def test_a_hard_link_placed_outside_is_refused():
    p = policy()
    p.check("srv/app/a", "file")
    refused(p, "etc/a", "hardlink", "srv/app/a")


def test_a_hard_link_to_an_earlier_symbolic_link_is_allowed():
    # GNU tar archives a hard-linked symlink (cp -al of a tree with symlinks) as a symlink
    # member and a hard link to it: the agent's own archives hold these.
    p = policy()
    p.check("srv/app/s2", "symlink", "target")
    p.check("srv/app/s", "hardlink", "srv/app/s2")


def test_writing_through_a_hard_link_to_a_symbolic_link_is_refused():
    p = policy()
    p.check("srv/app/sub/", "dir")
    p.check("srv/app/link", "symlink", "sub")
    p.check("srv/app/other", "hardlink", "srv/app/link")
    assert "through the symbolic link" in refused(p, "srv/app/other/file")


# ---------------------------------------------------------------- symbolic links


@pytest.mark.parametrize(
    "link",
    [
        "sub/file",
        "file",
        "./file",
        "sub/../file",
        "..",
        "/srv/app",
        "/srv/app/sub/file",
        "../app/file",
    ],
)
def test_a_symbolic_link_inside_the_data_paths_is_allowed(link):
    policy().check("srv/app/sub/link", "symlink", link)


def test_a_dangling_symbolic_link_inside_the_data_paths_is_allowed():
    policy().check("srv/app/link", "symlink", "does/not/exist")


@pytest.mark.parametrize(
    "link",
    [
        "/etc/passwd",
        "/",
        "/srv",
        "/srv/application/x",
        "/srv/app/../other",
        "/data/releases/v2",
        "/nonexistent/target",
    ],
)
def test_an_absolute_symbolic_link_outside_the_data_paths_is_allowed(link):
    # an app's own links (/data/current -> /data/releases/v2, made inside its container) point
    # outside the host-side data path; tar, restic and borg restore them as they were
    policy().check("srv/app/link", "symlink", link)


@pytest.mark.parametrize(
    "link", ["..", "../..", "../../../etc/passwd", "../other/x", "sub/../../x", "../app2"]
)
def test_a_relative_symbolic_link_outside_the_data_paths_is_allowed(link):
    policy().check("srv/app/link", "symlink", link)


def test_a_symbolic_link_into_another_data_path_is_allowed():
    policy("srv/app", "var/lib/db").check("srv/app/link", "symlink", "/var/lib/db/x")


@pytest.mark.parametrize("link", ["", "a\0b"])
def test_an_empty_symbolic_link_or_one_with_a_nul_byte_is_refused(link):
    assert "empty symbolic link" in refused(policy(), "srv/app/link", "symlink", link)


def test_a_symbolic_link_placed_outside_is_refused_whatever_its_target():
    refused(policy(), "etc/link", "symlink", "/srv/app/x")


def test_unsafe_members_beside_outside_symbolic_links_are_still_refused():
    p = policy()
    p.check("srv/app/abs", "symlink", "/etc/passwd")
    refused(p, "/srv/app/x")
    refused(p, "srv/app/../x")
    refused(p, "srv/app/null", "device")
    refused(p, "srv/app/h", "hardlink", "/etc/shadow")


# ---------------------------------------------------------------- writing through a link


def test_a_member_written_through_a_symbolic_link_is_refused():
    p = policy()
    p.check("srv/app/sub/", "dir")
    p.check("srv/app/link", "symlink", "sub")  # inside: allowed
    message = refused(p, "srv/app/link/file")
    assert "through the symbolic link 'srv/app/link'" in message


def test_a_member_written_deeper_through_a_symbolic_link_is_refused():
    p = policy()
    p.check("srv/app/link", "symlink", "/srv/app/sub")
    refused(p, "srv/app/link/a/b/c", "file")
    refused(p, "srv/app/link/d/", "dir")
    refused(p, "srv/app/link/s", "symlink", "x")


def test_a_member_written_through_a_symbolic_link_with_dot_components_is_refused():
    p = policy()
    p.check("srv/app/link", "symlink", "/srv/app/sub")
    refused(p, "srv/app/./link/file")


def test_writing_through_a_symbolic_link_pointing_outside_is_refused():
    p = policy()
    p.check("srv/app/link", "symlink", "/etc")
    assert "through the symbolic link" in refused(p, "srv/app/link/cron.d/x")


def test_a_data_path_that_is_a_symbolic_link_is_not_written_through():
    p = policy()
    p.check("srv/app", "symlink", "/elsewhere")
    refused(p, "srv/app/file")


def test_a_sibling_named_like_the_link_is_not_through_it():
    p = policy()
    p.check("srv/app/link", "symlink", "sub")
    p.check("srv/app/link2/file", "file")
    p.check("srv/app/linkfile", "file")
