"""The metadata sink's batch: a series the index is behind on does not hold the batch's other series."""

from __future__ import annotations

import pytest

from diana.sinks.metadata import IndexBehind, MetadataSink


class _Message:
    def __init__(self, event: dict):
        self.event = event

    def value(self) -> dict:
        return self.event


class _Decoded:
    """The codec's part: a message's value is its event already (no Avro in this test)."""

    def decode(self, value, expect=None):
        return None, value


class _Sink(MetadataSink):
    def __init__(self, behind: set[str]):
        self.codec = _Decoded()
        self.behind = behind
        self.prepared: list[str] = []

    def prepare(self, event):
        if event["series_instance_uid"] in self.behind:
            raise IndexBehind("the index holds 0 of the series' 1 instances")
        self.prepared.append(event["series_instance_uid"])
        return "written"


def _event(series: str, revision: int = 1, status: str = "COMPLETED") -> dict:
    return {"series_instance_uid": series, "revision": revision, "status": status}


def test_the_other_series_of_a_batch_are_prepared_before_it_is_tried_again():
    sink = _Sink(behind={"1.2"})
    batch = [
        _Message(_event("1.1")),
        _Message(_event("1.2")),
        _Message(_event("1.3")),
        _Message(_event("1.4", 1, "OPEN")),
    ]
    with pytest.raises(IndexBehind):
        sink.write(batch, dead=None)
    assert sink.prepared == ["1.1", "1.3"]


def test_a_batch_the_index_is_not_behind_on_is_written_whole():
    sink = _Sink(behind=set())
    sink.write([_Message(_event("1.1", 1)), _Message(_event("1.1", 2, "AMENDED"))], dead=None)
    assert sink.prepared == ["1.1"]
