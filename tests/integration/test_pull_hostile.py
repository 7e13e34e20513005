"""A hostile source: the real sshd, gateway and rrsync serve generations crafted so that the
sink would store, verify or acknowledge what is not a regular file of the generation, or
read more than it can hold. Nothing of it may reach the sink store or be acknowledged."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.core import archive, manifest
from agent.core.manifest import FileEntry, Manifest
from tests.conftest import run_agent
from tests.generations import SOURCE, seal, write_generation
from tests.integration.test_pull import GEN1, GEN2, MiB, Site, sink_env, site  # noqa: F401 (a fixture)
from tests.sshd import share_tree

ARCHIVE = archive.ARCHIVE_NAME


def write_manifest(directory: Path, kind: str, gen: str, files: dict[str, Path]) -> None:
    """A manifest listing `files` (manifest path → the file whose size and sha256 it gives),
    as a hostile source writes it for entries that are not what they claim to be."""
    entries = []
    for name, real in sorted(files.items()):
        digest = archive.hash_file(real)
        entries.append(FileEntry(name, digest.size, digest.sha256))
    manifest.write(
        directory,
        Manifest(
            source_id=SOURCE,
            kind=kind,
            generation=gen,
            created_at=gen,
            downtime_seconds=0.1,
            agent_version="hostile",
            files=tuple(entries),
        ),
    )


def assert_refused(
    site: Site, result: subprocess.CompletedProcess[str], kind: str, gen: str, *words: str
) -> str:
    """The pull failed at verification with an alert naming `words`; nothing was stored or
    acknowledged. Return the alert's error line."""
    assert result.returncode == 1, result.stderr
    [mail] = site.mail.wait_for(1)
    assert f"failed at verify {kind} generation {gen} of {SOURCE}" in mail["Subject"], mail[
        "Subject"
    ]
    [error] = [line for line in mail.get_content().splitlines() if line.startswith("Error: ")]
    for word in words:
        assert word in error, error
    assert site.stored(kind) == []
    assert gen in site.waiting(kind)
    assert site.in_source_store(kind) == []
    return error


def other_sources_archive(site: Site) -> Path:
    """A generation of another source in the same sink store, as a pull of it left it."""
    directory = write_generation(
        site.sink_store / "other-source",
        "data",
        GEN1,
        {ARCHIVE: os.urandom(50_000)},
        source="other-source",
    )
    return directory / ARCHIVE


# ---------------------------------------------------------------- 6. symbolic links


def test_a_data_generation_with_symbolic_links_beside_its_files_is_refused(site):
    directory = site.offer("data", GEN1, {ARCHIVE: os.urandom(50_000)})
    os.symlink("/etc/passwd", directory / "passwd")
    os.symlink(site.sink_store, directory / "sink-store")
    share_tree(site.handover)

    result = site.pull("data")

    assert_refused(site, result, "data", GEN1, "symbolic link", "passwd")
    assert not (site.sink_store / ".incoming" / SOURCE / "data" / GEN1 / "passwd").exists()


def test_an_archive_that_is_a_link_to_another_sources_archive_is_refused(site):
    theirs = other_sources_archive(site)
    directory = site.handover / "data" / GEN2
    directory.mkdir(parents=True)
    os.symlink(theirs, directory / ARCHIVE)
    write_manifest(directory, "data", GEN2, {ARCHIVE: theirs})
    share_tree(site.handover)

    result = site.pull("data")

    assert_refused(site, result, "data", GEN2, ARCHIVE, "not a regular file")


@pytest.mark.parametrize("kind", ["data", "logs"])
def test_a_listed_file_below_a_directory_link_is_refused(site, gateway_tmp_path, kind):
    outside = gateway_tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(os.urandom(10_000))
    share_tree(outside)
    directory = site.handover / kind / GEN1
    directory.mkdir(parents=True)
    os.symlink(outside, directory / "dir")
    write_manifest(directory, kind, GEN1, {"dir/file": outside / "file"})
    share_tree(site.handover)

    result = site.pull(kind)

    assert_refused(site, result, kind, GEN1, "dir/file")


def test_a_log_that_is_a_link_to_a_file_outside_the_generation_is_refused(site):
    theirs = other_sources_archive(site)
    directory = site.handover / "logs" / GEN1
    (directory / "var/log").mkdir(parents=True)
    os.symlink(theirs, directory / "var/log/app.log")
    write_manifest(directory, "logs", GEN1, {"var/log/app.log": theirs})
    share_tree(site.handover)

    result = site.pull("logs")

    assert_refused(site, result, "logs", GEN1, "var/log/app.log")


def test_the_symbolic_links_of_an_honest_log_generation_are_left_out(site):
    # `source backup` copies the log paths with their links; its manifest lists the files
    directory = site.offer("logs", GEN1, {"var/log/app.log": b"line\n" * 100})
    os.symlink("app.log", directory / "var/log/current.log")
    os.symlink("/var/log", directory / "var/log/system")
    seal(directory, GEN1, "logs")
    share_tree(site.handover)

    result = site.pull("logs")

    assert result.returncode == 0, result.stderr
    stored = site.sink_store / SOURCE / "logs" / GEN1
    assert sorted(os.listdir(stored / "var/log")) == ["app.log"]
    assert (stored / "var/log/app.log").read_bytes() == b"line\n" * 100
    assert site.waiting("logs") == []
    assert site.mail.messages == []


@pytest.mark.parametrize("link", ["the archive", "a directory above the file"])
def test_verify_never_follows_a_link_in_a_stored_generation(site, link):
    write_generation(site.sink_store / SOURCE, "data", GEN1, {ARCHIVE: os.urandom(50_000)})
    theirs = other_sources_archive(site)  # what a sink without this check stored as GEN2:
    directory = site.sink_store / SOURCE / "data" / GEN2
    directory.mkdir(parents=True)
    if link == "the archive":
        os.symlink(theirs, directory / ARCHIVE)
        write_manifest(directory, "data", GEN2, {ARCHIVE: theirs})
    else:
        os.symlink(theirs.parent, directory / "dir")
        write_manifest(directory, "data", GEN2, {f"dir/{ARCHIVE}": theirs})

    result = run_agent(site.env, "verify", "--all", "--role", "sink", timeout=60)

    assert result.returncode == 1, result.stderr
    assert any(
        f"{SOURCE}/data/{GEN2}" in line and "symbolic link" in line
        for line in result.stderr.splitlines()
    ), result.stderr
    assert "1 generation(s) verified, 1 failed" in result.stderr  # GEN1 all the same


# ---------------------------------------------------------------- 9. bounded reads


def hostile_gateway(
    site: Site, sshd_server, gateway_agent, gateway_tmp_path: Path, answer_list: str
) -> dict[str, str]:
    """Another sshd for the same handover whose forced command answers `list` with the shell
    command `answer_list` and hands everything else to the real gateway. Return the sink's
    settings for it."""
    script = gateway_tmp_path / "hostile-gateway"
    gateway = gateway_agent.command("--env-file", gateway_tmp_path / "gateway.env", "gateway")
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$SSH_ORIGINAL_COMMAND" = list ]; then {answer_list}; '
        f"else exec {gateway}; fi\n"
    )
    script.chmod(0o755)
    hostile = sshd_server(str(script), env_file=gateway_tmp_path / "gateway.env")
    return {**site.env, **sink_env(site.sink_store, hostile, site.key, site.cert, site.mail)}


def test_a_manifest_larger_than_the_bound_is_refused_before_it_travels(
    site, sshd_server, gateway_agent, gateway_tmp_path
):
    directory = site.offer("data", GEN1, {ARCHIVE: os.urandom(50_000)})
    with open(directory / manifest.NAME, "a") as handle:  # still valid JSON
        handle.write(" " * (manifest.MAX_SIZE + MiB))
    share_tree(site.handover)
    env = hostile_gateway(
        site, sshd_server, gateway_agent, gateway_tmp_path, f'echo \'[{{"generation": "{GEN1}"}}]\''
    )

    result = run_agent(env, "sink", "pull-data", timeout=60)

    assert result.returncode == 1, result.stderr
    [mail] = site.mail.wait_for(1)
    assert f"failed at 2.a fetch data generation {GEN1}" in mail["Subject"], mail["Subject"]
    assert f"larger than {manifest.MAX_SIZE} bytes" in mail.get_content()
    incoming = site.sink_store / ".incoming"
    assert [p for p in incoming.rglob("*") if p.is_file() and p.stat().st_size > MiB] == []
    assert site.stored("data") == [] and site.waiting("data") == [GEN1]
    assert site.in_source_store() == []


def test_a_list_larger_than_the_bound_is_refused(
    site, sshd_server, gateway_agent, gateway_tmp_path
):
    env = hostile_gateway(
        site,
        sshd_server,
        gateway_agent,
        gateway_tmp_path,
        "head -c 67108864 /dev/zero | tr '\\0' ' '; echo '[]'",
    )

    result = run_agent(env, "sink", "pull-data", timeout=60)

    assert result.returncode == 1, result.stderr
    [mail] = site.mail.wait_for(1)
    assert "failed at list the data generations" in mail["Subject"], mail["Subject"]
    assert "more than" in mail.get_content() and "`list`" in mail.get_content()
