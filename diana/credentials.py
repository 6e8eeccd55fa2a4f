"""Passwords for Kafka and OpenSearch, read from a file or the environment, and never printed.

Every password diana reads goes through ``secret_value``, which remembers it: ``redact`` then
replaces it (and any ``user:password@`` in a URL) in whatever text is about to be logged or shown.
logs.py runs ``redact`` over every log line, so a password that reaches an exception message or a
client library's own log line is hidden there too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["MASK", "secret_value", "remember_secret", "redact", "redact_url"]

MASK = "***"

# userinfo of a URL: scheme://user:password@host (the password part is what must go)
# The password runs to the last "@" before the host: one with an "@" of its own, not percent-encoded, is
# still hidden whole.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^/?#\s]*)@")

# Values of the process's passwords; short ones are left out so that redaction never eats
# ordinary words (secret_value refuses passwords shorter than this).
MIN_SECRET_LENGTH = 8
_known: set[str] = set()
# _known longest first (an escaped form before the text inside it), kept by remember_secret: redact runs
# over every log line.
_longest_first: tuple[str, ...] = ()


class CredentialError(ValueError):
    """A password cannot be read; the message names where it was looked for, never the value."""


def remember_secret(value: str) -> None:
    """Mask ``value`` from now on, also as a JSON string or repr() writes it: a log line is redacted after
    it was rendered, and those renderers escape quotes, backslashes and (JSON) non-ASCII characters."""
    global _longest_first
    if value and len(value) >= MIN_SECRET_LENGTH:
        quoted = repr(value)[1:-1]
        _known.update(
            {
                value,
                json.dumps(value)[1:-1],
                json.dumps(value, ensure_ascii=False)[1:-1],
                quoted,
                json.dumps(quoted)[1:-1],  # a repr (a dict, an exception's args) inside a JSON line
            }
        )
        _longest_first = tuple(sorted(_known, key=len, reverse=True))  # one rebinding: redact sees old or new


def secret_value(section: str, key: str, value: str, file: str) -> str:
    """The password of ``[section] key``: the value itself (best from DIANA_<SECTION>_<KEY>), else ``file``'s content.

    Returns "" when neither is set. A file that cannot be read is an error naming the file (a value that
    names no file is not shown: it may be the password itself).
    """
    if value and file:
        raise CredentialError(f"[{section}] set {key} or {key}_file, not both")
    if file:
        path = Path(file).expanduser()
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            # Not echoed: a value that names no file may be the password itself, typed into the wrong key.
            raise CredentialError(
                f"[{section}] {key}_file names no file (the value is not shown: if it is the password itself, "
                f"set {key} instead, best as DIANA_{section.upper()}_{key.upper()})"
            ) from None
        except OSError as exc:
            raise CredentialError(f"[{section}] {key}_file {path} cannot be read ({exc.strerror})") from None
        if not value:
            raise CredentialError(f"[{section}] {key}_file {path} is empty")
    if value and len(value) < MIN_SECRET_LENGTH:
        # Redaction leaves shorter values alone (they would eat ordinary words), so they could be printed.
        raise CredentialError(f"[{section}] {key}: use a password of at least {MIN_SECRET_LENGTH} characters")
    remember_secret(value)
    return value


def redact_url(url: str) -> str:
    """``https://user:pw@host`` -> ``https://user:***@host``; anything else unchanged."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)


def redact(text: str) -> str:
    """``text`` without URL passwords and without any password this process has read."""
    text = redact_url(text)
    for secret in _longest_first:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
