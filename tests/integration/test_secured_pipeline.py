"""The whole pipeline once against the secured stack: Kafka on SASL_SSL (SCRAM-SHA-512), OpenSearch
with its security plugin (TLS, basic authentication) and the landing store and archive on S3Proxy
over HTTPS, all behind the stack's private CA.

dcmtk's storescu sends a real study; it must be archived and searchable, and no password may appear
in any log line the run wrote (the pipeline's, Kafka's, OpenSearch's) nor in ``diana status``.
The stack is this module's own (its own ports and folder), so the session stack is not needed.
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from diana.config import Config, load_config
from diana.storage import open_store
from tests.integration.conftest import PIPELINE, Pipeline
from tests.support.dicomgen import make_study
from tests.support.helpers import os_search, storescu, wait_until_caught_up
from tests.support.paths import DATA, REPO, TEST_HOME, port

HOME = TEST_HOME / "secured"
CA = HOME / "stack" / "pki" / "ca.pem"

SECURED_CONFIG = f"""
[kafka]
bootstrap = "127.0.0.1:{port(19192)}"
partitions = 3
publish_timeout_s = 10
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "diana-services"
sasl_password_file = "{HOME}/kafka-password"
ssl_ca_file = "{CA}"

[opensearch]
url = "https://127.0.0.1:{port(19210)}"
index_prefix = "diana"
username = "diana-services"
ca_file = "{CA}"

[receiver]
ae_title = "DIANATEST"
host = "127.0.0.1"
port = {port(11390)}
metrics_port = {port(19564)}

[query_retrieve]
port = {port(11391)}

[dicomweb]
port = {port(18188)}

[sinks]
archive_metrics_port = {port(19565)}
opensearch_metrics_port = {port(19566)}

[storage]
backend = "s3"
s3_endpoint = "https://127.0.0.1:{port(19290)}"
s3_bucket = "diana-secured"
s3_ca_file = "{CA}"
landing_dir = "{HOME}/landing"
archive_dir = "{HOME}/archive"
quarantine_dir = "{HOME}/quarantine"

[stream]
quiet_seconds = "CT=4,MR=4,*=4"
web_port = {port(16166)}
data_dir = "{HOME}/faust"

[dose]
web_port = {port(16169)}
alert_rules = "{DATA}/dose-rules.yaml"
standard_names = "{DATA}/dose-standard-names.yaml"
reference_levels = "{DATA}/dose-reference-levels.yaml"

[stack]
home = "{HOME}/stack"
secured = true
kafka_port = {port(19192)}
kafka_controller_port = {port(19193)}
kafka_heap_mb = 384
opensearch_port = {port(19210)}
opensearch_transport_port = {port(19310)}
opensearch_heap_mb = 640
s3proxy_port = {port(19290)}
s3proxy_heap_mb = 128
"""


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    """Fresh passwords for this run: Kafka's from a file, OpenSearch's and the S3 secret key from the environment."""
    return {"kafka": secrets.token_hex(20), "opensearch": secrets.token_hex(20), "s3": secrets.token_hex(20)}


@pytest.fixture(scope="module")
def secured(passwords: dict[str, str]):
    """The secured stack, its topics and the five pipeline processes; everything stopped at the end."""
    from diana.clients import kafka_admin
    from diana.compose.local.stack import LocalStack
    from diana.schemas.topics import ensure_topics, topic_settings

    for sub in ("landing", "archive", "quarantine", "faust", "logs"):
        shutil.rmtree(HOME / sub, ignore_errors=True)
    HOME.mkdir(parents=True, exist_ok=True)
    config_file = HOME / "diana-secured.toml"
    config_file.write_text(SECURED_CONFIG)
    password_file = HOME / "kafka-password"
    password_file.touch(mode=0o600)
    password_file.write_text(passwords["kafka"] + "\n")
    env = {
        "DIANA_OPENSEARCH_PASSWORD": passwords["opensearch"],
        "DIANA_STORAGE_S3_ACCESS_KEY_ID": "secured-identity",
        "DIANA_STORAGE_S3_SECRET_ACCESS_KEY": passwords["s3"],
    }
    cfg = load_config(config_file, environ=env)

    local = LocalStack(cfg)
    local.reset()  # a fresh cluster: the SCRAM user and the security index are made from this run's passwords
    local.reset_s3proxy()
    logs = HOME / "logs"
    logs.mkdir(parents=True)
    try:
        local.start()
        ensure_topics(kafka_admin(cfg.kafka), cfg.kafka.partitions, **topic_settings(cfg.kafka))
        with Pipeline(cfg, config_file, {}, logs).running(PIPELINE, echo_timeout=90, settings=env) as pipeline:
            yield pipeline, local, env
    finally:
        local.stop()


@pytest.fixture(scope="module")
def sent_study(secured, tmp_path_factory):
    pipeline, _, _ = secured
    study = make_study(tmp_path_factory.mktemp("secured-study"))
    result = storescu(pipeline.cfg, study.files)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(pipeline.cfg, timeout=180)
    return study


def test_a_study_sent_over_dicom_is_archived_and_searchable(secured, sent_study):
    pipeline, _, _ = secured
    cfg: Config = pipeline.cfg
    archive = open_store(cfg, "archive")
    archived = sorted(k for k in archive.list(f"{sent_study.study_uid}/") if k.endswith(".dcm"))
    assert len(archived) == len(sent_study.files) == 40
    study_q = {"term": {"study_instance_uid": sent_study.study_uid}}
    assert len(os_search(cfg, "diana-instances", study_q)) == 40
    studies = os_search(cfg, "diana-studies", {"ids": {"values": [sent_study.study_uid]}})
    assert len(studies) == 1 and studies[0]["instance_count"] == 40 and studies[0]["series_count"] == 3


def test_the_servers_refuse_clients_without_credentials(secured, sent_study):
    from confluent_kafka.admin import AdminClient

    pipeline, _, _ = secured
    cfg: Config = pipeline.cfg
    context = ssl.create_default_context(cafile=str(CA))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cfg.opensearch.url}/_cat/indices", timeout=10, context=context)
    assert refused.value.code == 401
    wrong = AdminClient(
        {
            "bootstrap.servers": cfg.kafka.bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": cfg.kafka.sasl_username,
            "sasl.password": "not-the-password",
            "ssl.ca.location": str(CA),
            "log_level": 0,
        }
    )
    with pytest.raises(Exception, match="(?i)authentication|timed out|transport"):
        wrong.list_topics(timeout=5)


def test_the_object_store_answers_over_tls_only_and_a_wrong_ca_is_a_clear_error(secured, sent_study, tmp_path):
    from dataclasses import replace

    from diana.compose.local.certificates import make_ca
    from diana.storage import StorageError

    pipeline, local, _ = secured
    cfg: Config = pipeline.cfg
    assert local.s3_endpoint() == cfg.storage.s3_endpoint and cfg.storage.s3_endpoint.startswith("https://")
    # The instances arrived through the bucket (landing/ is empty again once archived, archive/ holds them).
    assert len([k for k in open_store(cfg, "archive").list(f"{sent_study.study_uid}/") if k.endswith(".dcm")]) == 40
    assert list(open_store(cfg, "landing").list()) == []
    # Nothing answers in plain HTTP on S3Proxy's port (it sends a TLS alert back: no HTTP status line).
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(cfg.storage.s3_endpoint.replace("https://", "http://"), timeout=10).read()
    # A CA that did not sign S3Proxy's certificate: a StorageError naming the setting, no key in it.
    other = tmp_path / "other-ca"
    other.mkdir()
    wrong = replace(cfg, storage=replace(cfg.storage, s3_ca_file=str(make_ca(other, dn="CN=not the stack's CA"))))
    with pytest.raises(StorageError) as refused:
        open_store(wrong, "archive").exists("any/key.dcm")
    message = str(refused.value)
    assert "TLS verification failed" in message and "s3_ca_file" in message, message
    assert cfg.storage.s3_secret_access_key not in message and cfg.storage.s3_access_key_id not in message


def _log_files(pipeline: Pipeline, local) -> list[Path]:
    opensearch_logs = local._opensearch_dir() / "logs"
    files = [*pipeline.logs.glob("*.log"), local.kafka.log_file, local.s3proxy.log_file, *opensearch_logs.rglob("*")]
    return [f for f in files if f.is_file()]


def test_no_credential_in_any_log_line_nor_in_status(secured, sent_study, passwords):
    pipeline, local, env = secured
    status = subprocess.run(
        [sys.executable, "-m", "diana.cli", "--config", str(pipeline.config_file), "status"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}, **env},
    )
    assert "diana-instances" in status.stdout and status.returncode == 0, status.stdout + status.stderr
    files = _log_files(pipeline, local)
    names = {f.name for f in files}
    assert {"receiver.log", "dose.log", "opensearch-sink.log", "kafka.log", "s3proxy.log"} <= names, names
    assert any(n.startswith("diana-star-local") for n in names), names  # OpenSearch's own server log
    texts = {str(f): f.read_text(errors="replace") for f in files}
    texts["diana status"] = status.stdout + status.stderr
    assert sum(len(t) for t in texts.values()) > 10_000  # the run did log: the check below is not vacuous
    for where, text in texts.items():
        for name, password in passwords.items():
            assert password not in text, f"the {name} password appears in {where}"
