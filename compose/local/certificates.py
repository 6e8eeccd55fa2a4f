"""A private CA and the certificates of the secured local stack, made with openssl.

The CA signs one certificate per server (Kafka's broker, the OpenSearch node, S3Proxy) for 127.0.0.1
and localhost, and an admin client certificate for OpenSearch's security plugin. S3Proxy (Jetty)
reads its key and certificate from a PKCS#12 keystore, whose password is made once and kept beside it. Keys are PKCS#8 PEM
(what both Java servers read) and readable by their owner only. Existing files are kept, so the
CA clients trust stays the same across restarts; ``diana stack reset`` does not touch them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pki", "make_pki", "make_ca", "sign", "OPENSEARCH_NODE_DN", "OPENSEARCH_ADMIN_DN"]

OPENSEARCH_NODE_DN = "CN=diana-opensearch-node,O=diana-star"
OPENSEARCH_ADMIN_DN = "CN=diana-opensearch-admin,O=diana-star"
_DAYS = "825"  # the longest validity clients accept for a server certificate


class CertificateError(RuntimeError):
    """openssl failed; the message holds its output (no secret goes through it)."""


@dataclass(frozen=True)
class Pki:
    ca: Path
    kafka_cert: Path
    kafka_key: Path
    opensearch_cert: Path
    opensearch_key: Path
    admin_cert: Path
    admin_key: Path
    s3proxy_keystore: Path
    s3proxy_keystore_password: Path

    def kafka_keystore(self) -> Path:
        """Kafka's PEM keystore: the key, then the certificate chain, in one file."""
        return self.kafka_cert.with_name("kafka-keystore.pem")


def _openssl(d: Path, *args: str) -> None:
    if not shutil.which("openssl"):
        raise CertificateError("no `openssl` on PATH: apt-get install openssl")
    proc = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CertificateError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _subject(dn: str) -> str:
    # "CN=a,O=b" -> "/O=b/CN=a": openssl's order, most significant first, so the DN reads back as dn
    return "/" + "/".join(reversed(dn.split(",")))


def make_ca(d: Path, dn: str = "CN=diana-star local CA,O=diana-star", days: str = "3650") -> Path:
    """``d``/ca.pem and its key (made once; kept afterwards)."""
    if not (d / "ca.pem").exists():
        _openssl(
            d,
            "req", "-x509", "-newkey", "rsa:3072", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", days, "-sha256", "-subj", _subject(dn),
        )  # fmt: skip
        (d / "ca.key").chmod(0o600)
    return d / "ca.pem"


def sign(d: Path, name: str, dn: str, usage: str, ip_san: bool, days: str = _DAYS) -> None:
    """``d``/name.pem and name.key, signed by ``d``'s CA for the extended key ``usage`` (made once)."""
    if (d / f"{name}.pem").exists() and (d / f"{name}.key").exists():
        return
    _openssl(
        d,
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        _subject(dn),
    )
    ext = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if ip_san:
        ext.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        d,
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", days, "-sha256", "-extfile", f"{name}.ext",
    )  # fmt: skip
    (d / f"{name}.key").chmod(0o600)


def pkcs12_keystore(d: Path, name: str) -> tuple[Path, Path]:
    """``d``/name.p12 holding name.key and name.pem, and the file with its password (made once)."""
    store, password = d / f"{name}.p12", d / f"{name}.p12.password"
    if store.exists() and password.exists():
        return store, password
    password.touch(mode=0o600)
    password.write_text(secrets.token_hex(20) + "\n")
    # The password goes to openssl through a file, never on its command line (ps shows that).
    _openssl(
        d,
        "pkcs12", "-export", "-in", f"{name}.pem", "-inkey", f"{name}.key", "-certfile", "ca.pem",
        "-name", name, "-out", store.name, "-passout", f"file:{password.name}",
    )  # fmt: skip
    store.chmod(0o600)
    return store, password


def make_pki(d: Path) -> Pki:
    """The CA and certificates in ``d`` (made once; kept afterwards)."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    make_ca(d)
    sign(d, "kafka", "CN=127.0.0.1,O=diana-star", "serverAuth,clientAuth", ip_san=True)
    sign(d, "opensearch-node", OPENSEARCH_NODE_DN, "serverAuth,clientAuth", ip_san=True)
    sign(d, "opensearch-admin", OPENSEARCH_ADMIN_DN, "clientAuth", ip_san=False)
    sign(d, "s3proxy", "CN=127.0.0.1,O=diana-star", "serverAuth", ip_san=True)
    s3proxy_store, s3proxy_password = pkcs12_keystore(d, "s3proxy")
    pki = Pki(
        ca=d / "ca.pem",
        kafka_cert=d / "kafka.pem",
        kafka_key=d / "kafka.key",
        opensearch_cert=d / "opensearch-node.pem",
        opensearch_key=d / "opensearch-node.key",
        admin_cert=d / "opensearch-admin.pem",
        admin_key=d / "opensearch-admin.key",
        s3proxy_keystore=s3proxy_store,
        s3proxy_keystore_password=s3proxy_password,
    )
    keystore = pki.kafka_keystore()
    keystore.touch(mode=0o600)
    keystore.write_text(pki.kafka_key.read_text() + pki.kafka_cert.read_text())
    return pki
