"""When a sink counts its consumer as no longer taking part in its group (diana/group_membership.py): no group
request sent and none awaiting an answer, while connected to a broker, for the whole limit."""

from __future__ import annotations

import json

from confluent_kafka import KafkaError
from confluent_kafka.admin import TopicMetadata

from diana.group_membership import GroupActivity, GroupWatch, group_activity, missing_topic


def _stats(
    heartbeats: int, joins: int = 2, awaiting: int = 0, broker_state: str = "UP", coordinator_state: str | None = None
) -> dict:
    """A librdkafka consumer's statistics report, cut to what the watch reads (as librdkafka 2.16 writes it)."""
    return {
        "cgrp": {"state": "up", "join_state": "steady"},
        "brokers": {
            "127.0.0.1:9092/1": {
                "nodeid": 1,
                "state": broker_state,
                "source": "learned",
                "waitresp_cnt": 0,
                "req": {"Fetch": 16, "Metadata": 2, "FindCoordinator": 2},
            },
            "GroupCoordinator": {
                "nodeid": -1,
                "state": broker_state if coordinator_state is None else coordinator_state,
                "source": "logical",
                "waitresp_cnt": awaiting,
                "req": {"JoinGroup": joins, "SyncGroup": 1, "Heartbeat": heartbeats, "OffsetFetch": 1},
            },
            ":0/internal": {"nodeid": -1, "state": "UP", "source": "internal", "waitresp_cnt": 0, "req": {}},
        },
    }


def test_the_group_requests_and_the_connection_are_read_from_a_report() -> None:
    assert group_activity(_stats(heartbeats=3)) == GroupActivity(requests=6, awaiting=0, connected=True)
    assert group_activity(_stats(heartbeats=3, awaiting=1)).awaiting == 1
    # The coordinator's connection counts as one; the client's internal broker (always UP) does not.
    assert group_activity(_stats(heartbeats=3, broker_state="DOWN", coordinator_state="UP")).connected is True
    assert group_activity(_stats(heartbeats=3, broker_state="DOWN")).connected is False
    assert group_activity({}) == GroupActivity(requests=0, awaiting=0, connected=False)


def test_a_consumer_that_heartbeats_is_never_stuck() -> None:
    watch = GroupWatch(limit_s=30, interval_s=5)
    for beat in range(100):
        watch.observe(group_activity(_stats(heartbeats=beat)), now=5.0 * beat)
    assert watch.stuck is False


def test_silent_while_connected_for_the_whole_limit_is_stuck() -> None:
    watch = GroupWatch(limit_s=30, interval_s=5)
    quiet = group_activity(_stats(heartbeats=7))
    for now in (0, 5, 10, 15, 20, 25):
        watch.observe(quiet, now)
    assert watch.stuck is False  # silent since the first report: 25 s
    watch.observe(quiet, 30)
    assert watch.stuck is True


def test_a_request_awaiting_its_answer_is_taking_part() -> None:
    """A JoinGroup the coordinator holds until the other members rejoin."""
    watch = GroupWatch(limit_s=30, interval_s=5)
    for now in range(0, 100, 5):
        watch.observe(group_activity(_stats(heartbeats=7, awaiting=1)), now)
    assert watch.stuck is False


def test_time_without_a_connection_starts_the_count_again() -> None:
    """A broker outage: the consumer rejoins after the broker's return, and the outage is not counted."""
    watch = GroupWatch(limit_s=30, interval_s=5)
    for now in (0, 5, 10, 15):
        watch.observe(group_activity(_stats(heartbeats=7)), now)
    watch.observe(group_activity(_stats(heartbeats=7, broker_state="DOWN")), 20)
    for now in range(25, 55, 5):
        watch.observe(group_activity(_stats(heartbeats=7)), now)
    assert watch.stuck is False  # silent and connected since 25: 25 s
    watch.observe(group_activity(_stats(heartbeats=7)), 55)
    assert watch.stuck is True


def test_the_watch_reads_the_clients_json_and_asks_for_it() -> None:
    times = iter([0.0, 30.0])
    watch = GroupWatch(limit_s=30, interval_s=20, clock=lambda: next(times))
    assert watch.settings()["statistics.interval.ms"] == 20000
    assert watch.settings()["stats_cb"] == watch.on_stats
    watch.on_stats(json.dumps(_stats(heartbeats=1)))
    watch.on_stats(json.dumps(_stats(heartbeats=1)))
    assert watch.stuck is True


def test_reports_held_back_by_a_long_write_start_the_count_again() -> None:
    """Reports wait in the queue while the sink writes; handled together after it, they must not add the
    write's time to the silence (the clock is the moment each report is handled)."""
    watch = GroupWatch(limit_s=30, interval_s=5)
    quiet = group_activity(_stats(heartbeats=7))
    watch.observe(quiet, 0)
    watch.observe(quiet, 5)  # silent since 0
    for _ in range(12):  # a write of 60 s: twelve reports handled at its end
        watch.observe(quiet, 65)
    assert watch.stuck is False
    for now in range(70, 95, 5):
        watch.observe(quiet, now)
    assert watch.stuck is False
    watch.observe(quiet, 95)  # silent 30 s since the first report after the write
    assert watch.stuck is True


def test_a_request_sent_clears_stuck_and_a_falling_count_is_a_request() -> None:
    watch = GroupWatch(limit_s=30, interval_s=5)
    for now in range(0, 35, 5):
        watch.observe(group_activity(_stats(heartbeats=7)), now)
    assert watch.stuck is True
    watch.observe(group_activity(_stats(heartbeats=8)), 35)  # a report queued behind it: a heartbeat
    assert watch.stuck is False
    watch.observe(group_activity(_stats(heartbeats=0, joins=0)), 40)  # counters of a broker made anew
    assert watch.stuck is False and watch.quiet_since is None


def test_a_watch_restarted_counts_its_limit_again_from_the_next_report() -> None:
    # What GroupWatch.kept_waiting_for does with a consumer found waiting for its topics rather than stuck.
    watch = GroupWatch(limit_s=30, interval_s=5)
    for now in range(0, 40, 5):
        watch.observe(group_activity(_stats(heartbeats=0, joins=0)), now)
    assert watch.stuck
    watch.restart()
    for now in range(40, 70, 5):
        watch.observe(group_activity(_stats(heartbeats=0, joins=0)), now)
    assert not watch.stuck  # 25 s of a new count
    watch.observe(group_activity(_stats(heartbeats=0, joins=0)), 70)
    assert watch.stuck


def _topic(name: str, error: int | None = None) -> TopicMetadata:
    metadata = TopicMetadata()
    metadata.topic, metadata.error = name, None if error is None else KafkaError(error)
    return metadata


def test_a_topic_is_missing_when_absent_or_unknown_and_not_for_another_error() -> None:
    known = {
        "dicom.instances": _topic("dicom.instances"),
        "dicom.series": _topic("dicom.series", KafkaError.LEADER_NOT_AVAILABLE),  # a broker restarting
        "dicom.studies": _topic("dicom.studies", KafkaError.UNKNOWN_TOPIC_OR_PART),
    }
    assert [missing_topic(known, t) for t in ("dicom.instances", "dicom.series", "dicom.studies", "dose.events")] == [
        False,
        False,
        True,
        True,
    ]
