"""Who may call DICOMweb: a bearer token or HTTP basic credentials from the configuration.

A request without them gets 401 and nothing else (no data, no hint which part was wrong).
Comparisons are constant-time. On the loopback default the service may run without authentication
(the banner says so); bound to any other address it refuses to start without it, and without HTTPS unless
``[dicomweb] allow_plain_http`` (TLS terminated by a proxy).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from diana.config import ConfigError, DicomWebConfig
from diana.credentials import remember_secret

__all__ = ["Credentials", "RequireAuth", "credentials_from", "check_exposure"]


class Credentials:
    def __init__(self, token: str | None = None, user: str | None = None, password: str | None = None):
        self.token = token
        self.basic = f"{user}:{password}".encode() if user and password else None

    @property
    def required(self) -> bool:
        return bool(self.token or self.basic)

    def accepts(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.token:
            return hmac.compare_digest(value.strip().encode(), self.token.encode())
        if scheme == "basic" and self.basic:
            try:
                given = base64.b64decode(value.strip(), validate=True)
            except ValueError:
                return False
            return hmac.compare_digest(given, self.basic)
        return False


def _read_secret(path: str, what: str) -> str:
    try:
        secret = Path(path).expanduser().read_text().strip()
    except FileNotFoundError:
        # Not echoed: a value that names no file may be the secret itself, typed into the wrong key.
        raise ConfigError(
            f"[dicomweb] {what} names no file (the value is not shown: it may be the secret itself)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"[dicomweb] {what} {path}: {exc.strerror}") from None
    if len(secret) < 8:
        raise ConfigError(f"[dicomweb] {what} {path} holds fewer than 8 characters: use a longer secret")
    remember_secret(secret)  # masked in every log line, as the other passwords are
    return secret


def credentials_from(cfg: DicomWebConfig) -> Credentials:
    token = _read_secret(cfg.bearer_token_file, "bearer_token_file") if cfg.bearer_token_file else None
    if bool(cfg.basic_user) != bool(cfg.basic_password_file):
        raise ConfigError("[dicomweb] basic authentication needs both basic_user and basic_password_file")
    password = _read_secret(cfg.basic_password_file, "basic_password_file") if cfg.basic_password_file else None
    return Credentials(token, cfg.basic_user or None, password)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


PLAIN_HTTP_WARNING = (
    "DICOMweb listens off loopback over plain HTTP ([dicomweb] allow_plain_http = true): the credentials and "
    "every answer travel in clear unless a proxy on this host or network terminates TLS in front of it"
)


def check_exposure(cfg: DicomWebConfig, credentials: Credentials) -> str | None:
    """Refuse to serve patient data beyond this machine to anyone who asks, or over plain HTTP (the token or
    password and every answer in clear) unless ``allow_plain_http`` says TLS ends at a proxy: then the
    warning to log at start."""
    if _is_loopback(cfg.host):
        return None
    if not credentials.required:
        raise ConfigError(
            f"[dicomweb] host = {cfg.host!r} is not a loopback address and no authentication is configured: "
            'set bearer_token_file (or basic_user and basic_password_file), or host = "127.0.0.1"'
        )
    if cfg.tls_cert_file and cfg.tls_key_file:
        return None
    if not cfg.allow_plain_http:
        raise ConfigError(
            f"[dicomweb] host = {cfg.host!r} is not a loopback address and HTTPS is not configured: the "
            "credentials and every answer would travel in clear; set tls_cert_file and tls_key_file, or "
            "allow_plain_http = true when a proxy on this host or network terminates TLS in front of it, or "
            'host = "127.0.0.1"'
        )
    return PLAIN_HTTP_WARNING


class RequireAuth:
    """ASGI middleware: 401 unless the request carries the configured credentials."""

    def __init__(self, app: ASGIApp, credentials: Credentials):
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.credentials.required:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
        if self.credentials.accepts(header):
            await self.app(scope, receive, send)
            return
        challenge = b'Bearer realm="diana-star"' if self.credentials.token else b'Basic realm="diana-star"'
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"www-authenticate", challenge),
                    (b"content-type", b"text/plain"),
                    (b"content-length", b"13"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"Unauthorized\n"})
