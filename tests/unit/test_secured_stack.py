"""The secured local stack's preparation, without starting servers: settings, certificates, broker config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from diana.compose.local.certificates import make_pki
from diana.compose.local.secured import SecuredStack
from diana.config import ConfigError, load_config


def _secured(tmp_path: Path, **extra: str) -> SecuredStack:
    ca = tmp_path / "stack" / "pki" / "ca.pem"
    env = {
        "DIANA_STACK_HOME": str(tmp_path / "stack"),
        "DIANA_STACK_SECURED": "true",
        "DIANA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "DIANA_KAFKA_SASL_USERNAME": "diana-services",
        "DIANA_KAFKA_SASL_PASSWORD": "kafka-password-0123456789",
        "DIANA_KAFKA_SSL_CA_FILE": str(ca),
        "DIANA_OPENSEARCH_URL": "https://127.0.0.1:9200",
        "DIANA_OPENSEARCH_USERNAME": "diana-services",
        "DIANA_OPENSEARCH_PASSWORD": "opensearch-password-0123",
        "DIANA_OPENSEARCH_CA_FILE": str(ca),
        **extra,
    }
    cfg = load_config(None, environ=env)
    return SecuredStack(cfg, cfg.path(cfg.stack.home), tmp_path / "cache")


def test_complete_settings_pass_the_check(tmp_path: Path):
    _secured(tmp_path).check()


def test_the_check_lists_what_the_secured_stack_needs(tmp_path: Path):
    stack = _secured(tmp_path, DIANA_OPENSEARCH_CA_FILE="/elsewhere/ca.pem")
    with pytest.raises(ConfigError, match=r'\[opensearch\] ca_file = ".*/stack/pki/ca.pem"'):
        stack.check()
    weak = _secured(tmp_path, DIANA_KAFKA_SASL_PASSWORD="has,comma]and=more")
    with pytest.raises(ConfigError, match="at least 12 characters") as err:
        weak.check()
    assert "has,comma" not in str(err.value)


def test_certificates_chain_to_the_private_ca_and_keys_are_private(tmp_path: Path):
    pki = make_pki(tmp_path / "pki")
    for cert in (pki.kafka_cert, pki.opensearch_cert, pki.admin_cert):
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(pki.ca), str(cert)], capture_output=True, text=True
        )
        assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(pki.kafka_cert), "-noout", "-text"], capture_output=True, text=True
    )
    assert "IP Address:127.0.0.1" in text.stdout
    for key in (pki.kafka_key, pki.opensearch_key, pki.admin_key, pki.kafka_keystore()):
        assert key.stat().st_mode & 0o077 == 0
    assert pki.kafka_keystore().read_text().startswith("-----BEGIN PRIVATE KEY-----")
    ca_before = pki.ca.read_bytes()
    assert make_pki(tmp_path / "pki").ca.read_bytes() == ca_before  # kept: clients keep trusting it


def test_broker_listener_and_scram_user(tmp_path: Path):
    stack = _secured(tmp_path)
    props = stack.kafka_listener_properties(9092, 9093)
    assert "listeners=SASL_SSL://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093" in props
    assert "sasl.enabled.mechanisms=SCRAM-SHA-512" in props
    assert "ssl.truststore.location=" + str(tmp_path / "stack" / "pki" / "ca.pem") in props
    assert stack.kafka_format_args() == [
        "--add-scram",
        "SCRAM-SHA-512=[name=diana-services,password=kafka-password-0123456789]",
    ]


def test_kafka_data_formatted_plain_is_refused_with_the_fix(tmp_path: Path):
    stack = _secured(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    stack.check_kafka_data(data)  # not formatted yet: fine
    (data / "meta.properties").write_text("cluster.id=x\n")
    with pytest.raises(ConfigError, match="without a SCRAM user.*diana stack reset --secured"):
        stack.check_kafka_data(data)
    stack.mark_kafka_data(data)
    stack.check_kafka_data(data)


def test_the_scram_password_goes_to_the_format_in_a_private_argfile_not_the_process_list(tmp_path: Path):
    stack = _secured(tmp_path)
    command = ["/jdk/bin/java", "-Xmx256m", "-cp", "libs/*", "kafka.tools.StorageTool", "format"]
    command += stack.kafka_format_args()
    folder = tmp_path / "private"
    folder.mkdir()
    private = stack.private_java_command(command, "kafka.tools.StorageTool", folder)
    assert private[:4] == command[:4] and len(private) == 5 and private[4].startswith("@")
    assert not any("kafka-password-0123456789" in arg for arg in private)
    argfile = Path(private[4][1:])
    assert argfile.stat().st_mode & 0o077 == 0
    assert argfile.read_text().split("\n")[:-1] == [f'"{arg}"' for arg in command[4:]]  # quoted as java reads them


def test_the_opensearch_node_key_and_its_users_file_are_private(tmp_path: Path, monkeypatch):
    """Before, the node's private key was copied with shutil.copyfile and internal_users.yml (the password's
    hash) written with write_text: both 0644, readable by every local user. Now 600, also over the 644 files
    of a stack prepared before; OpenSearch still reads them (it runs as their owner: the stack's user, or
    the system user stack.py chowns the folder to when run as root)."""
    stack = _secured(tmp_path)
    home = tmp_path / "opensearch-2.19.4"
    (home / "plugins" / "opensearch-security").mkdir(parents=True)  # installed: no opensearch-plugin run
    (home / "config" / "pki").mkdir(parents=True)
    (home / "config" / "opensearch-security").mkdir()
    key = home / "config" / "pki" / "opensearch-node.key"
    users = home / "config" / "opensearch-security" / "internal_users.yml"
    for before in (key, users):  # a stack prepared before this rule
        before.write_text("old")
        before.chmod(0o644)
    monkeypatch.setattr(SecuredStack, "_bcrypt", lambda self, home, env: "$2y$12$hash")  # no java here
    stack.prepare_opensearch(home, tmp_path / "jdk")
    assert key.read_bytes() == stack.pki().opensearch_key.read_bytes()
    assert '"diana-services":' in users.read_text() and "$2y$12$hash" in users.read_text()
    for private in (key, users):
        assert private.stat().st_mode & 0o777 == 0o600
    assert (home / "config" / "pki" / "opensearch-node.pem").read_bytes() == stack.pki().opensearch_cert.read_bytes()


def test_s3_on_the_secured_stack_needs_an_https_endpoint_and_the_stack_ca(tmp_path: Path):
    ca = str(tmp_path / "stack" / "pki" / "ca.pem")
    plain = _secured(
        tmp_path,
        DIANA_STORAGE_BACKEND="s3",
        DIANA_STORAGE_S3_ENDPOINT="http://127.0.0.1:9000",
        DIANA_STACK_S3PROXY_PORT="9000",
    )
    with pytest.raises(ConfigError) as err:
        plain.check()
    assert '[storage] s3_endpoint = "https://127.0.0.1:9000"' in str(err.value)
    assert f'[storage] s3_ca_file = "{ca}"' in str(err.value)
    _secured(
        tmp_path,
        DIANA_STORAGE_BACKEND="s3",
        DIANA_STORAGE_S3_ENDPOINT="https://127.0.0.1:9000",
        DIANA_STORAGE_S3_CA_FILE=ca,
    ).check()


def test_s3proxy_serves_https_alone_from_a_pkcs12_keystore_signed_by_the_ca(tmp_path: Path):
    stack = _secured(tmp_path)
    props = stack.s3proxy_tls_properties("https://127.0.0.1:9000")
    pki = stack.pki()
    assert "s3proxy.secure-endpoint=https://127.0.0.1:9000\n" in props and "s3proxy.endpoint=" not in props
    assert f"s3proxy.keystore-path={pki.s3proxy_keystore}\n" in props
    password = pki.s3proxy_keystore_password.read_text().strip()
    for private in (pki.s3proxy_keystore, pki.s3proxy_keystore_password):
        assert private.stat().st_mode & 0o077 == 0
    # The keystore opens with its password and holds a certificate for 127.0.0.1 from the stack's CA.
    pem = subprocess.run(
        ["openssl", "pkcs12", "-in", str(pki.s3proxy_keystore), "-nokeys", "-clcerts", "-passin", f"pass:{password}"],
        capture_output=True,
        text=True,
    )
    assert pem.returncode == 0, pem.stderr
    cert = tmp_path / "s3proxy-from-keystore.pem"
    cert.write_text(pem.stdout)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca), str(cert)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


def test_a_ca_file_for_a_plain_s3_endpoint_is_a_configuration_error(tmp_path: Path):
    env = {"DIANA_STORAGE_S3_ENDPOINT": "http://127.0.0.1:9000", "DIANA_STORAGE_S3_CA_FILE": str(tmp_path / "ca.pem")}
    with pytest.raises(ConfigError, match="s3_ca_file is set but s3_endpoint http://127.0.0.1:9000 is not https"):
        load_config(None, environ=env)
