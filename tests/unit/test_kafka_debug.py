"""[kafka] debug: librdkafka's debug lines for every Kafka client, through the diana.kafka logger."""

from __future__ import annotations

import logging
import time

import pytest

from diana.clients import kafka_producer, kafka_settings
from diana.config import ConfigError, KafkaConfig, load_config
from diana.logs import KAFKA_CLIENT_LOGGER, RepeatedLines


@pytest.fixture(autouse=True)
def _kafka_logger_level_restored():
    level = KAFKA_CLIENT_LOGGER.level  # kafka_settings lowers it when debug is on
    yield
    KAFKA_CLIENT_LOGGER.setLevel(level)


def test_the_contexts_are_checked_at_start_up_with_the_fix_in_the_message() -> None:
    with pytest.raises(ConfigError, match=r"\[kafka\] debug = 'cgrp,fetchh': fetchh is not a librdkafka debug"):
        load_config(None, environ={"DIANA_KAFKA_DEBUG": "cgrp,fetchh"})
    assert load_config(None, environ={"DIANA_KAFKA_DEBUG": "cgrp, fetch"}).kafka.debug == "cgrp, fetch"
    assert load_config(None, environ={}).kafka.debug == ""
    # As librdkafka reads it: any case, blanks around each context.
    assert load_config(None, environ={"DIANA_KAFKA_DEBUG": "CGRP,\tFetch"}).kafka.debug == "CGRP,\tFetch"


def test_off_by_default_and_on_with_librdkafkas_debug_level() -> None:
    assert "debug" not in kafka_settings(KafkaConfig()) and kafka_settings(KafkaConfig())["log_level"] == 3
    on = kafka_settings(KafkaConfig(debug="CGRP, fetch"))
    assert on["debug"] == "cgrp,fetch" and on["log_level"] == 7
    # Blanks alone are no context: off, not an empty "debug" that librdkafka refuses at every client.
    assert "debug" not in kafka_settings(KafkaConfig(debug=" , "))


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_real_clients_debug_lines_reach_the_log_even_at_log_level_info() -> None:
    kept = _Kept()
    KAFKA_CLIENT_LOGGER.addHandler(kept)
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)  # [log] level = "info"
    try:
        # A closed port: the broker context logs the connection attempts, no broker needed.
        producer = kafka_producer(KafkaConfig(bootstrap="127.0.0.1:1", debug="broker"))
        deadline = time.monotonic() + 10
        while not any(r.levelno == logging.DEBUG for r in kept.records) and time.monotonic() < deadline:
            producer.poll(0.2)  # librdkafka's log lines are handed over in poll
        producer.flush(0)
    finally:
        KAFKA_CLIENT_LOGGER.removeHandler(kept)
        logging.getLogger().setLevel(root_level)
    debug = [r for r in kept.records if r.levelno == logging.DEBUG]
    assert debug, "no librdkafka debug line reached diana.kafka"
    assert any("127.0.0.1:1" in r.getMessage() for r in debug)


def test_debug_lines_are_never_held_back_as_repeats() -> None:
    repeats = RepeatedLines(window_s=60, start_timer=lambda delay, callback: None)
    line = logging.LogRecord("diana.kafka", logging.DEBUG, __file__, 1, "SEND Sent HeartbeatRequest", None, None)
    warning = logging.LogRecord("diana.kafka", logging.WARNING, __file__, 1, "Connection refused", None, None)
    assert [repeats.filter(line) for _ in range(3)] == [True, True, True]
    assert [repeats.filter(warning) for _ in range(3)] == [True, False, False]
