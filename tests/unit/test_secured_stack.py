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
