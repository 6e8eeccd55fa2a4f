"""Client libraries' repeated lines are held back (diana/logs.py): librdkafka logs every failed connection
attempt, about 20 times a second per client while a broker is down, and opensearch-py every failed
request with a traceback."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from diana.clients import kafka_consumer
from diana.config import KafkaConfig
from diana.logs import KAFKA_CLIENT_LOGGER, RepeatedLines, configure_logging

_REFUSED = "FAIL [rdkafka#consumer-1] [thrd:{0}/bootstrap]: {0}/bootstrap: Connect to ipv4#{0} failed: Connection refused (after {1}ms in state CONNECT)"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Timers:
    """Timers started by the filter, fired by the test (the filter's own are threads)."""

    def __init__(self) -> None:
        self.started: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay_s: float, callback: Callable[[], None]) -> _Timers:
        self.started.append((delay_s, callback))
        return self

    def cancel(self) -> None:
        pass

    def fire(self) -> None:
        started, self.started = self.started, []
        for _, callback in started:
            callback()


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.unformattable: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # as logging's own handlers do (handleError), never raised
            self.unformattable.append(record)


def _logger(name: str, repeats: RepeatedLines) -> tuple[logging.Logger, _Kept]:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.handlers[:] = [kept := _Kept()]
    logger.filters[:] = [repeats]
    logger.setLevel(logging.INFO)
    return logger, kept


def _filtered(name: str, **options) -> tuple[logging.Logger, _Kept, _Clock, _Timers]:
    clock, timers = _Clock(), _Timers()
    logger, kept = _logger(name, RepeatedLines(window_s=60, clock=clock, start_timer=timers, **options))
    return logger, kept, clock, timers


def test_a_flood_comes_out_as_its_first_line_then_one_count_a_window() -> None:
    logger, kept, clock, timers = _filtered("test.repeats.flood")
    for n in range(20):  # one second of an outage: the durations differ, the kind does not
        logger.error(_REFUSED.format("127.0.0.1:9092", n % 3))
        clock.now += 0.05
    assert kept.lines == [_REFUSED.format("127.0.0.1:9092", 0)]
    assert [round(delay, 2) for delay, _ in timers.started] == [59.95]  # one timer, for the window's end
    clock.now = 1060.0
    timers.fire()
    assert kept.lines[1].startswith(_REFUSED.format("127.0.0.1:9092", 19 % 3) + " (19 like it held back since ")
    assert kept.lines[1].endswith(" UTC)")
    logger.error(_REFUSED.format("127.0.0.1:9092", 0))  # the count opened a new window: held back
    assert len(kept.lines) == 2 and len(timers.started) == 1


def test_a_line_held_back_is_counted_even_if_none_follows_it() -> None:
    # A broker flapping: a second disconnect 30 s after the first, then quiet. It is written when the
    # window ends, not an hour later with the next one.
    logger, kept, clock, timers = _filtered("test.repeats.flap")
    disconnected = (
        "FAIL [rdkafka#consumer-1] [thrd:10.0.0.1:9092/1]: 10.0.0.1:9092/1: Disconnected (after {}ms in state UP)"
    )
    logger.error(disconnected.format(5123))
    clock.now += 30
    logger.error(disconnected.format(30001))
    assert len(kept.lines) == 1
    clock.now += 30
    timers.fire()
    assert kept.lines[1].startswith(disconnected.format(30001) + " (1 like it held back since ")
    clock.now += 3600  # quiet: a line of the kind now passes at once
    logger.error(disconnected.format(7))
    assert kept.lines[2] == disconnected.format(7)


def test_a_count_left_at_exit_is_written_by_flush() -> None:
    logger, kept, clock, timers = _filtered("test.repeats.exit")
    logger.warning("GET http://127.0.0.1:9200/x [status:N/A request:0.001s]")
    logger.warning("GET http://127.0.0.1:9200/x [status:N/A request:0.002s]")
    logger.filters[0].flush()  # what atexit does for the two clients' filters
    assert len(kept.lines) == 2 and "(1 like it held back since " in kept.lines[1]


def test_each_broker_and_each_message_keeps_its_own_line() -> None:
    logger, kept, clock, timers = _filtered("test.repeats.kinds")
    logger.error(_REFUSED.format("10.0.0.1:9092", 0))
    logger.error(_REFUSED.format("10.0.0.2:9092", 0))
    logger.error(
        "FAIL [rdkafka#consumer-1] [thrd:10.0.0.1:9092/1]: 10.0.0.1:9092/1: Disconnected (after 5123ms in state UP)"
    )
    logger.error(_REFUSED.format("10.0.0.1:9092", 3))
    assert len(kept.lines) == 3
    assert "10.0.0.2:9092" in kept.lines[1] and "Disconnected" in kept.lines[2]


def test_the_kinds_remembered_are_bounded_and_keep_their_counts() -> None:
    logger, kept, clock, timers = _filtered("test.repeats.bounded", max_kinds=10)
    logger.warning("GET http://127.0.0.1:9200/index-0 [status:N/A request:0.001s]")
    logger.warning("GET http://127.0.0.1:9200/index-0 [status:N/A request:0.009s]")  # held: a count pending
    for n in range(1, 25):
        logger.warning("GET http://127.0.0.1:9200/index-%d [status:N/A request:0.001s]", n)
    assert len(kept.lines) == 25
    clock.now += 60
    timers.fire()
    assert "index-0" in kept.lines[25] and "(1 like it held back since " in kept.lines[25]


def test_a_record_the_filter_cannot_read_is_let_through() -> None:
    logger, kept, clock, timers = _filtered("test.repeats.broken")
    # getMessage() raises TypeError: from a filter it would reach this line. Let through, the handler
    # deals with it as handlers do.
    logger.warning("%d widgets", "not a number")
    assert kept.lines == [] and [r.msg for r in kept.unformattable] == ["%d widgets"]


def test_a_line_after_its_window_but_before_the_timer_carries_the_count() -> None:
    logger, kept, clock, timers = _filtered("test.repeats.race")
    logger.error(_REFUSED.format("127.0.0.1:9092", 0))
    logger.error(_REFUSED.format("127.0.0.1:9092", 1))  # held
    clock.now += 61  # the window ended; its timer has not run yet
    logger.error(_REFUSED.format("127.0.0.1:9092", 2))
    assert kept.lines[1].startswith(_REFUSED.format("127.0.0.1:9092", 2) + " (1 like it held back since ")
    assert kept.lines[1].endswith(" UTC before this)")
    timers.fire()  # late: nothing left to write
    assert len(kept.lines) == 2


def test_a_timer_replaced_after_it_fired_leaves_the_new_one_in_charge() -> None:
    clock, timers = _Clock(), _Timers()
    repeats = RepeatedLines(window_s=60, clock=clock, start_timer=timers)
    with repeats._lock:
        repeats._arm(1100.0)
        repeats._arm(1050.0)  # earlier: replaces it (the first may have fired already)
    stale = timers.started[0][1]
    stale()  # the first one's callback, run after all
    with repeats._lock:
        repeats._arm(1070.0)  # later than the one in charge: no new timer
    assert len(timers.started) == 2


def test_no_timer_to_be_had_lets_the_lines_through() -> None:
    def no_thread(_delay: float, _callback: Callable[[], None]) -> None:
        raise RuntimeError("can't start new thread")

    logger, kept = _logger("test.repeats.nothread", RepeatedLines(window_s=60, clock=_Clock(), start_timer=no_thread))
    for n in range(3):
        logger.error(_REFUSED.format("127.0.0.1:9092", n))
    assert len(kept.lines) == 3  # none held back without a timer to count them


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
