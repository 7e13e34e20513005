import subprocess
from pathlib import Path

import pytest

from agent import config
from agent.config import ConfigError, parse_label_selector, parse_source, read_values

ROOT = Path(__file__).resolve().parents[2]
VALID = {
    "SOURCE_ID": "shop-db",
    "DATA_PATHS": "/srv/data, /srv/uploads",
    "LOG_PATHS": "/srv/log",
    "HANDOVER_DIR": "/backup/handover",
}


def problems(values: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_source(values)
    return caught.value.problems


def test_valid_source_configuration_is_typed():
    cfg = parse_source({**VALID, "QUIESCE_MODE": "pause", "STOP_TIMEOUT": "30"})
    assert cfg.data_paths == (Path("/srv/data"), Path("/srv/uploads"))
    assert cfg.quiesce_mode == "pause" and cfg.stop_timeout == 30
    assert cfg.stop_label.docker_filter() == "backup.stop-during-backup=true"
    assert cfg.mail.security == "starttls"


def test_every_invalid_setting_is_reported_at_once():
    found = problems(
        {
            **VALID,
            "QUIESCE_MODE": "freeze",
            "STOP_TIMEOUT": "-1",
            "STOP_LABEL": "bad label",
            "DATA_PATHS": "relative/path",
            "COLLECT_MODE": "rsync",
        }
    )
    named = {p.split(":")[0] for p in found}
    assert named == {"QUIESCE_MODE", "STOP_TIMEOUT", "STOP_LABEL", "DATA_PATHS", "COLLECT_MODE"}
    assert any("stop, pause" in p for p in found)


def test_required_settings_are_named():
    named = {p.split(":")[0] for p in problems({})}
    assert {"SOURCE_ID", "DATA_PATHS"} <= named


@pytest.mark.parametrize(
    "paths, handover",
    [
        ("/srv/data,/srv/data/sub", "/backup"),
        ("/srv/data", "/srv/data/handover"),
        ("/srv", "/backup"),
    ],
)
def test_overlapping_paths_are_refused(paths, handover):
    values = {**VALID, "DATA_PATHS": paths, "LOG_PATHS": "/srv/log", "HANDOVER_DIR": handover}
    assert problems(values)


def test_alert_recipients_are_required_with_a_mail_server():
    assert any(p.startswith("ALERT_TO") for p in problems({**VALID, "SMTP_HOST": "mail"}))


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("backup.stop", "backup.stop", None),
        ("backup.stop-during-backup=true", "backup.stop-during-backup", "true"),
        ("com.example/app=db", "com.example/app", "db"),
    ],
)
def test_label_selectors(text, key, value):
    selector = parse_label_selector(text)
    assert (selector.key, selector.value) == (key, value)


@pytest.mark.parametrize("text", ["", "=x", "a b", "key=", "key=a b", "-key", "k=v=w"])
def test_malformed_label_selectors_are_refused(text):
    with pytest.raises(ValueError):
        parse_label_selector(text)


def test_file_secrets_replace_the_variable(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    assert read_values({"SMTP_PASSWORD_FILE": str(secret)})["SMTP_PASSWORD"] == "s3cret"


def test_variable_and_file_both_set_is_an_error(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("x")
    found = problems(
        read_values({**VALID, "SMTP_PASSWORD": "a", "SMTP_PASSWORD_FILE": str(secret)})
    )
    assert found == [
        "SMTP_PASSWORD: both SMTP_PASSWORD and SMTP_PASSWORD_FILE are set; set only one"
    ]


def test_missing_secret_file_is_an_error_not_an_empty_value(tmp_path):
    values = read_values({**VALID, "SMTP_PASSWORD_FILE": str(tmp_path / "missing")})
    assert "SMTP_PASSWORD" not in values
    assert [p.split(":")[0] for p in problems(values)] == ["SMTP_PASSWORD_FILE"]


def test_an_unreadable_secret_file_is_reported_with_every_other_problem(tmp_path):
    without_id = {k: v for k, v in VALID.items() if k != "SOURCE_ID"}
    values = read_values(
        {
            **without_id,
            "SOURCE_ID_FILE": str(tmp_path / "missing"),
            "ALERT_TO_FILE": str(tmp_path / "missing"),
            "SMTP_HOST": "mail",
            "QUIESCE_MODE": "freeze",
        }
    )
    named = [p.split(":")[0] for p in problems(values)]
    # SOURCE_ID and ALERT_TO are named once, for why they could not be read, not again as
    # "required" for the stand-in value
    assert named == ["SOURCE_ID_FILE", "ALERT_TO_FILE", "QUIESCE_MODE"]


def test_env_file_is_read_and_the_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("SOURCE_ID=from-file\nSTOP_TIMEOUT=20\n")
    values = read_values({"SOURCE_ID": "from-env"}, env_file)
    assert values == {"SOURCE_ID": "from-env", "STOP_TIMEOUT": "20"}


def test_secrets_are_masked_in_the_effective_configuration():
    rows = {name: shown for name, shown, _ in config.effective({"SMTP_PASSWORD": "hunter2"})}
    assert rows["SMTP_PASSWORD"] == "***"


def test_the_settings_page_table_matches_the_declarations():
    page = (ROOT / "docs" / "settings.md").read_text()
    assert config.markdown_table() in page, (
        "the settings table of docs/settings.md is out of date: paste "
        "`backup-agent config --markdown`"
    )


# ---------------------------------------------------------------- encryption at rest

AGE_PUBLIC = "age1zsxnvfyj0ygqknn0n0g98q8jfg0acp50yr8d3s0xn8km5vyaky9quhd4ll"
SSH_PUBLIC = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAyDDngXMRf+2XY+Zj9XqhzohtXGCbNafVu6y+jjMHL2 me@host"
)


def test_recipients_may_be_age_and_ssh_keys_separated_by_commas_or_lines(tmp_path):
    keys = tmp_path / "recipients.txt"
    keys.write_text(f"# the operators\n{AGE_PUBLIC}\n\n{SSH_PUBLIC}\n")
    cfg = parse_source({**VALID, **read_values({"ENCRYPT_RECIPIENTS_FILE": str(keys)})})
    assert len(cfg.encrypt_recipients) == 2 and not cfg.encrypt_logs
    cfg = parse_source(
        {**VALID, "ENCRYPT_RECIPIENTS": f"{AGE_PUBLIC}, {SSH_PUBLIC}", "ENCRYPT_LOGS": "true"}
    )
    assert len(cfg.encrypt_recipients) == 2 and cfg.encrypt_logs


def test_no_recipients_means_no_encryption():
    cfg = parse_source(VALID)
    assert cfg.encrypt_recipients == () and cfg.decrypt_identities == ()


@pytest.mark.parametrize(
    "text", ["age1notakey", "AGE-SECRET-KEY-1XYZ", "ssh-ed25519 AAAAbad", f"{AGE_PUBLIC},gpg:1234"]
)
def test_an_invalid_recipient_is_named(text):
    found = problems({**VALID, "ENCRYPT_RECIPIENTS": text})
    assert [p.split(":")[0] for p in found] == ["ENCRYPT_RECIPIENTS"]


def test_encrypted_logs_need_recipients():
    found = problems({**VALID, "ENCRYPT_LOGS": "true"})
    assert [p.split(":")[0] for p in found] == ["ENCRYPT_LOGS"]


def test_an_identity_file_is_read_and_checked_without_showing_the_key(tmp_path):
    key = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    cfg = parse_source({**VALID, **read_values({"DECRYPT_IDENTITY_FILE": str(key)})})
    assert len(cfg.decrypt_identities) == 1
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True
    )
    cfg = parse_source({**VALID, **read_values({"DECRYPT_IDENTITY_FILE": str(tmp_path / "id")})})
    assert len(cfg.decrypt_identities) == 1
    found = problems({**VALID, "DECRYPT_IDENTITY": "AGE-SECRET-KEY-1SECRETBUTWRONG"})
    assert [p.split(":")[0] for p in found] == ["DECRYPT_IDENTITY"]
    assert "SECRETBUTWRONG" not in found[0]
    assert (
        dict((n, v) for n, v, _ in config.effective({"DECRYPT_IDENTITY": key.read_text()}))[
            "DECRYPT_IDENTITY"
        ]
        == "***"
    )


def test_the_sink_reads_an_identity_for_verify(tmp_path):
    key = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    cfg = config.parse_sink({"SINK_SOURCES": "a=host", "DECRYPT_IDENTITY": key.read_text()})
    assert len(cfg.decrypt_identities) == 1


# ---------------------------------------------------------------- data format

PUSH = {**VALID, "S3_BUCKET": "backups"}


def test_a_push_site_stores_data_in_chunks_by_default():
    cfg = parse_source(PUSH)
    assert (cfg.data_format, cfg.pack_size) == ("chunks", 32 << 20)


def test_a_pull_site_stores_archives_unless_it_asks_for_chunks():
    assert parse_source(VALID).data_format == "archive"
    assert parse_source({**VALID, "DATA_FORMAT": "chunks"}).data_format == "chunks"


@pytest.mark.parametrize(
    "extra", [{"COLLECT_MODE": "direct"}, {"COLLECT_MODE": "direct", "S3_BUCKET": "backups"}]
)
def test_where_chunks_cannot_be_used_an_unset_data_format_means_archive(extra):
    assert parse_source({**VALID, **extra}).data_format == "archive"


def test_chunks_asked_for_where_it_cannot_be_used_is_refused():
    with pytest.raises(
        ConfigError, match=r"DATA_FORMAT: chunks needs COLLECT_MODE=mirror.*DATA_FORMAT=archive"
    ):
        parse_source({**VALID, "DATA_FORMAT": "chunks", "COLLECT_MODE": "direct"})


def test_an_unknown_data_format_or_pack_size_is_refused_naming_the_setting():
    with pytest.raises(ConfigError) as error:
        parse_source({**PUSH, "DATA_FORMAT": "tar", "PACK_SIZE_MB": "2"})
    assert "DATA_FORMAT: 'tar' is not allowed" in str(error.value)
    assert "PACK_SIZE_MB: '2' is not allowed" in str(error.value)


def test_the_encryption_domain_follows_the_recipients_not_their_spelling():
    one = parse_source({**PUSH, "ENCRYPT_RECIPIENTS": f"{AGE_PUBLIC}, {SSH_PUBLIC}"})
    same = parse_source({**PUSH, "ENCRYPT_RECIPIENTS": f"# ops\n{SSH_PUBLIC}\n{AGE_PUBLIC}\n"})
    other = parse_source({**PUSH, "ENCRYPT_RECIPIENTS": AGE_PUBLIC})
    assert one.encryption_domain == same.encryption_domain != other.encryption_domain
    assert parse_source(PUSH).encryption_domain == ""
