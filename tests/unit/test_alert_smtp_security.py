"""Alert e-mail over TLS, with a login, against a real SMTP server (aiosmtpd, in this process) and
certificates made as the secured stack makes its own. Never plain when TLS is asked for: a server that
does not offer STARTTLS gets nothing."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from diana.access.alerts.channels import SmtpServer, send_email
from diana.config import ConfigError, load_config
from tests.support.pki import make_certificates
from tests.support.smtp_relay import Mailbox, start_relay

ALERT = {"alert_id": "a-1", "rule": "ct-head", "metric": "ctdivol", "value": 80.0, "message": "over the DRL"}
USER, PASSWORD = "alerts", "correct-horse-battery-staple"


def _login(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("smtp-pki"))


def _context(pki: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server.pem"], pki["server.key"])
    return context


def test_starttls_and_a_login_deliver_and_plain_or_an_unknown_ca_send_nothing(pki):
    mailbox = Mailbox()
    smtp = start_relay(
        mailbox,
        tls_context=_context(pki),
        require_starttls=True,
        authenticator=_login,
        auth_require_tls=True,
    )
    try:
        where = ("127.0.0.1", smtp.port, "diana@example.org")
        secured = SmtpServer(*where, "starttls", str(pki["ca.pem"]), USER, PASSWORD)
        assert send_email(secured, "physicist@example.org", ALERT, "k1", 10) == f"accepted by 127.0.0.1:{smtp.port}"
        assert len(mailbox.messages) == 1 and b"ctdivol" in mailbox.messages[0]
        with pytest.raises(smtplib.SMTPException):  # 530: STARTTLS first
            send_email(SmtpServer(*where), "physicist@example.org", ALERT, "k2", 10)
        with pytest.raises(ssl.SSLCertVerificationError):  # the system's CAs do not know the test CA
            send_email(SmtpServer(*where, "starttls", "", USER, PASSWORD), "physicist@example.org", ALERT, "k3", 10)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            send_email(
                SmtpServer(*where, "starttls", str(pki["ca.pem"]), USER, "wrong-password-1234"),
                "physicist@example.org",
                ALERT,
                "k4",
                10,
            )
        assert len(mailbox.messages) == 1
    finally:
        smtp.stop()


def test_a_server_without_starttls_gets_nothing_when_starttls_is_asked_for(pki):
    mailbox = Mailbox()
    smtp = start_relay(mailbox)
    try:
        server = SmtpServer("127.0.0.1", smtp.port, "diana@example.org", "starttls", str(pki["ca.pem"]))
        with pytest.raises(smtplib.SMTPNotSupportedError):
            send_email(server, "physicist@example.org", ALERT, "k1", 10)
        assert mailbox.messages == []
    finally:
        smtp.stop()


def test_implicit_tls(pki):
    mailbox = Mailbox()
    smtp = start_relay(mailbox, ssl_context=_context(pki))
    try:
        server = SmtpServer("127.0.0.1", smtp.port, "diana@example.org", "tls", str(pki["ca.pem"]))
        send_email(server, "physicist@example.org", ALERT, "k1", 10)
        assert len(mailbox.messages) == 1
    finally:
        smtp.stop()


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ('smtp_username = "alerts"\nsmtp_password_file = "/x"\n', 'smtp_security is "none"'),
        ('smtp_security = "starttls"\nsmtp_username = "alerts"\n', "without a password"),
        ('smtp_security = "ssl"\n', "use one of none, starttls, tls"),
    ],
)
def test_settings_that_would_send_in_the_clear_are_refused(tmp_path, settings, said):
    path = tmp_path / "diana.toml"
    path.write_text("[alerts]\n" + settings)
    with pytest.raises(ConfigError, match=said):
        load_config(path)


def test_a_login_that_is_not_ascii_is_refused_at_start(monkeypatch):
    """smtplib sends a login as ASCII: a password with an umlaut failed every delivery, and the worker
    crashed on its UnicodeEncodeError, which quoted one of its characters."""
    from diana.access.alerts.delivery import smtp_server
    from diana.config import AlertsConfig

    settings = AlertsConfig(smtp_security="starttls", smtp_username="alerts", smtp_password="pässwort-geheim-123")
    with pytest.raises(ConfigError, match="ASCII") as refused:
        smtp_server(settings)
    assert "pässwort" not in str(refused.value)
    assert (
        smtp_server(AlertsConfig(smtp_security="tls", smtp_username="a", smtp_password="password-1234")).username == "a"
    )
