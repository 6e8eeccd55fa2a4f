"""On a real OpenSearch node: what the OpenSearch sink does with a bulk request the node refuses as a whole
(413 over http.max_content_length, 100 MB; 429 over its indexing pressure limit, 10 % of its heap; 400 for
a request that fails its validation) and with a revision line that started again. The sink writes into indices of their own (prefix ``refusaltest``),
from messages made here; its dead letters are collected here, not produced (the refusals are the node's)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Message
from prometheus_client import REGISTRY

from diana.clients import opensearch_client
from diana.schemas.codec import default_codec
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import INSTANCES
from diana.sinks.opensearch import OpenSearchSink, install_template
from tests.unit.test_opensearch_refusals import _series

AT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


class _Dead:
    def __init__(self):
        self.sent: list[tuple[int, str]] = []

    def send(self, msg, reason):
        self.sent.append((msg.offset(), reason))


@pytest.fixture
def refusal_indices(stack, cfg):
    client = opensearch_client(cfg.opensearch, timeout=120)
    layout = IndexLayout(f"refusaltest{uuid.uuid4().hex[:8]}")
    for kind in ("instances", "series"):
        install_template(client, layout, kind)
    yield client, layout
    for kind in ("instances", "series"):
        client.indices.delete(index=layout.index(kind, 1), ignore_unavailable=True)
        client.indices.delete_index_template(name=layout.alias(kind), ignore=404)


def _instance(offset: int, header_bytes: int) -> Message:
    record = {
        "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{offset}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": header_bytes,
        "sha256": "0" * 64,
        "landing_path": f"x/{offset}.dcm",
        "received_at": AT,
        "source": "C_STORE",
        "header_json": '{"7FE00010":{"vr":"OB","InlineBinary":"' + "A" * header_bytes + '"}}',
    }
    return Message(
        topic=INSTANCES.name, partition=0, offset=offset, value=default_codec().encode(INSTANCES.value_schema, record)
    )


def _refused(status: str) -> float:
    return REGISTRY.get_sample_value("diana_opensearch_requests_refused_total", {"status": status}) or 0.0


def _node_limits(client) -> tuple[int, int]:
    """The node's http.max_content_length and its indexing pressure limit (indexing_pressure.memory.limit,
    10 % of its heap), in bytes."""
    (http,) = client.nodes.info(metric="http")["nodes"].values()
    (stats,) = client.nodes.stats(metric="indexing_pressure")["nodes"].values()
    return http["http"]["max_content_length_in_bytes"], stats["indexing_pressure"]["memory"]["limit_in_bytes"]


DOCUMENT_BYTES = 4_000_000  # each document's header: the request's size in steps of ~4 MB


def _write_in_parts(client, layout, request_bytes: int) -> tuple[int, _Dead]:
    """Write documents of ~4 MB adding up to ``request_bytes`` in one request ([sinks] bulk_max_bytes set
    above it); returns how many. Each is made when the batch is: ~3 copies of the request in this process."""
    documents = -(-request_bytes // DOCUMENT_BYTES)
    sink = OpenSearchSink(client, layout, max_bytes=10 * request_bytes, index_version=1)
    dead = _Dead()
    sink.write([_instance(i, DOCUMENT_BYTES) for i in range(documents)], dead)
    return documents, dead


def test_a_request_over_http_max_content_length_is_written_in_halves(refusal_indices):
    """One request 8 % over http.max_content_length (100 MB), each half under the node's indexing pressure
    limit (a 768 MB heap: 77 MB): before, the node's 413 was retried for ever as "OpenSearch unavailable"."""
    client, layout = refusal_indices
    max_content, pressure_limit = _node_limits(client)
    request_bytes = max_content * 108 // 100
    assert request_bytes // 2 + DOCUMENT_BYTES < pressure_limit, "the halves would meet the node's pressure limit"
    before = _refused("413")
    documents, dead = _write_in_parts(client, layout, request_bytes)
    assert dead.sent == []
    assert _refused("413") - before >= 1
    client.indices.refresh(index=layout.index("instances", 1))
    assert client.count(index=layout.index("instances", 1))["count"] == documents


def test_a_request_over_the_nodes_indexing_pressure_limit_is_written_in_parts(refusal_indices):
    """One request 12 % over the node's indexing pressure limit (10 % of its heap), under
    http.max_content_length: before, the node's 429 (its own bytes over the limit: refused however idle the
    node is) was retried for ever as "OpenSearch unavailable"."""
    client, layout = refusal_indices
    max_content, pressure_limit = _node_limits(client)
    request_bytes = pressure_limit * 112 // 100
    assert request_bytes + DOCUMENT_BYTES < max_content, "the request would be refused by its size (413) first"
    before = _refused("429"), _refused("413")
    documents, dead = _write_in_parts(client, layout, request_bytes)
    assert dead.sent == []
    assert _refused("429") - before[0] >= 1 and _refused("413") == before[1]
    client.indices.refresh(index=layout.index("instances", 1))
    assert client.count(index=layout.index("instances", 1))["count"] == documents


def test_a_request_failing_validation_is_narrowed_to_its_document(refusal_indices):
    """A revision OpenSearch's validation refuses (-1 as an external version) fails the whole bulk request
    with a 400: the other documents are written, that one is dead-lettered with the node's reason."""
    client, layout = refusal_indices
    sink = OpenSearchSink(client, layout, index_version=1)
    batch = [_series(f"1.2.3.{i}", i, 3) for i in range(1, 5)]
    batch[2] = _series("1.2.3.3", 3, -1)
    dead = _Dead()
    sink.write(batch, dead)
    ((offset, reason),) = dead.sent
    assert offset == 3 and "HTTP 400" in reason and "version" in reason
    client.indices.refresh(index=layout.index("series", 1))
    assert client.count(index=layout.index("series", 1))["count"] == 3


def test_a_revision_line_started_again_is_counted_apart_from_a_replay(refusal_indices):
    client, layout = refusal_indices
    sink = OpenSearchSink(client, layout, index_version=1)
    dead = _Dead()
    sink.write([_series("1.2.3.1", 1, 50, last=AT), _series("1.2.3.2", 2, 50, last=AT)], dead)
    # the sink reads the stored times from the last refresh (realtime=False: a reindex runs with refresh off)
    client.indices.refresh(index=layout.index("series", 1))

    def conflicts(cause: str) -> float:
        labels = {"index": layout.alias("series"), "cause": cause}
        return REGISTRY.get_sample_value("diana_opensearch_revision_conflicts_total", labels) or 0.0

    sink.write(
        [
            _series("1.2.3.1", 3, 7, last=AT - timedelta(hours=1)),  # an older revision replayed
            _series("1.2.3.2", 4, 1, last=AT + timedelta(days=1)),  # a new line's first revision, a day later
        ],
        dead,
    )
    assert dead.sent == []
    assert (conflicts("replayed"), conflicts("restarted"), conflicts("not_compared")) == (1, 1, 0)
    stored = client.get(index=layout.index("series", 1), id="1.2.3.2")
    assert stored["_version"] == 50  # the index keeps the old line's document: stale, and now said
