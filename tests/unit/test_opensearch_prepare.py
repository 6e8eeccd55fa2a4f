"""The OpenSearch sink's preparation of a batch (reindex prepares the next batch while one is sent):
what each bulk request holds, without OpenSearch (``prepare`` never touches the client)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from confluent_kafka import Message

from diana.schemas.codec import default_codec
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import INSTANCES
from diana.sinks.opensearch import OpenSearchSink


def _event(sop: str, size: int) -> Message:
    record = {
        "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": size,
        "sha256": "0" * 64,
        "landing_path": f"x/{sop}.dcm",
        "received_at": datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
        "source": "C_STORE",
        "header_json": '{"00080060":{"vr":"CS","Value":["CT"]}}',
    }
    value = default_codec().encode(INSTANCES.value_schema, record)
    return Message(topic=INSTANCES.name, partition=0, offset=size, value=value)


def _lines(body: bytes) -> list[dict]:
    assert body.endswith(b"\n")
    return [json.loads(line) for line in body.splitlines()]


def _sink(max_bytes: int = 5_000_000, policy: str = "KEEP_FIRST") -> OpenSearchSink:
    return OpenSearchSink(None, IndexLayout("diana"), max_bytes=max_bytes, index_version=7, conflict_policy=policy)


def test_first_wins_keeps_the_earliest_event_and_lists_the_undecodable() -> None:
    junk = Message(topic=INSTANCES.name, partition=0, offset=99, value=b"not avro")
    batch = [_event("1.1", 1), junk, _event("1.1", 2), _event("1.2", 3)]
    prepared = _sink().prepare(batch)
    assert prepared.messages is batch
    assert [(m.offset(), "missing C3 01" in reason) for m, reason in prepared.undecodable] == [(99, True)]
    (request,) = prepared.requests
    lines = _lines(request.body)
    assert lines[0::2] == [
        {"create": {"_index": "diana-instances-v7", "_id": "1.1"}},
        {"create": {"_index": "diana-instances-v7", "_id": "1.2"}},
    ]
    assert [doc["size_bytes"] for doc in lines[1::2]] == [1, 3]  # the first copy of 1.1
    assert lines[1]["dicom"] == {"00080060": {"vr": "CS", "Value": ["CT"]}}
    assert [m.offset() for m, _, _ in request.items] == [1, 3]


def test_replace_keeps_the_latest_event() -> None:
    (request,) = _sink(policy="REPLACE").prepare([_event("1.1", 1), _event("1.1", 2)]).requests
    lines = _lines(request.body)
    assert lines[0] == {"index": {"_index": "diana-instances-v7", "_id": "1.1"}}
    assert lines[1]["size_bytes"] == 2 and len(lines) == 2


def test_requests_stay_under_max_bytes_and_follow_the_batch_order() -> None:
    batch = [_event(f"1.{i}", i) for i in range(10)]
    one = len(_sink().prepare(batch[:1]).requests[0].items[0][2])  # every document here has the same size
    requests = _sink(max_bytes=3 * one).prepare(batch).requests
    assert [len(r.items) for r in requests] == [3, 3, 3, 1]
    ids = [line["create"]["_id"] for r in requests for line in _lines(r.body)[0::2]]
    assert ids == [f"1.{i}" for i in range(10)]
    for r in requests:
        assert [m.offset() for m, _, _ in r.items] == [int(line["create"]["_id"][2:]) for line in _lines(r.body)[0::2]]


def test_a_batch_is_cut_into_the_parallel_requests_under_max_bytes() -> None:
    batch = [_event(f"1.{i}", i) for i in range(10)]
    one = len(_sink().prepare(batch[:1]).requests[0].items[0][2])
    spread = OpenSearchSink(None, IndexLayout("diana"), index_version=7, parallel_requests=4)
    assert [len(r.items) for r in spread.prepare(batch).requests] == [3, 3, 3, 1]
    # max_bytes still bounds each request; fewer documents than requests: one each
    capped = OpenSearchSink(None, IndexLayout("diana"), max_bytes=2 * one, index_version=7, parallel_requests=4)
    assert [len(r.items) for r in capped.prepare(batch).requests] == [2, 2, 2, 2, 2]
    assert [len(r.items) for r in spread.prepare(batch[:2]).requests] == [1, 1]


class _AllThereIndex:
    """Every create answers 409 (a sink restarting on a batch it wrote), and reading them back fails."""

    def __init__(self, read_error: Exception):
        self.read_error, self.calls = read_error, []

    def bulk(self, body, filter_path=None, params=None):
        self.calls.append("bulk")
        return {"items": [{"create": {"status": 409}} for _ in body.splitlines()[0::2]]}

    def mget(self, **kwargs):
        self.calls.append("mget")
        raise self.read_error


def test_a_read_back_that_fails_for_now_retries_the_batch_instead_of_dead_lettering_it() -> None:
    """The 409s' read back (whether an identifiers-only document of the same bytes is there) raised past
    the sink: every message of the batch was dead-lettered as unexpected, and the batch committed."""
    from opensearchpy.exceptions import TransportError

    from diana.sinks.consumer import RetryableError

    client = _AllThereIndex(TransportError(429, "circuit_breaking_exception", {}))
    sink = OpenSearchSink(client, IndexLayout("diana"), index_version=7)
    with pytest.raises(RetryableError):
        sink.write([_event("1.1", 1), _event("1.2", 2)], dead=None)  # type: ignore[arg-type]
    assert client.calls == ["bulk", "mget"]
