"""Certificates for the DICOM-over-TLS tests, made as the secured stack makes its own (compose/local/certificates.py)."""

from __future__ import annotations

from pathlib import Path

from diana.compose.local.certificates import make_ca, sign


def make_certificates(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, in ``d``, valid for 2 days."""
    make_ca(d, "CN=diana-test-ca", days="2")
    for name in ("server", "client"):
        sign(d, name, f"CN={name}", "serverAuth,clientAuth", ip_san=True, days="2")
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
