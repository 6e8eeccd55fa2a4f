"""Test fixtures: the real local stack and the real pipeline processes.

Integration tests never mock Kafka, OpenSearch or the DICOM network. The session fixture
starts a fresh stack on test ports (so a running main job is not disturbed); if anything
cannot start, every test that needs it errors: a missing service is a failure, never a skip.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from diana.config import Config, load_config
from tests.support.paths import DATA, REPO, TEST_HOME, port
from tests.support.stack import wait_for_echo

TEST_CONFIG = f"""
[kafka]
bootstrap = "127.0.0.1:{port(19092)}"
partitions = 3
publish_timeout_s = 5

[opensearch]
url = "http://127.0.0.1:{port(19200)}"
index_prefix = "diana"

[receiver]
ae_title = "DIANATEST"
host = "127.0.0.1"
port = {port(11190)}
metrics_port = {port(19464)}
# The scale tests hold 16 associations from 127.0.0.1 (the default per address is 8).
max_associations_per_host = 32

[query_retrieve]
port = {port(11191)}
destinations = ["STORESCP=127.0.0.1:{port(11192)}", "OFFLINE=127.0.0.1:{port(11193)}", "ORTHANC=127.0.0.1:{port(18104)}"]

[sinks]
archive_metrics_port = {port(19465)}
opensearch_metrics_port = {port(19466)}

[storage]
landing_dir = "{TEST_HOME}/landing"
archive_dir = "{TEST_HOME}/archive"
quarantine_dir = "{TEST_HOME}/quarantine"
# Used when a test switches the backend to s3 (the `s3proxy` fixture starts the server).
s3_endpoint = "http://127.0.0.1:{port(19000)}"
s3_bucket = "diana-test"
s3_credentials_file = "{TEST_HOME}/s3-credentials"

[stream]
quiet_seconds = "CT=4,MR=4,*=4"
web_port = {port(16066)}
data_dir = "{TEST_HOME}/faust"

[dose]
web_port = {port(16069)}
alert_rules = "{DATA}/dose-rules.yaml"
standard_names = "{DATA}/dose-standard-names.yaml"
reference_levels = "{DATA}/dose-reference-levels.yaml"

[stack]
home = "{TEST_HOME}/stack"
kafka_port = {port(19092)}
kafka_controller_port = {port(19093)}
opensearch_port = {port(19200)}
opensearch_transport_port = {port(19300)}
opensearch_heap_mb = 768
s3proxy_port = {port(19000)}
s3proxy_heap_mb = 128
"""


@pytest.fixture(scope="session")
def test_config_file() -> Path:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    path = TEST_HOME / "diana-test.toml"
    path.write_text(TEST_CONFIG)
    # Fresh keys each session, for the test S3 server and its clients alike (never printed).
    credentials = TEST_HOME / "s3-credentials"
    credentials.touch(mode=0o600)
    credentials.write_text(
        f"[default]\naws_access_key_id = diana-{secrets.token_hex(4)}\naws_secret_access_key = {secrets.token_hex(20)}\n"
    )
    return path


@pytest.fixture(scope="session")
def cfg(test_config_file: Path) -> Config:
    return load_config(test_config_file, environ={})


@pytest.fixture(scope="session")
def stack(cfg: Config):
    """A fresh Kafka and OpenSearch for this test session, stopped at the end."""
    from diana.clients import kafka_admin
    from diana.compose.local.stack import LocalStack
    from diana.schemas.topics import ensure_topics, topic_settings

    for tool in ("storescu", "echoscu", "storescp"):
        if shutil.which(tool, path="/usr/bin:/bin") is None:
            pytest.fail(
                f"dcmtk's {tool} is not installed: run ./test.sh (it installs dcmtk) or apt-get install dcmtk",
                pytrace=False,
            )
    local = LocalStack(cfg)
    local.reset()
    for sub in ("landing", "archive", "quarantine", "faust"):
        shutil.rmtree(TEST_HOME / sub, ignore_errors=True)
    local.start()
    ensure_topics(kafka_admin(cfg.kafka), cfg.kafka.partitions, **topic_settings(cfg.kafka))
    yield local
    local.stop()


@pytest.fixture(scope="session")
def s3_cfg(test_config_file: Path) -> Config:
    """The test configuration with the archive and quarantine on S3 (the `s3proxy` fixture's server)."""
    return load_config(test_config_file, environ={"DIANA_STORAGE_BACKEND": "s3"})


@pytest.fixture(scope="session")
def s3proxy(s3_cfg: Config):
    """A fresh S3Proxy for this session, its bucket created; stopped at the end. Cannot start: the test fails."""
    from diana.compose.local.stack import LocalStack

    local = LocalStack(s3_cfg)
    local.reset_s3proxy()
    local.start_s3proxy()
    local.wait_s3proxy()
    yield s3_cfg
    local.stop_s3proxy()


@pytest.fixture(scope="module")
def s3_archive_sink(pipeline, s3proxy: Config):
    """The session pipeline with its archive sink swapped for one writing to S3 (same consumer group), for a module.

    Yields the S3 configuration; the filesystem archive sink is back afterwards.
    """
    pipeline.stop("archive-sink")
    pipeline.start("archive-sink-s3", "sink", "archive", settings={"DIANA_STORAGE_BACKEND": "s3"})
    yield s3proxy
    pipeline.stop("archive-sink-s3")
    pipeline.start("archive-sink", *PIPELINE["archive-sink"])


@dataclass
class Pipeline:
    cfg: Config
    config_file: Path
    procs: dict[str, subprocess.Popen]
    logs: Path

    def start(self, name: str, *args: str, settings: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``diana ARGS`` with the test config; ``settings`` are DIANA_* overrides."""
        log = open(self.logs / f"{name}.log", "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
        env["DIANA_CONFIG"] = str(self.config_file)
        env.update(settings or {})
        proc = subprocess.Popen(
            [sys.executable, "-m", "diana.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
        self.procs[name] = proc
        return proc

    def start_web(self, name: str, web_port: int, *args: str, settings: dict[str, str], timeout: float = 60) -> str:
        """Start ``diana serve ARGS`` with DICOMweb on ``web_port`` and wait until it answers HTTP; its base URL."""
        proc = self.start(name, "serve", *args, settings={**settings, "DIANA_DICOMWEB_PORT": str(web_port)})
        url = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(url + "/studies", timeout=2)
                return url
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, self.log_text(name)[-2000:]
                time.sleep(0.3)

    @contextmanager
    def running(
        self, processes: dict[str, tuple[str, ...]], echo_timeout: float, settings: dict[str, str] | None = None
    ) -> Iterator[Pipeline]:
        """Start ``processes`` (name -> ``diana`` arguments), wait until the receiver answers C-ECHO, and
        stop every process at the end."""
        try:
            for name, args in processes.items():
                self.start(name, *args, settings=settings)
            wait_for_echo(self.cfg, timeout=echo_timeout, procs=self.procs)
            yield self
        finally:
            # Also when the receiver never answered: processes left running would hold the next run's ports.
            for name in list(self.procs):
                self.stop(name)

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, kill: bool = False) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.kill() if kill else proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


PIPELINE = {
    "receiver": ("receive",),
    "aggregates": ("aggregate",),
    "dose": ("dose",),
    "archive-sink": ("sink", "archive"),
    "opensearch-sink": ("sink", "opensearch"),
}


@pytest.fixture(scope="session")
def pipeline(stack, cfg: Config, test_config_file: Path):
    logs = TEST_HOME / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    with Pipeline(cfg, test_config_file, {}, logs).running(PIPELINE, echo_timeout=60) as p:
        yield p


@pytest.fixture
def extra_receiver(pipeline):
    """Start another receiver on its own port with overridden settings; stopped after the test."""
    started: list[str] = []

    def start(number: int, **settings: str) -> Config:
        """A receiver on test port ``number`` (shifted), named ``receiver-NUMBER``."""
        name = f"receiver-{number}"
        env = {
            "DIANA_RECEIVER_PORT": str(port(number)),
            "DIANA_RECEIVER_METRICS_PORT": "0",
            **{f"DIANA_RECEIVER_{k.upper()}": v for k, v in settings.items()},
        }
        pipeline.start(name, "receive", settings=env)
        started.append(name)
        cfg = load_config(pipeline.config_file, environ=env)
        if "tls_cert_file" not in settings:
            wait_for_echo(cfg, timeout=30, procs={name: pipeline.procs[name]})
        return cfg

    yield start
    for name in started:
        if name in pipeline.procs:
            pipeline.stop(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ needs the real stack: mark it so ``-m "not integration"`` runs the rest."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)
