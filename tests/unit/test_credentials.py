"""Credentials: read from a file or the environment, refused when insecure, never printed."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest
import structlog

from diana.clients import faust_broker_settings, kafka_settings, opensearch_auth
from diana.config import ConfigError, load_config
from diana.credentials import CredentialError, redact, redact_url, remember_secret, secret_value
from diana.logs import configure_logging

SASL = {
    "DIANA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "DIANA_KAFKA_SASL_USERNAME": "diana-services",
    "DIANA_KAFKA_SASL_PASSWORD": "kafka-secret-0123456789",
}


def test_redact_url_hides_the_password_but_keeps_user_and_host():
    assert redact_url("https://admin:s3cr3t-pass@search.example:9200/x") == "https://admin:***@search.example:9200/x"
    assert redact_url("kafka://127.0.0.1:9092") == "kafka://127.0.0.1:9092"
    assert redact("failed at http://u:p4ssw0rd-long@h/ and https://v:other@h2") == (
        "failed at http://u:***@h/ and https://v:***@h2"
    )
    assert redact_url("import into http://admin:Sup3r@S3cret@127.0.0.1:6 failed") == (
        "import into http://admin:***@127.0.0.1:6 failed"
    )
    # An "@" in a query is no password's end: the URL is left alone.
    assert redact_url("posted to https://hooks.example.org:8443?to=ops@example.org") == (
        "posted to https://hooks.example.org:8443?to=ops@example.org"
    )


def test_a_remembered_password_is_hidden_anywhere_in_a_text():
    remember_secret("unit-test-password-42")
    assert (
        redact("KafkaError: login as x with unit-test-password-42 failed") == "KafkaError: login as x with *** failed"
    )
    remember_secret("short")  # too short to hide safely: ordinary words must survive redaction
    assert redact("a short text") == "a short text"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_password_with_quotes_backslashes_or_accents_is_hidden_as_the_renderer_escapes_it(monkeypatch, fmt):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", fmt)
    secrets = ['Secr"et\\Pass1', "Pässwört12345", "it's-a-secret-9", "Secr\\etPass2"]
    try:
        for secret in secrets:
            remember_secret(secret)
            structlog.get_logger("t").info("connect", detail=secret, listed=[secret], shown=str({"password": secret}))
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    out = stream.getvalue()
    assert out.count("connect") == 4
    for secret in secrets:
        escaped = [secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], "P\\u00e4ssw", "Secr\\\\etP", "Secr\\etP"]
        assert not any(form in out for form in escaped), (secret, out)


def test_dicomweb_secrets_are_masked_like_the_other_passwords(tmp_path: Path):
    from diana.access.dicomweb.auth import credentials_from
    from diana.config import DicomWebConfig

    (tmp_path / "token").write_text("web-bearer-token-0123\n")
    (tmp_path / "password").write_text("web-basic-password-0123\n")
    credentials_from(
        DicomWebConfig(
            bearer_token_file=str(tmp_path / "token"),
            basic_user="viewer",
            basic_password_file=str(tmp_path / "password"),
        )
    )
    assert redact("token web-bearer-token-0123, password web-basic-password-0123") == "token ***, password ***"
    with pytest.raises(ConfigError, match="names no file") as refused:
        credentials_from(DicomWebConfig(bearer_token_file="MyBearerT0kenValue"))
    assert "MyBearerT0kenValue" not in str(refused.value)


def test_secret_value_reads_a_file_and_says_which_file_is_wrong(tmp_path: Path):
    good = tmp_path / "pw"
    good.write_text("from-a-file-password\n")
    assert secret_value("kafka", "sasl_password", "", str(good)) == "from-a-file-password"
    assert redact("x from-a-file-password y") == "x *** y"
    with pytest.raises(CredentialError, match=r"sasl_password_file names no file .*DIANA_KAFKA_SASL_PASSWORD"):
        secret_value("kafka", "sasl_password", "", str(tmp_path / "missing"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(CredentialError, match=r"sasl_password_file .*folder cannot be read"):
        secret_value("kafka", "sasl_password", "", str(tmp_path / "folder"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CredentialError, match="is empty"):
        secret_value("kafka", "sasl_password", "", str(tmp_path / "empty"))
    (tmp_path / "short").write_text("abc123\n")
    with pytest.raises(CredentialError, match="at least 8 characters"):
        secret_value("kafka", "sasl_password", "", str(tmp_path / "short"))
    with pytest.raises(CredentialError, match="not both"):
        secret_value("kafka", "sasl_password", "value-and-file-both", str(good))


def test_every_log_line_is_redacted(monkeypatch: pytest.MonkeyPatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", "json")
    try:
        remember_secret("logged-by-mistake-123")
        structlog.get_logger("t").info("connect", url="https://u:in-a-url-pw@h:9200", detail="logged-by-mistake-123")
        logging.getLogger("diana.kafka").error("SASL authentication with logged-by-mistake-123 failed")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    out = stream.getvalue()
    assert "connect" in out and "SASL authentication" in out
    assert "logged-by-mistake-123" not in out and "in-a-url-pw" not in out
    assert "https://u:***@h:9200" in out


def test_sasl_ssl_settings_reach_every_kafka_client_and_faust():
    cfg = load_config(None, environ={**SASL, "DIANA_KAFKA_SSL_CA_FILE": "/etc/diana/ca.pem"})
    settings = kafka_settings(cfg.kafka, {"group.id": "g"})
    assert settings["security.protocol"] == "SASL_SSL"
    assert settings["sasl.mechanism"] == "SCRAM-SHA-512"
    assert settings["sasl.username"] == "diana-services"
    assert settings["sasl.password"] == "kafka-secret-0123456789"
    assert settings["ssl.ca.location"] == "/etc/diana/ca.pem"
    assert settings["group.id"] == "g"
    assert "kafka-secret-0123456789" not in repr(cfg)  # config dumps leave the password out
    plain = kafka_settings(load_config(None, environ={}).kafka)
    assert "security.protocol" not in plain and "sasl.password" not in plain


def test_faust_gets_scram_credentials_with_a_verifying_tls_context(tmp_path: Path):
    import ssl

    import faust

    ca = tmp_path / "ca.pem"
    _write_ca(ca)
    cfg = load_config(None, environ={**SASL, "DIANA_KAFKA_SSL_CA_FILE": str(ca)})
    settings = faust_broker_settings(cfg.kafka)
    assert settings["broker"] == "kafka://127.0.0.1:9092"
    creds = settings["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism.value) == (
        "diana-services",
        "kafka-secret-0123456789",
        "SCRAM-SHA-512",
    )
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED and creds.ssl_context.check_hostname
    assert "broker_credentials" not in faust_broker_settings(load_config(None, environ={}).kafka)


def _write_ca(path: Path) -> None:
    import subprocess

    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(path.with_suffix(".key")),
         "-out", str(path), "-days", "1", "-subj", "/CN=unit-test-ca"],
        check=True, capture_output=True,
    )  # fmt: skip


def test_opensearch_password_from_environment_or_file(tmp_path: Path):
    env = {"DIANA_OPENSEARCH_URL": "https://127.0.0.1:9200", "DIANA_OPENSEARCH_USERNAME": "svc"}
    assert opensearch_auth(
        load_config(None, environ={**env, "DIANA_OPENSEARCH_PASSWORD": "env-pw-12345678"}).opensearch
    ) == (
        "svc",
        "env-pw-12345678",
    )
    (tmp_path / "pw").write_text("file-pw-12345678")
    cfg = load_config(None, environ={**env, "DIANA_OPENSEARCH_PASSWORD_FILE": str(tmp_path / "pw")})
    assert opensearch_auth(cfg.opensearch) == ("svc", "file-pw-12345678")
    missing = load_config(None, environ={**env, "DIANA_OPENSEARCH_PASSWORD_FILE": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="password_file names no file") as refused:
        opensearch_auth(missing.opensearch)
    assert "nope" not in str(refused.value)
    # A password typed into the key that names its file is not echoed back.
    typed = load_config(None, environ={**env, "DIANA_OPENSEARCH_PASSWORD_FILE": "Sup3rS3cretPass"})
    with pytest.raises(ConfigError, match="set password instead") as refused:
        opensearch_auth(typed.opensearch)
    assert "Sup3rS3cretPass" not in str(refused.value)
    # Nor is a password of the wrong type in the configuration error (redaction does not know it yet).
    toml = tmp_path / "wrong.toml"
    toml.write_text("[opensearch]\npassword = ['Secr3tPassw0rd']\n")
    with pytest.raises(ConfigError, match="a value not shown") as refused:
        load_config(toml, environ={})
    assert "Secr3tPassw0rd" not in str(refused.value)
    toml.write_text("[opensearch]\npassword = 98765432101234\n")  # a number is taken as its text, as always
    assert load_config(toml, environ={}).opensearch.password == "98765432101234"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DIANA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs sasl_username"),
        (
            {"DIANA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "DIANA_KAFKA_SASL_USERNAME": "u"},
            "needs a password: set DIANA_KAFKA_SASL_PASSWORD or sasl_password_file",
        ),
        ({"DIANA_KAFKA_SSL_CA_FILE": "/ca.pem"}, "security_protocol is PLAINTEXT"),
        ({"DIANA_KAFKA_SECURITY_PROTOCOL": "TLS"}, "security_protocol"),
        ({"DIANA_KAFKA_SASL_MECHANISM": "GSSAPI"}, "sasl_mechanism"),
        ({"DIANA_OPENSEARCH_URL": "https://admin:pw@h:9200"}, "url must not carry credentials"),
        (
            {"DIANA_OPENSEARCH_USERNAME": "svc", "DIANA_OPENSEARCH_PASSWORD": "pw-1234567890"},
            "is not https: the password would travel in the clear",
        ),
        (
            {"DIANA_OPENSEARCH_URL": "https://h:9200", "DIANA_OPENSEARCH_USERNAME": "svc"},
            "username is set without a password",
        ),
        ({"DIANA_RECEIVER_TLS_CA_FILE": "/ca.pem"}, r"tls_ca_file is set without tls_cert_file and tls_key_file"),
        (
            {"DIANA_RECEIVER_TLS_CA_FILE": "/ca.pem", "DIANA_RECEIVER_TLS_CERT_FILE": "/c.pem"},
            "tls_ca_file is set without tls_cert_file and tls_key_file",
        ),
    ],
)
def test_insecure_or_incomplete_security_settings_are_configuration_errors(environ: dict, message: str):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, environ=environ)
    assert "pw-1234567890" not in str(err.value) and ":pw@" not in str(err.value)


def test_receiver_tls_with_certificate_key_and_ca_is_accepted():
    env = {
        "DIANA_RECEIVER_TLS_CA_FILE": "/ca.pem",
        "DIANA_RECEIVER_TLS_CERT_FILE": "/c.pem",
        "DIANA_RECEIVER_TLS_KEY_FILE": "/c.key",
    }
    assert load_config(None, environ=env).receiver.tls_ca_file == "/ca.pem"


def test_cli_configuration_error_does_not_print_the_password(capsys: pytest.CaptureFixture[str], monkeypatch):
    from diana.cli import main

    for k, v in {"DIANA_OPENSEARCH_PASSWORD": "cli-secret-9876543210", "DIANA_OPENSEARCH_USERNAME": "svc"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DIANA_CONFIG", raising=False)
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "is not https" in err and "cli-secret-9876543210" not in err


def test_a_handler_of_its_own_like_fausts_prints_redacted_messages_too(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure_logging("info", "console")
    own = io.StringIO()
    handler = logging.StreamHandler(own)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    faust_like = logging.getLogger("faust.test")
    faust_like.addHandler(handler)
    try:
        remember_secret("faust-handler-secret-1")
        faust_like.warning("broker login with %s failed", "faust-handler-secret-1")
    finally:
        faust_like.removeHandler(handler)
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert own.getvalue() == "[WARNING] broker login with *** failed\n"


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_logged_traceback_shows_no_local_variables(monkeypatch: pytest.MonkeyPatch, fmt: str):
    """A library's exception logged with its traceback (opensearch-py does so on every failed request)
    must not print what the failing frame held: here a patient's name in a local variable."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", fmt)

    def index(document: dict) -> None:
        raise ConnectionError("the index does not answer")

    try:
        try:
            index({"PatientName": "^".join(("DOE", "JANE-LOCAL"))})  # not in the source line the traceback quotes
        except ConnectionError:
            logging.getLogger("opensearch").warning("POST /_bulk failed", exc_info=True)
            structlog.get_logger("t").exception("sink.failed")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    out = stream.getvalue()
    # opensearch-py's line on one line (diana/logs.py), our own exception with its traceback
    assert "POST /_bulk failed (ConnectionError: the index does not answer)" in out
    assert out.count("the index does not answer") >= 2 and "in index" in out
    assert "DOE^JANE-LOCAL" not in out


def test_pydicom_lines_keep_no_dicom_value(monkeypatch: pytest.MonkeyPatch):
    """A birth date pydicom finds malformed, read back from the index for a C-FIND or QIDO-RS answer:
    its warning reaches the log without the date, and is not printed by warnings.warn at all."""
    import warnings

    import pydicom

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with warnings.catch_warnings(record=True) as printed:
        configure_logging("info", "json")
        try:
            for date in ("1980.01.01", "01/02/1981"):
                ds = pydicom.Dataset.from_json({"00100030": {"vr": "DA", "Value": [date]}})
                assert ds.PatientBirthDate is not None
            logging.getLogger("pydicom.pixels.utils").warning("The %s value %r is kept as it is", "PN", "DOE^JANE")
        finally:
            structlog.reset_defaults()
            logging.getLogger().handlers.clear()
    out = stream.getvalue()
    assert not [str(w.message) for w in printed if "1980" in str(w.message) or "1981" in str(w.message)]
    assert "1980" not in out and "1981" not in out and "DOE^JANE" not in out, out
    assert "Invalid value for VR DA: (the value is withheld from the log)" in out, out
    assert "The PN value: (the value is withheld from the log)" in out, out
