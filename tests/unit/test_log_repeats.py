"""Client libraries' repeated lines are held back (diana/logs.py): librdkafka logs every failed connection
attempt, about 20 times a second per client while a broker is down, and opensearch-py every failed
request with a traceback."""

from __future__ import annotations

import logging
import socket
import time

from diana.clients import kafka_consumer
from diana.config import KafkaConfig
from diana.logs import KAFKA_CLIENT_LOGGER, RepeatedLines, configure_logging

_REFUSED = "FAIL [rdkafka#consumer-1] [thrd:{0}/bootstrap]: {0}/bootstrap: Connect to ipv4#{0} failed: Connection refused (after {1}ms in state CONNECT)"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _logger(name: str, repeats: RepeatedLines) -> tuple[logging.Logger, _Kept]:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.handlers[:] = [kept := _Kept()]
    logger.filters[:] = [repeats]
    logger.setLevel(logging.INFO)
    return logger, kept


def test_a_line_repeated_within_the_window_is_counted_then_said_once_with_the_count() -> None:
    clock = _Clock()
    logger, kept = _logger("test.repeats.window", RepeatedLines(window_s=60, clock=clock))
    for n in range(20):  # one second of an outage: the durations differ, the kind does not
        logger.error(_REFUSED.format("127.0.0.1:9092", n % 3))
        clock.now += 0.05
    assert kept.lines == [_REFUSED.format("127.0.0.1:9092", 0)]
    clock.now += 60
    logger.error(_REFUSED.format("127.0.0.1:9092", 7))
    assert kept.lines[1] == _REFUSED.format("127.0.0.1:9092", 7) + " (19 more like it in the last 60 s)"
    logger.error(_REFUSED.format("127.0.0.1:9092", 0))  # a new window: held back again, counted from 0
    assert len(kept.lines) == 2


def test_each_broker_and_each_message_keeps_its_own_line() -> None:
    logger, kept = _logger("test.repeats.kinds", RepeatedLines(window_s=60, clock=_Clock()))
    logger.error(_REFUSED.format("10.0.0.1:9092", 0))
    logger.error(_REFUSED.format("10.0.0.2:9092", 0))
    logger.error(
        "FAIL [rdkafka#consumer-1] [thrd:10.0.0.1:9092/1]: 10.0.0.1:9092/1: Disconnected (after 5123ms in state UP)"
    )
    logger.error(_REFUSED.format("10.0.0.1:9092", 3))
    assert len(kept.lines) == 3
    assert "10.0.0.2:9092" in kept.lines[1] and "Disconnected" in kept.lines[2]


def test_the_kinds_remembered_are_bounded() -> None:
    logger, kept = _logger("test.repeats.bounded", RepeatedLines(window_s=60, clock=_Clock(), max_kinds=10))
    for n in range(25):
        logger.warning("GET http://127.0.0.1:9200/index-%d [status:N/A request:0.001s]", n)
    logger.warning("GET http://127.0.0.1:9200/index-24 [status:N/A request:0.004s]")  # remembered still
    assert len(kept.lines) == 25


def test_a_real_kafka_client_facing_a_closed_port_says_it_once() -> None:
    # librdkafka itself, as every diana process configures it: without the filter this logged about
    # 40 lines in these two seconds (docs/faults, issue 19 stop 30).
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configure_logging("warning")
    kept = _Kept()
    KAFKA_CLIENT_LOGGER.addHandler(kept)
    try:
        consumer = kafka_consumer(KafkaConfig(bootstrap=f"127.0.0.1:{port}"), "test-repeats")
        consumer.subscribe(["nothing"])
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            consumer.poll(0.2)
        consumer.close()
    finally:
        KAFKA_CLIENT_LOGGER.removeHandler(kept)
    refused = [line for line in kept.lines if f"127.0.0.1:{port}" in line and "refused" in line]
    assert len(refused) == 1, kept.lines


def test_opensearch_clients_failed_requests_are_one_line_each() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from opensearchpy import OpenSearch
    from opensearchpy.exceptions import ConnectionError as Refused

    configure_logging("warning")
    kept = _Kept()
    logging.getLogger("opensearch").addHandler(kept)
    try:
        client = OpenSearch(hosts=[f"http://127.0.0.1:{port}"], max_retries=0)
        try:
            client.info()
        except Refused:
            pass
        else:
            raise AssertionError("nothing should answer on that port")
    finally:
        logging.getLogger("opensearch").removeHandler(kept)
    assert len(kept.lines) == 1, kept.lines
    assert "Connection refused" in kept.lines[0] and "Traceback" not in kept.lines[0]
