"""The sshd fixture itself: only a certificate from the trusted CA, valid now, for the user's
principal, to a server whose host key the client pinned, reaches the forced command."""

from __future__ import annotations

import subprocess

import pytest

from tests.sshd import SshCA, make_client_key, make_shared_dir, share_tree

ECHO = '/bin/echo "gateway-got: $SSH_ORIGINAL_COMMAND"'


@pytest.fixture
def echo_server(sshd_server):
    return sshd_server(ECHO)


@pytest.fixture
def client_key(gateway_tmp_path):
    return make_client_key(gateway_tmp_path / "client")


def assert_refused(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 255, result
    assert "gateway-got" not in result.stdout


def test_a_certificate_for_the_users_principal_reaches_the_forced_command(
    echo_server, ssh_ca, client_key
):
    cert = ssh_ca.sign(client_key, "dataBackupSource", identity="sink-test")

    result = echo_server.ssh("dataBackupSource", client_key, cert, "hello")

    assert result.returncode == 0, (result, echo_server.log())
    assert result.stdout == "gateway-got: hello\n"
    assert echo_server.wait_for_log("ED25519-CERT SHA256:") and "ID sink-test" in echo_server.log()


def test_the_forced_command_runs_as_the_user_with_the_env_from_the_fixture(
    sshd_server, ssh_ca, client_key
):
    server = sshd_server(
        'echo "$(id -un) $GATEWAY_TEST_VAR $SSH_ORIGINAL_COMMAND"',
        env={"GATEWAY_TEST_VAR": "from sshd"},
    )
    cert = ssh_ca.sign(client_key, "logBackupSource")

    result = server.ssh("logBackupSource", client_key, cert, "list")

    assert result.returncode == 0, (result, server.log())
    assert result.stdout == "logBackupSource from sshd list\n"


def test_an_expired_certificate_is_refused(echo_server, ssh_ca, client_key):
    cert = ssh_ca.sign_expired(client_key, "dataBackupSource")

    assert_refused(echo_server.ssh("dataBackupSource", client_key, cert, "hello"))
    assert echo_server.wait_for_log("Certificate invalid: expired")


def test_a_certificate_for_another_principal_is_refused(echo_server, ssh_ca, client_key):
    cert = ssh_ca.sign(client_key, "logBackupSource")

    assert_refused(echo_server.ssh("dataBackupSource", client_key, cert, "hello"))
    assert echo_server.wait_for_log("Certificate does not contain an authorized principal")


def test_a_certificate_from_another_ca_is_refused(echo_server, gateway_tmp_path, client_key):
    other_ca = SshCA(gateway_tmp_path / "other-ca")
    cert = other_ca.sign(client_key, "dataBackupSource")

    assert_refused(echo_server.ssh("dataBackupSource", client_key, cert, "hello"))
    assert "Accepted certificate" not in echo_server.log()


def test_a_plain_key_without_certificate_is_refused(echo_server, client_key):
    assert_refused(echo_server.ssh("dataBackupSource", client_key, None, "hello"))
    assert echo_server.wait_for_log("Failed publickey for dataBackupSource from 127.0.0.1")


def test_a_user_other_than_the_gateway_users_is_refused(echo_server, ssh_ca, client_key):
    cert = ssh_ca.sign(client_key, "root")

    assert_refused(echo_server.ssh("root", client_key, cert, "hello"))
    assert echo_server.wait_for_log("not listed in AllowUsers")


def test_a_wrong_host_key_is_refused(echo_server, ssh_ca, client_key, gateway_tmp_path):
    impostor = make_client_key(gateway_tmp_path / "impostor")
    wrong = gateway_tmp_path / "known_hosts.wrong"
    key_line = " ".join(impostor.public.read_text().split()[:2])
    wrong.write_text(f"[127.0.0.1]:{echo_server.port} {key_line}\n")
    cert = ssh_ca.sign(client_key, "dataBackupSource")

    result = echo_server.ssh("dataBackupSource", client_key, cert, "hello", known_hosts=wrong)

    assert_refused(result)
    assert (
        "HOST IDENTIFICATION HAS CHANGED" in result.stderr or "verification failed" in result.stderr
    )


def test_rsync_over_the_server_reads_a_shared_directory_as_the_user(
    sshd_server, ssh_ca, client_key, gateway_tmp_path
):
    shared = make_shared_dir(gateway_tmp_path / "handover")
    (shared / "gen").mkdir()
    (shared / "gen" / "file").write_text("payload")
    (shared / "gen" / "secret").write_text("root only")
    share_tree(shared)
    (shared / "gen" / "secret").chmod(0o600)
    server = sshd_server("exec $SSH_ORIGINAL_COMMAND")  # a stand-in for the gateway
    cert = ssh_ca.sign(client_key, "dataBackupSource")
    target = gateway_tmp_path / "pulled"

    result = subprocess.run(
        [
            "rsync",
            "-r",
            "--rsh",
            server.rsync_rsh(client_key, cert),
            f"dataBackupSource@127.0.0.1:{shared}/gen/",
            f"{target}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert (target / "file").read_text() == "payload"
    assert not (target / "secret").exists()  # it really ran as dataBackupSource
    assert result.returncode == 23, result  # "some files could not be transferred"


def test_the_gateway_agent_runs_as_the_gateway_users(
    sshd_server, ssh_ca, client_key, gateway_agent
):
    server = sshd_server(gateway_agent.command("--version"))
    cert = ssh_ca.sign(client_key, "dataBackupSource")

    result = server.ssh("dataBackupSource", client_key, cert)

    assert result.returncode == 0, (result, server.log())
    assert result.stdout.startswith("backup-agent ")


def test_a_certificate_bound_to_another_source_address_is_refused(echo_server, ssh_ca, client_key):
    bound_elsewhere = ssh_ca.sign(client_key, "dataBackupSource", source_address="192.0.2.7/32")
    bound_here = ssh_ca.sign(client_key, "dataBackupSource", source_address="127.0.0.1/32")

    assert_refused(echo_server.ssh("dataBackupSource", client_key, bound_elsewhere, "hello"))
    assert (
        echo_server.ssh("dataBackupSource", client_key, bound_here, "hi").stdout
        == "gateway-got: hi\n"
    )
