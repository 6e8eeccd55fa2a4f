"""The secured variant of the local stack ([stack] secured = true, or `diana stack up --secured`).

Kafka: the client listener speaks SASL_SSL with SCRAM ([kafka] sasl_mechanism); the SCRAM user is
[kafka] sasl_username with its password, written into the cluster metadata when the storage is
formatted (``--add-scram``: KRaft has no ZooKeeper to add it to later); the broker logs in between
its own listeners as the same user. The KRaft controller listener stays plain on 127.0.0.1: it never
leaves the host. OpenSearch: the security plugin (Maven Central zip) with TLS on HTTP and transport
and one internal user, [opensearch] username, whose bcrypt hash the plugin's own Hasher makes; the
security index is created from those files on first start. Certificates: compose/local/certificates.py.

stack.py calls the hooks below; everything particular to the secured variant lives here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from diana.clients import opensearch_auth
from diana.compose.local.certificates import OPENSEARCH_ADMIN_DN, OPENSEARCH_NODE_DN, Pki, make_pki
from diana.config import Config, ConfigError
from diana.credentials import remember_secret, secret_value

__all__ = ["SecuredStack"]

# --add-scram parses name=...,password=... inside brackets: keep the passwords to characters it reads as-is.
_SAFE_PASSWORD = re.compile(r"^[A-Za-z0-9._~+-]{12,}$")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, mode 600 from creation, and 600 also when the file was there before (a
    stack started before this rule wrote it 644)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(data)


class SecuredStack:
    def __init__(self, config: Config, home: Path, cache: Path):
        self.kafka = config.kafka
        self.opensearch = config.opensearch
        self.storage = config.storage
        self.s3proxy_port = config.stack.s3proxy_port
        self.version = config.stack.opensearch_security_version
        self.pki_dir = home / "pki"
        self.plugin_zip = cache / f"opensearch-security-{self.version}.zip"
        self._pki: Pki | None = None

    # ---------------------------------------------------------------- checks
    def check(self) -> None:
        """The configuration the secured stack needs, said before anything starts."""
        ca = str(self.pki_dir / "ca.pem")
        problems = []
        if self.kafka.security_protocol != "SASL_SSL":
            problems.append('[kafka] security_protocol = "SASL_SSL"')
        if self.kafka.sasl_mechanism not in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
            problems.append('[kafka] sasl_mechanism = "SCRAM-SHA-512"')
        if not self.kafka.sasl_username:
            problems.append("[kafka] sasl_username")
        if self.kafka.ssl_ca_file != ca:
            problems.append(f'[kafka] ssl_ca_file = "{ca}"')
        if not self.opensearch.url.startswith("https://"):
            problems.append("[opensearch] url = https://127.0.0.1:<opensearch_port>")
        if not self.opensearch.username:
            problems.append("[opensearch] username")
        if self.opensearch.ca_file != ca:
            problems.append(f'[opensearch] ca_file = "{ca}"')
        if self.storage.backend == "s3":  # S3Proxy then serves HTTPS only, with the same CA
            if not self.storage.s3_endpoint.startswith("https://"):
                problems.append(f'[storage] s3_endpoint = "https://127.0.0.1:{self.s3proxy_port}"')
            if self.storage.s3_ca_file != ca:
                problems.append(f'[storage] s3_ca_file = "{ca}"')
        if problems:
            raise ConfigError(
                "the secured stack needs these settings (passwords through DIANA_KAFKA_SASL_PASSWORD and "
                "DIANA_OPENSEARCH_PASSWORD, or the *_password_file settings): " + "; ".join(problems)
            )
        for where, password in (
            ("[kafka] sasl_password", self.kafka_password()),
            ("[opensearch] password", self.opensearch_password()),
        ):
            if not _SAFE_PASSWORD.match(password):
                raise ConfigError(
                    f"{where} for the secured local stack: use at least 12 characters of A-Z a-z 0-9 . _ ~ + - "
                    f"(e.g. `openssl rand -hex 20`)"
                )

    def kafka_password(self) -> str:
        return secret_value("kafka", "sasl_password", self.kafka.sasl_password, self.kafka.sasl_password_file)

    def opensearch_password(self) -> str:
        auth = opensearch_auth(self.opensearch)
        return auth[1] if auth else ""

    def pki(self) -> Pki:
        if self._pki is None:
            self._pki = make_pki(self.pki_dir)
        return self._pki

    # ---------------------------------------------------------------- kafka
    def kafka_listener_properties(self, port: int, controller_port: int) -> str:
        pki, mech = self.pki(), self.kafka.sasl_mechanism
        jaas = (
            f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{self.kafka.sasl_username}" '
            f'password="{self.kafka_password()}";'
        )
        return f"""\
listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=SASL_SSL://127.0.0.1:{port}
controller.listener.names=CONTROLLER
# the controller listener is bound to loopback only: it never leaves the host
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms={mech}
sasl.mechanism.inter.broker.protocol={mech}
listener.name.sasl_ssl.{mech.lower()}.sasl.jaas.config={jaas}
ssl.keystore.type=PEM
ssl.keystore.location={pki.kafka_keystore()}
ssl.truststore.type=PEM
ssl.truststore.location={pki.ca}
ssl.endpoint.identification.algorithm=https
ssl.enabled.protocols=TLSv1.3,TLSv1.2
"""

    def kafka_format_args(self) -> list[str]:
        """`kafka-storage format` arguments creating the SCRAM user in the new cluster's metadata."""
        return [
            "--add-scram",
            f"{self.kafka.sasl_mechanism}=[name={self.kafka.sasl_username},password={self.kafka_password()}]",
        ]

    def private_java_command(self, command: list[str], main: str, folder: Path) -> list[str]:
        """``command`` (a java command line running ``main``) with ``main`` and its arguments moved into
        a java @argfile only the owner can read: the SCRAM password given to the format never shows
        in the process list (``ps``) while it runs. The caller removes ``folder`` afterwards."""
        at = command.index(main)
        argfile = folder / "kafka-format.args"
        fd = os.open(argfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            # One argument a line, quoted as java reads @argfiles (a space inside stays in the argument).
            fh.write("".join('"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"\n' for arg in command[at:]))
        return [*command[:at], f"@{argfile}"]

    def mark_kafka_data(self, data: Path) -> None:
        """Remember that this storage was formatted with the SCRAM user (and which)."""
        (data / "diana-scram-user").write_text(self.kafka.sasl_username + "\n")

    def check_kafka_data(self, data: Path) -> None:
        """Storage formatted by a plain start has no SCRAM user: the secured broker would refuse every login."""
        if not (data / "meta.properties").exists():
            return
        marker = data / "diana-scram-user"
        user = marker.read_text().strip() if marker.exists() else None
        if user != self.kafka.sasl_username:
            raise ConfigError(
                f"the Kafka data under {data} was formatted "
                + ("without a SCRAM user (a plain start)" if user is None else f"with the SCRAM user {user!r}")
                + f", not {self.kafka.sasl_username!r}: SCRAM users are made at format time in KRaft; "
                "run `diana stack reset --secured` (it deletes the stack's data) and start again"
            )

    # ---------------------------------------------------------------- s3proxy
    def s3proxy_tls_properties(self, endpoint: str) -> str:
        """S3Proxy's listener lines: HTTPS only, its key and certificate in a PKCS#12 keystore. The
        keystore password lands in s3proxy.properties, which stack.py writes readable by us alone."""
        pki = self.pki()
        password = pki.s3proxy_keystore_password.read_text().strip()
        remember_secret(password)
        return (
            f"s3proxy.secure-endpoint={endpoint}\n"
            f"s3proxy.keystore-path={pki.s3proxy_keystore}\n"
            f"s3proxy.keystore-password={password}\n"
        )

    # ---------------------------------------------------------------- opensearch
    def install(self, mvn: Any) -> None:
        """The security plugin's zip from Maven Central into the cache, once (``mvn`` runs Maven)."""
        if self.plugin_zip.exists():
            return
        artifact = f"org.opensearch.plugin:opensearch-security:{self.version}:zip"
        mvn(
            ["dependency:copy", f"-Dartifact={artifact}", f"-DoutputDirectory={self.plugin_zip.parent}"],
            self.plugin_zip.parent,
        )

    def opensearch_yml(self) -> str:
        return f"""
# the security plugin (compose/local/secured.py): TLS on HTTP and transport, basic authentication
plugins.security.ssl.transport.pemcert_filepath: pki/opensearch-node.pem
plugins.security.ssl.transport.pemkey_filepath: pki/opensearch-node.key
plugins.security.ssl.transport.pemtrustedcas_filepath: pki/ca.pem
plugins.security.ssl.transport.enforce_hostname_verification: false
plugins.security.ssl.http.enabled: true
plugins.security.ssl.http.pemcert_filepath: pki/opensearch-node.pem
plugins.security.ssl.http.pemkey_filepath: pki/opensearch-node.key
plugins.security.ssl.http.pemtrustedcas_filepath: pki/ca.pem
plugins.security.allow_default_init_securityindex: true
plugins.security.authcz.admin_dn: ["{OPENSEARCH_ADMIN_DN}"]
plugins.security.nodes_dn: ["{OPENSEARCH_NODE_DN}"]
plugins.security.audit.type: noop
plugins.security.restapi.roles_enabled: ["all_access"]
plugins.security.system_indices.enabled: true
"""

    def prepare_opensearch(self, home: Path, java_home: Path) -> None:
        """Install the plugin into the unpacked distribution (once), then its certificates and users."""
        plugin_dir = home / "plugins" / "opensearch-security"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OPENSEARCH_JAVA_HOME": str(java_home)}
        env["OPENSEARCH_PATH_CONF"] = str(home / "config")
        if not plugin_dir.exists():
            proc = subprocess.run(
                [str(home / "bin" / "opensearch-plugin"), "install", "--batch", self.plugin_zip.as_uri()],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(
                    f"installing the OpenSearch security plugin failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
                )
        pki, conf = self.pki(), home / "config"
        (conf / "pki").mkdir(exist_ok=True)
        for src, name in ((pki.ca, "ca.pem"), (pki.opensearch_cert, "opensearch-node.pem")):
            shutil.copyfile(src, conf / "pki" / name)
        # The node's private key and the users' password hashes: 600 (copyfile and write_text gave 644). As
        # root, stack.py chowns the whole OpenSearch folder to the user OpenSearch runs as, after this.
        _write_private(conf / "pki" / "opensearch-node.key", pki.opensearch_key.read_bytes())
        security = conf / "opensearch-security"
        security.mkdir(exist_ok=True)
        user = self.opensearch.username
        _write_private(
            security / "internal_users.yml",
            f"""---
_meta:
  type: "internalusers"
  config_version: 2
{json.dumps(user)}:
  hash: {json.dumps(self._bcrypt(home, env))}
  reserved: true
  backend_roles: ["admin"]
  description: "diana-star's services ([opensearch] username)"
""".encode(),
        )
        (security / "roles_mapping.yml").write_text(
            """---
_meta:
  type: "rolesmapping"
  config_version: 2
all_access:
  reserved: true
  backend_roles: ["admin"]
  description: "diana-star's services user"
"""
        )

    def _bcrypt(self, home: Path, env: dict[str, str]) -> str:
        """The password's bcrypt hash by the plugin's Hasher, the password passed through the environment."""
        plugin = home / "plugins" / "opensearch-security"
        java = Path(env["OPENSEARCH_JAVA_HOME"]) / "bin" / "java"
        proc = subprocess.run(
            [str(java), "-cp", f"{plugin}/*:{home}/lib/*", "org.opensearch.security.tools.Hasher", "-env", "DIANA_HASH_INPUT"],
            env={**env, "DIANA_HASH_INPUT": self.opensearch_password()}, capture_output=True, text=True,
        )  # fmt: skip
        hashed = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0 or not hashed.startswith("$2"):
            raise RuntimeError(f"hashing the OpenSearch password failed: {proc.stderr[-1000:]}")
        return hashed

    def health(self, url: str, timeout: float) -> dict:
        """GET ``url`` over https, verified against the stack's CA, as [opensearch] username."""
        context = ssl.create_default_context(cafile=str(self.pki().ca))
        token = base64.b64encode(f"{self.opensearch.username}:{self.opensearch_password()}".encode()).decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            return json.load(resp)
