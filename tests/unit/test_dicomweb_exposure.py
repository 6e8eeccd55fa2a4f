"""DICOMweb off loopback (access/dicomweb/auth.py, check_exposure): authentication required, and HTTPS, or the
token or password and every answer travel in clear; `[dicomweb] allow_plain_http` for TLS ended by a proxy,
said at start."""

from __future__ import annotations

from dataclasses import replace

import pytest

from diana.access.dicomweb.auth import PLAIN_HTTP_WARNING, Credentials, check_exposure
from diana.config import ConfigError, DicomWebConfig, load_config

TOKEN = Credentials(token="a-long-enough-token")
TLS = {"tls_cert_file": "server.pem", "tls_key_file": "server.key"}


def test_loopback_needs_neither_authentication_nor_tls():
    for host in ("127.0.0.1", "::1", "localhost"):
        assert check_exposure(DicomWebConfig(host=host), Credentials()) is None


def test_off_loopback_without_authentication_is_refused_first():
    with pytest.raises(ConfigError, match="no authentication is configured"):
        check_exposure(DicomWebConfig(host="0.0.0.0", **TLS), Credentials())
    with pytest.raises(ConfigError, match="no authentication is configured"):
        check_exposure(DicomWebConfig(host="0.0.0.0", allow_plain_http=True), Credentials())


def test_off_loopback_without_tls_is_refused_naming_the_fix():
    with pytest.raises(ConfigError) as refused:
        check_exposure(DicomWebConfig(host="0.0.0.0"), TOKEN)
    message = str(refused.value)
    assert "HTTPS is not configured" in message
    for setting in ("tls_cert_file", "tls_key_file", "allow_plain_http = true"):
        assert setting in message
    assert "a-long-enough-token" not in message
    # Half of the pair is no HTTPS (dicomweb_app refuses it anyway).
    with pytest.raises(ConfigError, match="HTTPS is not configured"):
        check_exposure(DicomWebConfig(host="10.1.2.3", tls_cert_file="server.pem"), TOKEN)


def test_off_loopback_with_tls_starts_without_a_warning():
    assert check_exposure(DicomWebConfig(host="0.0.0.0", **TLS), TOKEN) is None


def test_allow_plain_http_starts_with_a_warning():
    web = load_config(environ={"DIANA_DICOMWEB_HOST": "0.0.0.0", "DIANA_DICOMWEB_ALLOW_PLAIN_HTTP": "true"}).dicomweb
    assert web.allow_plain_http is True
    assert check_exposure(web, TOKEN) == PLAIN_HTTP_WARNING
    assert "allow_plain_http" in PLAIN_HTTP_WARNING and "proxy" in PLAIN_HTTP_WARNING
    assert load_config(environ={}).dicomweb.allow_plain_http is False
    # With HTTPS the setting changes nothing.
    assert check_exposure(replace(web, **TLS), TOKEN) is None
