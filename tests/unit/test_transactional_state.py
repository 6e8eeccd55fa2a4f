"""The transactional loop's state, without a broker: what a batch writes to the changelog rebuilds
exactly the state the batch leaves in memory, once per changed key, and an aborted batch leaves no
trace in memory."""

from __future__ import annotations

import json

from diana.stream_apps.batch import Batch, _Store


class ChangelogRecorder:
    """Stands in for the transactional producer: keeps what would be written, in order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    def produce(self, topic, key=None, value=None, partition=None, headers=None, on_delivery=None) -> None:
        self.records.append((topic, key, value, partition))


def _replay(records, changelog: str) -> _Store:
    store = _Store()
    for topic, key, value, partition in records:
        if topic == changelog:
            store.apply(partition, key.decode(), None if value is None else json.loads(value))
    return store


def test_changelog_rebuilds_what_the_committed_batches_left_in_memory():
    store, producer = _Store(), ChangelogRecorder()
    first = Batch(store, producer, "state")
    first.put(0, "series", "1.2.3", {"instance_count": 1})
    first.put(0, "open", "1.2.3", 1000)
    first.put(1, "seen", "9.9", 7)
    first.send("dicom.series", b"1.2.3", b"revision 1")
    first.message_done()  # the loop calls it after each message: the send goes out
    first.write_changelog()
    first.commit_locally()

    second = Batch(store, producer, "state")
    assert second.get(0, "series", "1.2.3") == {"instance_count": 1}
    second.put(0, "series", "1.2.3", {"instance_count": 2})
    second.delete(0, "open", "1.2.3")
    second.delete(0, "open", "never-there")  # nothing to delete: nothing written
    assert second.get(0, "open", "1.2.3") is None
    assert list(second.items(0, "open")) == []
    assert store.partitions[0]["open"] == {"1.2.3": 1000}  # not committed yet
    second.put(0, "series", "1.2.3", {"instance_count": 3})
    second.write_changelog()
    second.commit_locally()

    assert (
        store.partitions
        == _replay(producer.records, "state").partitions
        == {0: {"series": {"1.2.3": {"instance_count": 3}}, "open": {}}, 1: {"seen": {"9.9": 7}}}
    )
    # One record per key changed in a batch: its final value.
    series_records = [value for _, key, value, _ in producer.records if key == b"series/1.2.3"]
    assert series_records == [b'{"instance_count":1}', b'{"instance_count":3}']
    assert ("dicom.series", b"1.2.3", b"revision 1", None) in producer.records
    assert not any(key == b"open/never-there" for _, key, _, _ in producer.records)


def test_an_aborted_batch_changes_nothing_in_memory():
    store = _Store()
    committed = Batch(store, ChangelogRecorder(), "state")
    committed.put(2, "clock", "watermark", 5)
    committed.commit_locally()
    aborted = Batch(store, ChangelogRecorder(), "state")
    aborted.put(2, "clock", "watermark", 9)
    aborted.put(2, "seen", "1.2", 3)
    assert aborted.get(2, "clock", "watermark") == 9
    assert sorted(aborted.items(2, "seen")) == [("1.2", 3)]
    # No commit_locally: the transaction was aborted. The next batch sees the committed state.
    assert Batch(store, ChangelogRecorder(), "state").get(2, "clock", "watermark") == 5
    assert store.partitions == {2: {"clock": {"watermark": 5}}}


def test_a_failed_message_leaves_no_state_change_and_no_send():
    store, producer = _Store(), ChangelogRecorder()
    batch = Batch(store, producer, "state")
    batch.put(0, "series", "1.2.3", {"instance_count": 1})
    batch.send("dicom.series", b"1.2.3", b"revision 1")
    batch.message_done()
    # The next message changes, deletes and sends, then raises: all of it is undone.
    batch.put(0, "series", "1.2.3", {"instance_count": 2})
    batch.put(0, "series", "4.5.6", {"instance_count": 1})
    batch.delete(0, "series", "1.2.3")
    batch.send("dicom.series", b"4.5.6", b"revision 1")
    batch.message_failed()
    batch.message_done()
    assert batch.get(0, "series", "1.2.3") == {"instance_count": 1}
    assert batch.get(0, "series", "4.5.6") is None
    assert [r[1] for r in producer.records] == [b"1.2.3"]


def test_only_the_last_value_per_key_of_a_transaction_is_encoded_and_sent():
    producer, encoded = ChangelogRecorder(), []

    def encode(value: dict) -> bytes:
        encoded.append(value["revision"])
        return json.dumps(value).encode()

    batch = Batch(_Store(), producer, "state")
    for revision in range(1, 6):  # five instances of one series in one transaction
        batch.publish_latest("dicom.series", b"1.2.3", {"revision": revision}, encode)
        batch.publish_latest("dicom.studies", b"1.2", {"revision": revision}, encode)
        batch.message_done()
    batch.publish_latest("dicom.series", b"4.5.6", {"revision": 1}, encode)
    batch.message_done()
    assert producer.records == []  # nothing before the transaction's end
    batch.send_latest()
    assert sorted(encoded) == [1, 5, 5]  # one encode per changed key
    sent = {(topic, key): json.loads(value) for topic, key, value, _ in producer.records}
    assert sent == {
        ("dicom.series", b"1.2.3"): {"revision": 5},
        ("dicom.studies", b"1.2"): {"revision": 5},
        ("dicom.series", b"4.5.6"): {"revision": 1},
    }
    batch.send_latest()
    assert len(producer.records) == 3  # sent once


def test_a_failed_message_takes_back_what_it_published_and_an_unencodable_record_is_skipped():
    producer = ChangelogRecorder()

    def encode(value: dict) -> bytes:
        if value.get("bad"):
            raise ValueError("not in the schema")
        return json.dumps(value).encode()

    batch = Batch(_Store(), producer, "state")
    batch.publish_latest("dicom.series", b"1.2.3", {"revision": 1}, encode)
    batch.message_done()
    batch.publish_latest("dicom.series", b"1.2.3", {"revision": 2}, encode)
    batch.publish_latest("dicom.series", b"7.7", {"revision": 1}, encode)
    batch.message_failed()  # the second message raised: revision 1 stands, 7.7 was never published
    batch.publish_latest("dicom.series", b"8.8", {"bad": True}, encode)
    batch.message_done()
    batch.send_latest()
    assert [(key, json.loads(value)) for _, key, value, _ in producer.records] == [(b"1.2.3", {"revision": 1})]


class DeliveryRecorder(ChangelogRecorder):
    """Also keeps, per record, whether it asked for a delivery report."""

    def __init__(self) -> None:
        super().__init__()
        self.reported: list[bool] = []

    def produce(self, topic, key=None, value=None, partition=None, headers=None, on_delivery=None) -> None:
        super().produce(topic, key, value, partition, headers)
        self.reported.append(on_delivery is not None)


def test_only_each_partitions_last_changelog_record_asks_for_a_delivery_report():
    store, producer = _Store(), DeliveryRecorder()
    store.set(1, "open", "gone", 5)
    batch = Batch(store, producer, "state")
    for n in range(3):
        batch.put(0, "seen", f"sop{n}", [n, "ab", 10, "s"])
    batch.put(1, "seen", "sop9", [9, "cd", 10, "t"])
    batch.put(0, "open", "s", 1000)
    batch.delete(1, "open", "gone")
    batch.write_changelog()

    by_partition: dict[int, list[tuple[bytes, bool]]] = {}
    for (_, key, _, partition), reported in zip(producer.records, producer.reported, strict=True):
        by_partition.setdefault(partition, []).append((key, reported))
    # Every changed key once, in the batch's order, and a report for the last of each partition only.
    assert by_partition == {
        0: [(b"seen/sop0", False), (b"seen/sop1", False), (b"seen/sop2", False), (b"open/s", True)],
        1: [(b"seen/sop9", False), (b"open/gone", True)],
    }
    assert batch.sent == {0: 1, 1: 1}
    assert [ns for ns, _, _ in batch.encoded[1]] == ["seen", "open"] and batch.encoded[1][1][2] is None
