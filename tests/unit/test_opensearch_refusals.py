"""What the OpenSearch sink does with a bulk request refused as a whole (413 from a proxy or from
OpenSearch's http.max_content_length, a malformed request's 400), and with revisions the index refuses
for a higher one (409). A stand-in for the client answers as OpenSearch (or a proxy in front of it) does."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from confluent_kafka import Message
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from opensearchpy.exceptions import RequestError, TransportError
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from diana.schemas.codec import default_codec
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import INSTANCES, SERIES
from diana.sinks import opensearch
from diana.sinks.consumer import RetryableError
from diana.sinks.opensearch import OpenSearchSink


@pytest.fixture(autouse=True)
def _fresh_logger(monkeypatch):
    # A logger already used is kept bound to its handler (cache_logger_on_first_use): capture_logs needs a fresh one.
    monkeypatch.setattr(opensearch, "log", structlog.get_logger("diana.sink.opensearch"))


NGINX_413 = "<html><head><title>413 Request Entity Too Large</title></head><body>nginx</body></html>"
AT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _instance(sop: str, offset: int, header: str = '{"00080060":{"vr":"CS","Value":["CT"]}}') -> Message:
    record = {
        "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": 1000,
        "sha256": "0" * 64,
        "landing_path": f"x/{sop}.dcm",
        "received_at": AT,
        "source": "C_STORE",
        "header_json": header,
    }
    return Message(
        topic=INSTANCES.name, partition=0, offset=offset, value=default_codec().encode(INSTANCES.value_schema, record)
    )


def _series(uid: str, offset: int, revision: int, last: datetime = AT, description: str = "CHEST") -> Message:
    record = {
        "series_instance_uid": uid,
        "study_instance_uid": "1.2.3",
        "revision": revision,
        "patient_id": None,
        "modality": "CT",
        "series_number": 1,
        "series_description": description,
        "body_part_examined": None,
        "station_name": None,
        "manufacturer": None,
        "instance_count": revision,
        "total_bytes": 1000 * revision,
        "min_instance_number": 1,
        "max_instance_number": revision,
        "sop_class_uids": [],
        "transfer_syntax_uids": [],
        "first_received_at": AT,
        "last_received_at": last,
        "status": "UPDATED",
        "version": 0,
        "verdict": None,
        "missing_instance_numbers": [],
        "expected_instances": None,
        "quiet_seconds": 10.0,
        "completed_at": None,
        "number_of_frames": revision,
    }
    return Message(
        topic=SERIES.name, partition=0, offset=offset, value=default_codec().encode(SERIES.value_schema, record)
    )


class _Dead:
    def __init__(self):
        self.sent: list[tuple[int, str]] = []

    def send(self, msg, reason):
        self.sent.append((msg.offset(), reason))


def _actions(body: bytes) -> list[tuple[str, dict, dict | None]]:
    """(op, action metadata, document) per item of an NDJSON bulk body."""
    lines = [json.loads(line) for line in body.splitlines()]
    items, i = [], 0
    while i < len(lines):
        ((op, meta),) = lines[i].items()
        doc = None if op == "delete" else lines[i + 1]
        items.append((op, meta, doc))
        i += 1 if op == "delete" else 2
    return items


class _Cluster:
    """OpenSearch behind a proxy: a body over ``limit`` bytes is refused whole with the proxy's 413 (as
    OpenSearch's own http.max_content_length would); a request holding a negative version fails OpenSearch's
    validation, a whole request's 400; every other item is written."""

    def __init__(self, limit: int = 10**9, answer: Exception | None = None):
        self.limit, self.answer = limit, answer
        self.sizes: list[int] = []  # every body sent
        self.written: list[str] = []  # ids written, in order
        self.stored: dict[str, dict] = {}

    def bulk(self, body, filter_path=None, params=None):
        self.sizes.append(len(body))
        if self.answer is not None:
            raise self.answer
        if len(body) > self.limit:
            raise TransportError(413, NGINX_413, NGINX_413)
        actions = _actions(body)
        if any(meta.get("version", 0) < 0 for _, meta, _ in actions):
            error = {
                "type": "action_request_validation_exception",
                "reason": "Validation Failed: 1: illegal version value [-1] for version type [EXTERNAL_GTE];",
            }
            raise RequestError(400, error["type"], {"error": {**error, "root_cause": [error]}, "status": 400})
        items = []
        for op, meta, doc in actions:
            self.written.append(meta["_id"])
            self.stored[meta["_id"]] = doc or {}
            items.append({op: {"status": 201}})
        return {"items": items}


@pytest.mark.parametrize("parallel_requests", [1, 4])  # 4: the reindex's requests in flight at once
def test_a_request_over_a_proxys_limit_is_sent_in_halves_and_every_document_written(parallel_requests: int) -> None:
    """Before: the 413 was an "OpenSearch unavailable" RetryableError, the batch retried for ever."""
    batch = [_instance(f"1.{i}", i) for i in range(10)]
    one = len(OpenSearchSink(None, IndexLayout("diana"), index_version=2).prepare(batch[:1]).requests[0].body)
    cluster = _Cluster(limit=2 * one)
    sink = OpenSearchSink(cluster, IndexLayout("diana"), index_version=2, parallel_requests=parallel_requests)
    dead = _Dead()
    with capture_logs() as logs:
        sink.write(batch, dead)
        assert sorted(cluster.written) == sorted(f"1.{i}" for i in range(10)) and dead.sent == []
        assert max(cluster.sizes) > 2 * one  # the whole request went first, was refused, then its halves
        # the next batch is cut below the size refused before it goes: nothing refused again
        sent_before = len(cluster.sizes)
        sink.write([_instance(f"2.{i}", i) for i in range(10)], dead)
    assert all(size <= 2 * one for size in cluster.sizes[sent_before:])
    assert len(cluster.written) == 20 and dead.sent == []
    refused = [line for line in logs if line["event"] == "opensearch.request_refused"]
    assert len(refused) == 1  # said once, with the status and the fix
    assert refused[0]["status"] == 413 and "bulk_max_bytes" in refused[0]["fix"]
    assert "client_max_body_size" in refused[0]["fix"]


def test_a_document_refused_alone_with_413_is_dead_lettered_and_the_rest_written() -> None:
    big = "S" * 5000  # a value of the document, never in the dead letter's reason
    batch = [_series("1.2.3.1", 1, 3), _series("1.2.3.2", 2, 3, description=big), _series("1.2.3.3", 3, 3)]
    cluster = _Cluster(limit=3000)
    dead = _Dead()
    OpenSearchSink(cluster, IndexLayout("diana"), index_version=1).write(batch, dead)
    assert sorted(cluster.written) == ["1.2.3.1", "1.2.3.3"]
    ((offset, reason),) = dead.sent
    assert offset == 2 and "request_too_large" in reason and "HTTP 413" in reason
    assert "SSSS" not in reason and "nginx" not in reason


def test_an_instance_refused_alone_with_413_is_indexed_without_its_header_and_dead_lettered() -> None:
    """As any instance document OpenSearch refuses: findable by its identifiers, the refusal said."""
    huge = json.dumps({"7FE00010": {"vr": "OB", "InlineBinary": "A" * 6000}})
    batch = [_instance("1.1", 1), _instance("1.2", 2, header=huge)]
    cluster = _Cluster(limit=4000)
    dead = _Dead()
    OpenSearchSink(cluster, IndexLayout("diana"), index_version=1).write(batch, dead)
    assert cluster.written == ["1.1", "1.2"]
    assert "dicom" not in cluster.stored["1.2"]
    assert "refused by the index: request_too_large" in cluster.stored["1.2"]["header_omitted"][-1]["reason"]
    ((offset, reason),) = dead.sent
    assert offset == 2 and "(indexed without its header)" in reason and "HTTP 413" in reason


def test_the_413_reason_of_a_document_alone_is_said_whole_in_the_dead_letter_and_the_index() -> None:
    """Before: the apostrophes of "a proxy's ... OpenSearch's" were taken for a quoted value and withheld, the
    fix's name (client_max_body_size) with them."""
    huge = json.dumps({"7FE00010": {"vr": "OB", "InlineBinary": "A" * 6000}})
    cluster = _Cluster(limit=3000)
    dead = _Dead()
    OpenSearchSink(cluster, IndexLayout("diana"), index_version=1).write(
        [_instance("1.1", 1), _instance("1.2", 2, header=huge)], dead
    )
    (alone,) = [size for size in cluster.sizes if size > 3000 and size < 7500]
    said = (
        f"request_too_large: HTTP 413 for a bulk request of this document alone ({alone} bytes): over the "
        "client_max_body_size of a proxy or the http.max_content_length of OpenSearch"
    )
    assert dead.sent == [(2, f"opensearch rejected 1.2 (indexed without its header): {said}")]
    assert cluster.stored["1.2"]["header_omitted"][-1]["reason"] == f"refused by the index: {said}"


class _RefusingEverything(_Cluster):
    """A proxy answering every request with ``status`` and its own page, until ``fixed``."""

    def __init__(self, status: int, page: str, refuse_from: int = 0):
        super().__init__()
        self.status, self.page, self.refuse_from, self.fixed = status, page, refuse_from, False

    def bulk(self, body, filter_path=None, params=None):
        if self.fixed or len(self.sizes) < self.refuse_from:
            return super().bulk(body, filter_path, params)
        self.sizes.append(len(body))
        raise TransportError(self.status, self.page, self.page)


NGINX_400 = "<html><head><title>400 Request Header Or Cookie Too Large</title></head><body>nginx</body></html>"


def test_a_proxys_400_page_is_retried_not_split_nor_dead_lettered() -> None:
    """Before: a proxy answering 400 to everything had the whole stream dead-lettered (298 requests for 100
    messages) and its offsets committed: only OpenSearch's own JSON error is about the documents."""
    proxy = _RefusingEverything(400, NGINX_400)
    dead = _Dead()
    with pytest.raises(RetryableError, match=r"HTTP 400, not in the words of OpenSearch") as raised:
        OpenSearchSink(proxy, IndexLayout("diana"), index_version=1).write(
            [_series(f"1.2.3.{i}", i, 3) for i in range(10)], dead
        )
    assert len(proxy.sizes) == 1 and dead.sent == [] and "nginx" not in str(raised.value)


@pytest.mark.parametrize("parallel_requests", [1, 3])
def test_a_proxy_refusing_every_request_with_413_is_retried_and_nothing_dead_lettered(parallel_requests: int) -> None:
    """Before: 100 of 100 messages dead-lettered, write() returned and the offsets were committed; the next
    batch went as single documents (the threshold set to one document's size) and was dead-lettered too."""
    proxy = _RefusingEverything(413, NGINX_413)
    sink = OpenSearchSink(proxy, IndexLayout("diana"), index_version=1, parallel_requests=parallel_requests)
    batch = [_instance(f"1.{i}", i) for i in range(50)] + [_series(f"1.2.3.{i}", 100 + i, 3) for i in range(50)]
    dead = _Dead()
    with pytest.raises(RetryableError, match=r"HTTP 413.*none accepted.*client_max_body_size"):
        sink.write(batch, dead)
    assert dead.sent == [] and proxy.written == []
    proxy.fixed, sent = True, len(proxy.sizes)
    sink.write(batch, dead)  # the consumer writes the batch again: as it was cut, nothing split
    assert dead.sent == [] and len(proxy.sizes) - sent == parallel_requests
    assert sorted(proxy.written) == sorted([*(f"1.{i}" for i in range(50)), *(f"1.2.3.{i}" for i in range(50))])


def test_a_document_refused_with_413_though_no_larger_than_a_request_accepted_is_retried() -> None:
    """The proxy starts refusing everything in the middle of a split: the first half was accepted, the second
    half's documents are each smaller than it, so not refused for their size."""
    batch = [_series(f"1.2.3.{i}", i, 3) for i in range(4)]
    one = len(OpenSearchSink(None, IndexLayout("diana"), index_version=1).prepare(batch[:1]).requests[0].body)
    proxy = _RefusingEverything(413, NGINX_413, refuse_from=2)  # the whole request, then the first half, taken
    proxy.limit = 3 * one
    dead = _Dead()
    with pytest.raises(RetryableError, match=r"HTTP 413 for a document alone of \d+ bytes, no larger than"):
        OpenSearchSink(proxy, IndexLayout("diana"), index_version=1).write(batch, dead)
    assert dead.sent == [] and sorted(proxy.written) == ["1.2.3.0", "1.2.3.1"]


def test_the_size_refused_is_not_learnt_from_a_proxy_refusing_everything() -> None:
    """Before: after one batch refused by a proxy answering 413 to everything, 1,000 series went as 1,000
    single-document requests until the sink restarted."""
    proxy = _RefusingEverything(413, NGINX_413)
    sink = OpenSearchSink(proxy, IndexLayout("diana"), index_version=1, max_bytes=5_000_000)
    with pytest.raises(RetryableError):
        sink.write([_series(f"1.2.3.{i}", i, 3) for i in range(4)], _Dead())
    proxy.fixed, sent = True, len(proxy.sizes)
    sink.write([_series(f"9.{i}", i, 3) for i in range(1000)], _Dead())
    assert len(proxy.sizes) - sent == 1 and len(proxy.written) == 1000


def test_the_size_refused_is_forgotten_after_some_minutes_and_cleared_by_a_larger_body_taken() -> None:
    from diana.sinks.opensearch import _RequestSizes

    batch = [_series(f"1.2.3.{i}", i, 3) for i in range(8)]
    one = len(OpenSearchSink(None, IndexLayout("diana"), index_version=1).prepare(batch[:1]).requests[0].body)
    cluster = _Cluster(limit=3 * one)
    sink = OpenSearchSink(cluster, IndexLayout("diana"), index_version=1)
    clock = [0.0]
    sink._sizes = _RequestSizes(clock=lambda: clock[0])
    sink.write(batch, _Dead())
    refused_at = sink._sizes.split_at()
    assert 3 * one < refused_at <= 8 * one
    cluster.limit = 10**9  # the proxy's limit raised
    clock[0] += _RequestSizes.FORGET_S - 1
    sent = len(cluster.sizes)
    sink.write(batch, _Dead())
    assert len(cluster.sizes) - sent > 1  # still split before it is sent
    clock[0] += 1
    sent = len(cluster.sizes)
    sink.write(batch, _Dead())
    assert len(cluster.sizes) - sent == 1 and sink._sizes.split_at() == float("inf")  # bulk_max_bytes again
    sizes = _RequestSizes(clock=lambda: 0.0)
    sizes.accepted(100)
    sizes.refused(100)  # never at or below a body accepted
    assert sizes.split_at() == float("inf")
    sizes.refused(300)
    sizes.accepted(400)  # a single document larger than the size refused, taken: the size was not the cause
    assert sizes.split_at() == float("inf")


def test_a_whole_request_refused_as_malformed_is_narrowed_to_the_document_and_dead_lettered() -> None:
    batch = [_series(f"1.2.3.{i}", i, 3) for i in range(1, 6)]
    batch[3] = _series("1.2.3.4", 4, -1)  # a revision OpenSearch's validation refuses for the whole request
    cluster = _Cluster()
    dead = _Dead()
    with capture_logs() as logs:
        OpenSearchSink(cluster, IndexLayout("diana"), index_version=1).write(batch, dead)
    assert sorted(cluster.written) == ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.5"]
    ((offset, reason),) = dead.sent
    assert offset == 4 and "action_request_validation_exception" in reason and "HTTP 400" in reason
    assert [line["status"] for line in logs if line["event"] == "opensearch.request_refused"] == [400]


def _error(kind: str, reason: str, status: int = 429) -> dict:
    """OpenSearch's error answer, as opensearch-py hands it over in TransportError.info."""
    error = {"type": kind, "reason": reason}
    return {"error": {"root_cause": [error], **error}, "status": status}


# OpenSearch's indexing pressure rejections, word for word (server/src/main/java/org/opensearch/index/
# IndexingPressure.java and ShardIndexingPressure.java, the latter's present wording and its first):
# {operation} is the request's own bytes, {limit} the node's indexing_pressure.memory.limit.
PRESSURE_REASONS = {
    "coordinating": "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, replica_bytes=0, "
    "all_bytes=0, coordinating_operation_bytes={operation}, max_coordinating_and_primary_bytes={limit}]",
    "primary": "rejected execution of primary operation [coordinating_and_primary_bytes=0, replica_bytes=0, "
    "all_bytes=0, primary_operation_bytes={operation}, max_coordinating_and_primary_bytes={limit}]",
    "shard": "rejected execution of coordinating operation [shard_detail=[diana-instances-v1][0], shard_total_bytes=0, "
    "shard_operation_bytes={operation}, shard_max_coordinating_and_primary_bytes=10, shard_max_replica_bytes=15] OR "
    "[node_total_bytes=0, node_operation_bytes={operation}, node_max_coordinating_and_primary_bytes={limit}, "
    "node_max_replica_bytes=999999999]",
    "shard_first": "rejected execution of primary operation [shard_detail=[diana-instances-v1][0][P], "
    "shard_coordinating_and_primary_bytes=0, shard_operation_bytes={operation}, "
    "shard_max_coordinating_and_primary_bytes=10] OR [node_coordinating_and_primary_bytes=0, node_replica_bytes=0, "
    "node_all_bytes=0, node_operation_bytes={operation}, node_max_coordinating_and_primary_bytes={limit}]",
}


class _SmallHeap(_Cluster):
    """An OpenSearch node whose indexing pressure limit (10 % of its heap) is ``limit`` bytes: a request of
    more bytes is refused whole with its 429, in the words of ``reason`` (PRESSURE_REASONS)."""

    def __init__(self, limit: int, reason: str):
        super().__init__()
        self.pressure_limit, self.reason = limit, reason

    def bulk(self, body, filter_path=None, params=None):
        if len(body) > self.pressure_limit:
            self.sizes.append(len(body))
            reason = self.reason.format(operation=len(body), limit=self.pressure_limit)
            raise TransportError(429, "rejected_execution_exception", _error("rejected_execution_exception", reason))
        return super().bulk(body, filter_path, params)


@pytest.mark.parametrize("wording", sorted(PRESSURE_REASONS))
def test_a_request_over_the_nodes_indexing_pressure_limit_is_sent_in_halves(wording: str) -> None:
    """Before: OpenSearch's 429 for a request larger than its indexing pressure limit (a small heap, a raised
    [sinks] bulk_max_bytes) was retried for ever as "OpenSearch unavailable"; it can never be accepted."""
    batch = [_instance(f"1.{i}", i) for i in range(10)]
    one = len(OpenSearchSink(None, IndexLayout("diana"), index_version=2).prepare(batch[:1]).requests[0].body)
    node = _SmallHeap(limit=3 * one, reason=PRESSURE_REASONS[wording])
    sink = OpenSearchSink(node, IndexLayout("diana"), index_version=2)
    before = _refused("429")
    dead = _Dead()
    with capture_logs() as logs:
        sink.write(batch, dead)
        assert sorted(node.written) == sorted(f"1.{i}" for i in range(10)) and dead.sent == []
        sent_before = len(node.sizes)
        sink.write([_instance(f"2.{i}", i) for i in range(10)], dead)
    assert all(size <= 3 * one for size in node.sizes[sent_before:])  # the size refused is remembered
    assert len(node.written) == 20 and dead.sent == [] and _refused("429") > before
    (said,) = [line for line in logs if line["event"] == "opensearch.request_refused"]
    assert said["status"] == 429 and "heap" in said["fix"] and "bulk_max_bytes" in said["fix"]


def test_a_document_alone_over_the_indexing_pressure_limit_is_dead_lettered_naming_the_fix() -> None:
    big = "S" * 5000  # a value of the document, never in the dead letter's reason
    batch = [_series("1.2.3.1", 1, 3), _series("1.2.3.2", 2, 3, description=big), _series("1.2.3.3", 3, 3)]
    node = _SmallHeap(limit=3000, reason=PRESSURE_REASONS["coordinating"])
    dead = _Dead()
    OpenSearchSink(node, IndexLayout("diana"), index_version=1).write(batch, dead)
    assert sorted(node.written) == ["1.2.3.1", "1.2.3.3"]
    ((offset, reason),) = dead.sent
    assert reason == (
        "opensearch rejected 1.2.3.2: request_too_large: HTTP 429 for a bulk request of this document alone "
        "(5706 bytes): OpenSearch counts 5706 bytes, over the indexing pressure limit of "
        "the node, 3000 bytes: the document is too large for this node; raise its heap "
        "(indexing_pressure.memory.limit is 10 % of it) and replay it"
    )
    assert offset == 2


def test_an_instance_alone_over_the_indexing_pressure_limit_is_indexed_without_its_header() -> None:
    huge = json.dumps({"7FE00010": {"vr": "OB", "InlineBinary": "A" * 6000}})
    node = _SmallHeap(limit=4000, reason=PRESSURE_REASONS["shard"])
    dead = _Dead()
    OpenSearchSink(node, IndexLayout("diana"), index_version=1).write(
        [_instance("1.1", 1), _instance("1.2", 2, huge)], dead
    )
    assert node.written == ["1.1", "1.2"] and "dicom" not in node.stored["1.2"]
    ((offset, reason),) = dead.sent
    assert offset == 2 and "(indexed without its header)" in reason and "indexing pressure" in reason


class _RemotePrimaries(_Cluster):
    """A cluster whose instances' primary shard is on another node with an indexing pressure limit of
    ``limit`` bytes: that shard's part of a request (its instances, counted here as the whole body's bytes)
    is refused item by item with the primary's 429, the other items written, as OpenSearch answers."""

    def __init__(self, limit: int, busy: bool = False):
        super().__init__()
        self.pressure_limit, self.busy = limit, busy

    def bulk(self, body, filter_path=None, params=None):
        actions = _actions(body)
        if not (self.busy or len(body) > self.pressure_limit):
            return super().bulk(body, filter_path, params)
        self.sizes.append(len(body))
        operation = 1000 if self.busy else len(body)
        reason = PRESSURE_REASONS["primary"].format(operation=operation, limit=self.pressure_limit)
        items = []
        for op, meta, _ in actions:
            if meta["_index"].startswith("diana-instances"):
                items.append({op: {"status": 429, "error": {"type": "rejected_execution_exception", "reason": reason}}})
            else:
                self.written.append(meta["_id"])
                items.append({op: {"status": 201}})
        return {"items": items}


def test_items_a_remote_primary_refuses_for_their_own_size_are_sent_again_in_halves() -> None:
    """Before: each such item's 429 was retried with the whole batch, for ever."""
    huge = json.dumps({"7FE00010": {"vr": "OB", "InlineBinary": "A" * 13000}})
    batch = [_instance(f"1.{i}", i) for i in range(6)] + [_series("1.2.3.1", 6, 3), _instance("1.9", 7, huge)]
    node = _RemotePrimaries(limit=12_000)
    dead = _Dead()
    OpenSearchSink(node, IndexLayout("diana"), index_version=1).write(batch, dead)
    assert node.written.count("1.2.3.1") == 1  # written by the first request, not sent again
    assert sorted(set(node.written)) == sorted([*(f"1.{i}" for i in range(6)), "1.2.3.1", "1.9"])
    ((offset, reason),) = dead.sent  # the instance too large alone: indexed without its header, said
    assert offset == 7 and "(indexed without its header)" in reason and "indexing pressure limit" in reason


def test_items_a_busy_remote_primary_refuses_are_still_retried() -> None:
    node = _RemotePrimaries(limit=12_000, busy=True)
    with pytest.raises(RetryableError, match="not accepted"):
        OpenSearchSink(node, IndexLayout("diana"), index_version=1).write(
            [_instance("1.1", 1), _instance("1.2", 2)], _Dead()
        )
    assert len(node.sizes) == 1


def _refused(status: str) -> float:
    return REGISTRY.get_sample_value("diana_opensearch_requests_refused_total", {"status": status}) or 0.0


@pytest.mark.parametrize(
    "answer",
    [
        TransportError(429, "circuit_breaking_exception", {}),
        # a node busy with other requests: this one's own bytes are under the limit
        TransportError(
            429,
            "rejected_execution_exception",
            _error(
                "rejected_execution_exception",
                "rejected execution of coordinating operation [coordinating_and_primary_bytes=80000000, "
                "replica_bytes=0, all_bytes=80000000, coordinating_operation_bytes=2000, "
                "max_coordinating_and_primary_bytes=80530636]",
            ),
        ),
        TransportError(503, "unavailable", {}),
        TransportError(502, "<html>Bad Gateway</html>", None),
        OSConnectionError("N/A", "connection refused", None),
    ],
)
def test_busy_unavailable_or_unreachable_is_still_retried(answer: Exception) -> None:
    cluster = _Cluster(answer=answer)
    dead = _Dead()
    with pytest.raises(RetryableError, match="OpenSearch unavailable"):
        OpenSearchSink(cluster, IndexLayout("diana"), index_version=1).write(
            [_series("1.2.3.1", 1, 3), _series("1.2.3.2", 2, 3)], dead
        )
    assert cluster.sizes and len(cluster.sizes) == 1 and dead.sent == []  # sent once, not split


class _Conflicts:
    """Every series revision answers 409 (the index holds a higher one); the stored documents' times are
    read back by mget, as OpenSearch answers with ``_source_includes``."""

    def __init__(self, stored_last: dict[str, str], unavailable_once: set[str] | None = None):
        self.stored_last = stored_last
        self.unavailable_once = set(unavailable_once or ())  # ids answered 503 on their first write only
        self.reads: list[list[str]] = []
        self.read_error: Exception | None = None

    def bulk(self, body, filter_path=None, params=None):
        actions = _actions(body)
        if any(meta["_id"] in self.unavailable_once for _, meta, _ in actions):
            self.unavailable_once -= {meta["_id"] for _, meta, _ in actions}
            return {
                "items": [
                    {op: {"status": 503, "error": {"type": "unavailable_shards_exception"}}} for op, _, _ in actions
                ]
            }
        return {
            "items": [
                {
                    op: {
                        "status": 409,
                        "error": {
                            "type": "version_conflict_engine_exception",
                            "reason": f"[{meta['_id']}]: "
                            f"version conflict, current version [50] is higher than the one provided [{meta['version']}]",
                        },
                    }
                }
                for op, meta, _ in actions
            ]
        }

    def mget(self, index, body, _source_includes, realtime=True):
        assert _source_includes == ["last_received_at"]
        assert realtime is False  # a real-time read refreshes the index: a reindex runs with refresh off
        self.reads.append(body["ids"])
        if self.read_error is not None:
            raise self.read_error
        return {
            "docs": [
                {"_id": i, "found": True, "_source": {"last_received_at": self.stored_last[i]}}
                if i in self.stored_last
                else {"_id": i, "found": False}
                for i in body["ids"]
            ]
        }


def _conflicts(cause: str) -> float:
    labels = {"index": "diana-series", "cause": cause}
    return REGISTRY.get_sample_value("diana_opensearch_revision_conflicts_total", labels) or 0.0


def test_revisions_refused_for_a_higher_one_are_counted_and_a_restarted_line_is_a_warning() -> None:
    """Before: a 409 on an aggregate was dropped without a count or a line, and a revision line started
    again at 1 (changelog made anew) left the index stale with no sign."""
    stored = AT.isoformat()
    client = _Conflicts({"1.2.3.1": stored, "1.2.3.2": stored, "1.2.3.3": stored})
    sink = OpenSearchSink(client, IndexLayout("diana"), index_version=1)
    before = {cause: _conflicts(cause) for cause in ("replayed", "restarted", "not_compared")}
    replayed = [_series("1.2.3.1", 1, 7, last=AT - timedelta(minutes=5)), _series("1.2.3.2", 2, 49, last=AT)]
    restarted = [_series("1.2.3.3", 3, 1, last=AT + timedelta(days=2))]
    unknown = [_series("1.2.3.9", 4, 1, last=AT)]  # its stored document is gone meanwhile
    dead = _Dead()
    with capture_logs() as logs:
        sink.write(replayed + restarted + unknown, dead)
    assert dead.sent == []
    assert _conflicts("replayed") - before["replayed"] == 2
    assert _conflicts("restarted") - before["restarted"] == 1
    assert _conflicts("not_compared") - before["not_compared"] == 1
    by_event = {line["event"]: line for line in logs}
    warning = by_event["opensearch.revision_line_restarted"]
    assert warning["log_level"] == "warning" and warning["documents"] == 1 and warning["example_id"] == "1.2.3.3"
    normal = by_event["opensearch.older_revisions_skipped"]
    assert normal["log_level"] == "info" and normal["documents"] == 2 and "normal" in normal["meaning"]
    assert by_event["opensearch.lower_revisions_skipped"]["documents"] == 1


def test_revision_conflicts_are_said_at_most_once_a_minute_per_cause_with_the_counts_since() -> None:
    from diana.sinks.opensearch import _ConflictLog

    clock = [0.0]
    said = _ConflictLog(clock=lambda: clock[0])
    with capture_logs() as logs:
        said.add("diana-series", "replayed", 500)
        for _ in range(10):
            clock[0] += 5
            said.add("diana-series", "replayed", 500)
            said.add("diana-studies", "replayed", 20)
        said.add("diana-series", "restarted", 1, "1.2.3.3")  # another cause: its own minute
        clock[0] += 11
        said.add("diana-series", "replayed", 1)
        clock[0] += 60
        said.flush()  # a batch's end: what waited is said once its minute has passed
    lines = [(line["event"], line["index"], line["documents"]) for line in logs]
    assert lines == [
        ("opensearch.older_revisions_skipped", "diana-series", 500),
        ("opensearch.older_revisions_skipped", "diana-studies", 20),  # its own minute
        ("opensearch.revision_line_restarted", "diana-series", 1),
        ("opensearch.older_revisions_skipped", "diana-series", 5001),
        ("opensearch.older_revisions_skipped", "diana-studies", 180),
    ]


def test_a_restarted_line_of_another_index_within_the_minute_is_said() -> None:
    """Before: the minute was per cause, the counts per index: the studies' restarted line waited for a later
    restarted one of the series, for good if none came (exp3)."""
    from diana.sinks.opensearch import _ConflictLog

    clock = [0.0]
    said = _ConflictLog(clock=lambda: clock[0])
    with capture_logs() as logs:
        said.add("diana-series", "restarted", 5, "1.2.3")
        clock[0] = 1
        said.add("diana-studies", "restarted", 3, "1.2")
        said.add("diana-studies", "restarted", 2)
        clock[0] = 3600
        said.flush()
    lines = [(line["event"], line["index"], line["documents"], line.get("example_id")) for line in logs]
    assert lines == [
        ("opensearch.revision_line_restarted", "diana-series", 5, "1.2.3"),
        ("opensearch.revision_line_restarted", "diana-studies", 3, "1.2"),
        ("opensearch.revision_line_restarted", "diana-studies", 2, None),
    ]


def test_revision_conflicts_of_a_batch_written_again_are_counted_once() -> None:
    """Before: a request's conflicts were counted as it was answered, and again when another request of the
    batch failed and the consumer wrote the batch again."""
    stored = AT.isoformat()
    client = _Conflicts({"1.2.3.1": stored, "1.2.3.2": stored}, unavailable_once={"1.2.3.2"})
    sink = OpenSearchSink(client, IndexLayout("diana"), index_version=1, parallel_requests=2)
    before = _conflicts("replayed")
    batch = [_series("1.2.3.1", 1, 7, last=AT), _series("1.2.3.2", 2, 7, last=AT)]
    with pytest.raises(RetryableError):
        sink.write(batch, _Dead())
    sink.write(batch, _Dead())  # the consumer writes it again
    assert _conflicts("replayed") - before == 2


def test_the_read_of_stored_times_is_capped_and_a_failed_one_is_a_warning() -> None:
    client = _Conflicts({f"1.2.3.{i}": AT.isoformat() for i in range(250)})
    sink = OpenSearchSink(client, IndexLayout("diana"), index_version=1)
    before = {cause: _conflicts(cause) for cause in ("replayed", "not_compared")}
    sink.write([_series(f"1.2.3.{i}", i, 7, last=AT) for i in range(250)], _Dead())
    assert [len(ids) for ids in client.reads] == [200]
    assert _conflicts("replayed") - before["replayed"] == 200
    assert _conflicts("not_compared") - before["not_compared"] == 50
    client.read_error = TransportError(503, "unavailable", {})
    with capture_logs() as logs:
        sink.write([_series("1.2.3.1", 1, 7, last=AT)], _Dead())
        sink.write([_series("1.2.3.2", 2, 7, last=AT)], _Dead())  # within the minute: not said again
    (unread,) = [line for line in logs if line["event"] == "opensearch.revision_conflicts_unread"]
    assert unread["log_level"] == "warning" and unread["documents"] == 1
    assert _conflicts("not_compared") - before["not_compared"] == 52


def test_counts_said_per_minute_say_what_waited_by_the_first_flush_after_the_minute() -> None:
    """The one counter behind the sink's lines said at most once a minute: a count waiting at the minute's
    end is said by the next flush (before, the failed reads' own minute dropped it unless another came)."""
    from diana.sinks.opensearch import _CountsSaidPerMinute

    clock = [0.0]
    said: list[tuple[str, int, dict]] = []
    counts = _CountsSaidPerMinute(lambda key, count, details: said.append((key, count, details)), lambda: clock[0])
    counts.add("a", 1, index="diana-series")  # the first: at once
    clock[0] = 10
    counts.add("a", 2, index="diana-studies")
    counts.add("a", 3, index=None, error="TransportError")
    counts.add("b", 7)  # another key: its own minute
    clock[0] = 59.9
    counts.flush()  # within the minute: nothing
    assert said == [("a", 1, {"index": "diana-series"}), ("b", 7, {})]
    clock[0] = 60
    counts.flush()  # the minute has passed: the count since, with the first details given since
    assert said[2:] == [("a", 5, {"index": "diana-studies", "error": "TransportError"})]
    clock[0] = 200
    counts.flush()  # nothing waits: nothing said again
    counts.add("a", 4)  # its minute long passed: at once
    assert said[3:] == [("a", 4, {})]


def test_a_failed_read_waiting_at_the_minutes_end_is_said_by_a_later_batch() -> None:
    """Before: the failed reads of stored times counted within the minute were said only by a later failed
    read; when the reads came back, that count was never said."""
    clock = [0.0]
    client = _Conflicts({"1.2.3.1": AT.isoformat(), "1.2.3.2": AT.isoformat()})
    sink = OpenSearchSink(client, IndexLayout("diana"), index_version=1, clock=lambda: clock[0])
    client.read_error = TransportError(503, "unavailable", {})
    with capture_logs() as logs:
        sink.write([_series("1.2.3.1", 1, 7, last=AT)], _Dead())
        clock[0] = 10
        sink.write([_series("1.2.3.1", 2, 7, last=AT), _series("1.2.3.2", 3, 7, last=AT)], _Dead())
        client.read_error = None  # the reads work again
        clock[0] = 61
        sink.write([_series("1.2.3.1", 4, 7, last=AT)], _Dead())
    unread = [line for line in logs if line["event"] == "opensearch.revision_conflicts_unread"]
    assert [(line["documents"], line["index"], line["error"]) for line in unread] == [
        (1, "diana-series", "TransportError"),
        (2, "diana-series", "TransportError"),
    ]


class _OldDeadLetters:
    """The old version's dead-letter documents (scrolled), then a proxy refusing bodies over ``limit``."""

    def __init__(self, documents: int, limit: int, pressure: bool = False):
        from opensearchpy.serializer import JSONSerializer

        self.pressure = pressure  # refused with the 429 of a node whose indexing pressure limit is ``limit``
        self.transport = type("Transport", (), {"serializer": JSONSerializer()})()
        self.documents, self.limit = documents, limit
        self.sizes: list[int] = []
        self.copied = 0

    def search(self, **kwargs):
        hits = [
            {"_id": f"0/{i}", "_source": {"reason": "opensearch: x", "origin": f"t/0/{i}"}}
            for i in range(self.documents)
        ]
        return {"_scroll_id": "s", "_shards": {"successful": 1, "total": 1}, "hits": {"hits": hits}}

    def scroll(self, **kwargs):
        return {"_scroll_id": "s", "hits": {"hits": []}}

    def clear_scroll(self, **kwargs):
        return {}

    def bulk(self, body, **kwargs):
        self.sizes.append(len(body))
        if len(body) > self.limit and self.pressure:
            reason = PRESSURE_REASONS["coordinating"].format(operation=len(body), limit=self.limit)
            raise TransportError(429, "rejected_execution_exception", _error("rejected_execution_exception", reason))
        if len(body) > self.limit:
            raise TransportError(413, NGINX_413, NGINX_413)
        items = [{"index": {"status": 201}} for _ in body.splitlines()[0::2]]
        self.copied += len(items)
        return {"items": items}


def _reindexer(client, max_bytes: int):
    from diana.config import KafkaConfig
    from diana.operations.reindex import Reindexer

    return Reindexer(client, IndexLayout("diana"), KafkaConfig(), dead=None, max_bytes=max_bytes)  # type: ignore[arg-type]


def test_the_reindex_copies_old_dead_letters_in_requests_under_bulk_max_bytes() -> None:
    """Before: chunks of 1,000 documents whatever their size, over a proxy's limit: the reindex failed on a
    413 that [sinks] bulk_max_bytes could not lower."""
    client = _OldDeadLetters(documents=1000, limit=20_000)
    _reindexer(client, max_bytes=15_000)._carry_over(["deadletters"], {"deadletters": 1}, 2)
    assert client.copied == 1000 and max(client.sizes) <= 20_000


def test_a_reindex_copy_refused_as_too_large_fails_before_the_swap_naming_the_fix() -> None:
    from diana.operations.reindex import ReindexFailed

    client = _OldDeadLetters(documents=1000, limit=20_000)
    with pytest.raises(ReindexFailed, match=r"HTTP 413.*nothing was swapped.*bulk_max_bytes"):
        _reindexer(client, max_bytes=5_000_000)._carry_over(["deadletters"], {"deadletters": 1}, 2)


def test_a_reindex_copy_over_the_nodes_indexing_pressure_limit_fails_before_the_swap_naming_the_fix(
    monkeypatch,
) -> None:
    """Before: the 429 was waited out (streaming_bulk's retries) and raised as it came, without the fix."""
    from opensearchpy.helpers import actions

    from diana.operations.reindex import ReindexFailed

    monkeypatch.setattr(actions.time, "sleep", lambda seconds: None)
    client = _OldDeadLetters(documents=1000, limit=20_000, pressure=True)
    with pytest.raises(ReindexFailed, match=r"HTTP 429.*nothing was swapped.*heap.*bulk_max_bytes"):
        _reindexer(client, max_bytes=5_000_000)._carry_over(["deadletters"], {"deadletters": 1}, 2)


def test_a_batch_of_one_document_too_large_is_retried_unless_the_node_proves_it_too_large() -> None:
    """What the retry of a refusal hitting everything costs: one document alone over a proxy's limit, with no
    request accepted, is not told from a proxy refusing everything (retried); a 429 naming its own bytes over
    the node's indexing pressure limit is (dead-lettered)."""
    big = "S" * 5000
    with pytest.raises(RetryableError, match="none accepted"):
        OpenSearchSink(_Cluster(limit=3000), IndexLayout("diana"), index_version=1).write(
            [_series("1.2.3.2", 2, 3, description=big)], _Dead()
        )
    node = _SmallHeap(limit=3000, reason=PRESSURE_REASONS["coordinating"])
    dead = _Dead()
    OpenSearchSink(node, IndexLayout("diana"), index_version=1).write([_series("1.2.3.2", 2, 3, description=big)], dead)
    ((offset, reason),) = dead.sent
    assert offset == 2 and "indexing pressure limit of the node, 3000 bytes" in reason


def test_the_largest_body_accepted_is_believed_for_five_to_ten_minutes() -> None:
    """A limit lowered at run time: a document alone between it and a body accepted before is retried only
    until that body is forgotten, then dead-lettered as too large."""
    from diana.sinks.opensearch import _RequestSizes

    clock = [0.0]
    sizes = _RequestSizes(clock=lambda: clock[0])
    sizes.accepted(5_000_000)
    clock[0] = _RequestSizes.ACCEPTED_WINDOW_S + 1  # the window after: still believed
    sizes.accepted(900_000)
    assert sizes.largest_accepted() == 5_000_000
    clock[0] = 2 * _RequestSizes.ACCEPTED_WINDOW_S + 1  # two windows on: only what this and the last took
    assert sizes.largest_accepted() == 900_000
    clock[0] = 4 * _RequestSizes.ACCEPTED_WINDOW_S
    assert sizes.largest_accepted() == 0
