"""What the sink says when the source refuses it, and what the gateway tells the SSH client:
against a real sshd with a user CA, certificates made by ssh-keygen and the real gateway."""

from __future__ import annotations

import subprocess

import pytest

from tests.generations import SOURCE
from tests.integration.test_pull import (
    DATA_USER,
    GEN1,
    LOG_USER,
    Site,
    site,  # noqa: F401 (a fixture)
)
from tests.sshd import SshCA, make_client_key, share_tree

USERS = [DATA_USER, LOG_USER]


def alert_error(site: Site, result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [mail] = site.mail.wait_for(1)
    assert f"{SOURCE}: sink pull-data failed at list the data generations" in mail["Subject"]
    [error] = [
        line.removeprefix("Error: ")
        for line in mail.get_content().splitlines()
        if line.startswith("Error: ")
    ]
    return error


# ---------------------------------------------------------------- 13. refused certificates


CERTIFICATES = {
    "expired": (lambda ca, key, tmp: ca.sign_expired(key, USERS), "expired on 2020-01-02"),
    "not yet valid": (
        lambda ca, key, tmp: ca.sign(key, USERS, validity="+1d:+2d"),
        "not valid before",
    ),
    "another principal": (
        lambda ca, key, tmp: ca.sign(key, ["someoneElse"]),
        f"no principal {DATA_USER} (it names someoneElse)",
    ),
    "another CA": (
        lambda ca, key, tmp: SshCA(tmp / "other-ca").sign(key, USERS),
        "TrustedUserCAKeys",
    ),
    "another source address": (
        lambda ca, key, tmp: ca.sign(key, USERS, source_address="192.0.2.10/32"),
        "only from 192.0.2.10/32",
    ),
}


@pytest.mark.parametrize("case", CERTIFICATES)
def test_a_refused_certificate_is_reported_as_refused_with_what_to_check(
    site, ssh_ca, gateway_tmp_path, case
):
    make, finding = CERTIFICATES[case]
    cert = make(ssh_ca, site.key, gateway_tmp_path)

    error = alert_error(site, site.pull("data", SINK_SSH_CERT=str(cert)))

    assert "cannot reach" not in error, error
    assert "refused the sink's certificate" in error, error
    assert finding in error, error
    assert f"ssh-keygen -L -f {cert}" in error, error
    for check in ("Valid", "Principals", "Signing CA", "source-address"):
        assert check in error, error


def test_a_plain_key_where_the_certificate_belongs_is_named_as_such(site):
    error = alert_error(site, site.pull("data", SINK_SSH_CERT=str(site.key.public)))

    assert f"{site.key.public} is not a certificate" in error, error


def test_a_changed_host_key_is_reported_as_a_possible_attack(site, tmp_path):
    other = make_client_key(tmp_path / "impostor", "host_key")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        f"[127.0.0.1]:{site.server.port} {' '.join(other.public.read_text().split()[:2])}\n"
    )

    error = alert_error(site, site.pull("data", SINK_KNOWN_HOSTS=str(known_hosts)))

    assert "man-in-the-middle" in error, error
    assert "out of band" in error and "SINK_KNOWN_HOSTS" in error, error


def test_an_empty_certificate_file_fails_the_configuration_check(site, tmp_path):
    empty = tmp_path / "sink_ssh_key-cert.pub"
    empty.write_text("")
    site.offer("data", GEN1, {"data.tar.zst": b"payload"})

    result = site.pull("data", SINK_SSH_CERT=str(empty))

    assert result.returncode == 2, result.stderr
    assert f"SINK_SSH_CERT: {empty} is empty" in result.stderr, result.stderr
    assert site.mail.messages == [] and site.waiting("data") == [GEN1]


# ---------------------------------------------------------------- 13. the gateway's lines


def test_the_gateway_never_tells_the_client_the_sources_paths(site):
    site.offer("data", GEN1, {"data.tar.zst": b"payload"})
    for name in ("junk", "2026-11-09T00-00-00Z"):  # not a generation; no manifest yet
        (site.handover / "data" / name).mkdir()
    site.source_store.chmod(0o755)  # the ack cannot move the generation
    share_tree(site.handover)

    listed, acked = site.ssh(DATA_USER, "list"), site.ssh(DATA_USER, "ack", GEN1)

    assert listed.returncode == 0 and GEN1 in listed.stdout, listed
    assert acked.returncode == 1, acked
    said = listed.stdout + listed.stderr + acked.stdout + acked.stderr
    for path in (site.handover, site.source_store):
        assert str(path) not in said, said
    assert "data/junk" in listed.stderr and "data/2026-11-09T00-00-00Z" in listed.stderr
    assert "SOURCE_STORE_DIR" in acked.stderr and "Permission denied" in acked.stderr
