"""Unit: one config object, file then environment, unknown keys rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from diana.config import ConfigError, load_config
from tests.support.paths import REPO


def test_defaults_file_and_environment_in_that_order(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text('[receiver]\nport = 4242\nae_title = "FILEAE"\n[storage]\narchive_dir = "arch"\n')
    cfg = load_config(f, environ={"DIANA_RECEIVER_PORT": "5000"})
    assert cfg.receiver.port == 5000  # environment wins
    assert cfg.receiver.ae_title == "FILEAE"  # file beats default
    assert cfg.kafka.bootstrap == "127.0.0.1:9092"  # default
    assert cfg.path(cfg.storage.archive_dir) == tmp_path / "arch"  # relative to the file


@pytest.mark.parametrize(
    "text,message",
    [
        ("[reciever]\nport = 1\n", "unknown section \\[reciever\\]"),
        ("[receiver]\nprot = 1\n", "unknown key\\(s\\) prot"),
        ('[receiver]\nport = "many"\n', "expected int"),
        ("[receiver\n", "not valid TOML"),
        ("[stream]\ntransaction_max_events = 0\n", "transaction_max_events = 0: use 1 to 100000"),
        ("[kafka]\nmax_message_bytes = 200000\n", "max_message_bytes = 200000: use 262144 \\(256 KiB\\) or more"),
        ("[kafka]\nfetch_min_bytes = 0\n", "fetch_min_bytes = 0: use 1 to 1048576"),
        ("[kafka]\nfetch_min_bytes = 2000000\n", "fetch_min_bytes = 2000000: use 1 to 1048576"),
        ("[kafka]\nfetch_wait_max_ms = -1\n", "fetch_wait_max_ms = -1: use 0 to 59000"),
        ("[kafka]\nfetch_wait_max_ms = 60000\n", "fetch_wait_max_ms = 60000: use 0 to 59000"),
        ("[receiver]\nmax_associations_per_host = 0\n", "max_associations_per_host = 0: use 1 or more"),
        ("[receiver]\npdu_read_timeout_s = 0\n", "pdu_read_timeout_s = 0.0: use a value above 0"),
        ("[receiver]\ntls_handshake_timeout_s = -1\n", "tls_handshake_timeout_s = -1.0: use a value above 0"),
        ("[receiver]\nreconcile_interval_s = 0\n", "reconcile_interval_s = 0.0: use a value above 0"),
        ("[receiver]\nreconcile_interval_s = nan\n", "reconcile_interval_s = nan: use a value above 0"),
        ("[receiver]\nmax_inflated_bytes = -5\n", "max_inflated_bytes = -5: use 1048576 or more"),
        ("[receiver]\nmax_pdu_bytes = -1\n", "max_pdu_bytes = -1: use 0 or more \\(0: no limit"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text, message):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(f, environ={})


def test_max_pdu_bytes_0_is_pynetdicoms_no_limit_and_accepted(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text("[receiver]\nmax_pdu_bytes = 0\n")
    assert load_config(f, environ={}).receiver.max_pdu_bytes == 0


def test_unknown_environment_setting_is_rejected():
    with pytest.raises(ConfigError, match="DIANA_KAFKA_BOOTSTRAPP"):
        load_config(None, environ={"DIANA_KAFKA_BOOTSTRAPP": "x"})


def test_missing_file_says_so(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_the_example_file_documents_exactly_the_defaults():
    example = REPO / "diana.example.toml"
    from_file = load_config(example, environ={})
    defaults = load_config(None, environ={})
    for section in (
        "receiver",
        "storage",
        "kafka",
        "opensearch",
        "sinks",
        "stream",
        "stack",
        "metrics",
        "log",
        "query_retrieve",
        "dicomweb",
    ):
        assert getattr(from_file, section) == getattr(defaults, section), section


def test_every_consumer_batches_its_fetches_as_configured_unless_told_otherwise():
    from diana.clients import consumer_settings

    cfg = load_config(None, environ={"DIANA_KAFKA_FETCH_WAIT_MAX_MS": "20"})
    settings = consumer_settings(cfg.kafka, "fetch-settings")
    assert (settings["fetch.min.bytes"], settings["fetch.wait.max.ms"], settings["group.id"]) == (
        65536,
        20,
        "fetch-settings",
    )
    assert consumer_settings(cfg.kafka, "g", {"fetch.min.bytes": 1})["fetch.min.bytes"] == 1
