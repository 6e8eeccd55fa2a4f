"""The metadata sink's batch: a series the index is behind on, or whose file fails, does not hold the
batch's other series; a file failing with an error of its own is given up after write_retry_s."""

from __future__ import annotations

import errno

import pytest

from diana.sinks import metadata
from diana.sinks.consumer import RetryableError
from diana.sinks.metadata import IndexBehind, MetadataSink
from diana.storage import StorageError, StorageRefused


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
    def __init__(self, behind: set[str], failing: dict | None = None):
        self.codec = _Decoded()
        self.behind = behind
        self.failing = failing or {}
        self.prepared: list[str] = []
        self.write_retry_s = 300.0
        self._failing = {}
        self._given_up = set()

    def prepare(self, event):
        if event["series_instance_uid"] in self.behind:
            raise IndexBehind("the index holds 0 of the series' 1 instances")
        if event["series_instance_uid"] in self.failing:
            failure = self.failing[event["series_instance_uid"]]
            if callable(failure):  # a script of failures over time: raises, or returns to go on
                failure()
            else:
                raise failure
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


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(errno.EACCES, "Permission denied"),  # a series folder restored by another user
        OSError(errno.EIO, "Input/output error"),
        NotADirectoryError(errno.ENOTDIR, "Not a directory"),
        StorageRefused("AccessDenied"),  # a bucket policy or an object lock on that key
    ],
    ids=["EACCES", "EIO", "ENOTDIR", "refused"],
)
def test_a_file_failing_with_an_error_of_its_own_is_left_unwritten_after_write_retry_s(monkeypatch, error):
    """Before, any OSError was retried for ever: one series' file the store refuses held the metadata
    of every series after it. Now it is retried for write_retry_s, the batch's others prepared meanwhile,
    then left (WADO-RS answers that series from the index)."""
    clock = _Clock()
    monkeypatch.setattr(metadata.time, "monotonic", clock)
    before = metadata.NOT_WRITTEN._value.get()
    sink = _Sink(behind=set(), failing={"1.2": error})
    batch = [_Message(_event("1.1")), _Message(_event("1.2")), _Message(_event("1.3"))]
    with pytest.raises(RetryableError):
        sink.write(batch, dead=None)
    clock.now += 299
    with pytest.raises(RetryableError):
        sink.write(batch, dead=None)
    assert metadata.NOT_WRITTEN._value.get() == before
    clock.now += 2
    sink.write(batch, dead=None)  # given up: the batch is done
    assert sink.prepared == ["1.1", "1.3"] * 3
    assert metadata.NOT_WRITTEN._value.get() == before + 1
    # A later revision of the series failing again gets its own window.
    with pytest.raises(RetryableError):
        sink.write([_Message(_event("1.2", 2, "AMENDED"))], dead=None)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), StorageError("503 Slow Down"), ConnectionResetError()],
    ids=["ENOSPC", "unreachable", "reset"],
)
def test_the_stores_trouble_is_retried_for_as_long_as_it_lasts(monkeypatch, error):
    clock = _Clock()
    monkeypatch.setattr(metadata.time, "monotonic", clock)
    sink = _Sink(behind=set(), failing={"1.1": error})
    for _ in range(3):
        with pytest.raises(RetryableError):
            sink.write([_Message(_event("1.1"))], dead=None)
        clock.now += 3600


def test_a_file_written_after_failing_starts_a_later_failure_afresh(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(metadata.time, "monotonic", clock)
    sink = _Sink(behind=set(), failing={"1.1": PermissionError(errno.EACCES, "Permission denied")})
    with pytest.raises(RetryableError):
        sink.write([_Message(_event("1.1"))], dead=None)
    clock.now += 200
    del sink.failing["1.1"]
    sink.write([_Message(_event("1.1", 2, "AMENDED"))], dead=None)  # written: forgotten
    sink.failing["1.1"] = PermissionError(errno.EACCES, "Permission denied")
    clock.now += 200
    with pytest.raises(RetryableError):  # 400 s after the first failure, 0 after this one's
        sink.write([_Message(_event("1.1", 3, "AMENDED"))], dead=None)


def _eacces() -> None:
    raise PermissionError(errno.EACCES, "Permission denied")


def test_two_series_failing_at_different_times_are_both_given_up_and_the_batch_ends(monkeypatch):
    """Review: 1.1 fails from the start; 1.2's index is behind for 120 s, then it fails too (the same
    study folder). A series given up is not tried again while the batch is retried for the other:
    before, it started a new window each time and the two took turns for ever."""
    clock = _Clock()
    monkeypatch.setattr(metadata.time, "monotonic", clock)
    t0 = clock.now

    def behind_then_eacces() -> None:
        if clock.now - t0 < 120:
            raise IndexBehind("the index holds 0 of the series' 1 instances")
        _eacces()

    before = metadata.NOT_WRITTEN._value.get()
    sink = _Sink(behind=set(), failing={"1.1": _eacces, "1.2": behind_then_eacces})
    batch = [_Message(_event("1.1")), _Message(_event("1.2"))]
    while True:
        try:
            sink.write(batch, dead=None)
            break
        except RetryableError:
            assert clock.now - t0 < 3600, "the batch never ended"
            clock.now += 30  # write_until_done's backoff at its cap
    assert 420 <= clock.now - t0 < 480
    assert metadata.NOT_WRITTEN._value.get() == before + 2


def test_a_failure_long_after_the_last_starts_a_new_window(monkeypatch):
    """Review: an error of its own once, then the store down for an hour (retried without limit),
    then the same error again: retried for write_retry_s from there, not given up at once."""
    clock = _Clock()
    monkeypatch.setattr(metadata.time, "monotonic", clock)
    down = {"now": False}

    def script() -> None:
        if down["now"]:
            raise StorageError("503 Slow Down")
        _eacces()

    sink = _Sink(behind=set(), failing={"1.1": script})
    batch = [_Message(_event("1.1"))]
    with pytest.raises(RetryableError):
        sink.write(batch, dead=None)
    down["now"] = True
    for _ in range(120):
        clock.now += 30
        with pytest.raises(RetryableError):
            sink.write(batch, dead=None)
    down["now"] = False
    for _ in range(10):  # 0-270 s of its new window
        clock.now += 30
        with pytest.raises(RetryableError):
            sink.write(batch, dead=None)
    clock.now += 31
    sink.write(batch, dead=None)  # given up once its own window has passed
