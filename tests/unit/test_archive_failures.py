"""The archive sink's failures: the store's trouble is retried for as long as it lasts; one instance's
trouble is dead-lettered (its landing copy kept) and the partition goes on (no broker: the sink's write
runs through ``write_until_done`` with stand-ins for Kafka's message and the dead-letter producer)."""

from __future__ import annotations

import errno
import hashlib
import io
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from diana.config import ConfigError, load_config
from diana.producers.landing import LandingStore
from diana.sinks import archive as archive_module
from diana.sinks.archive import ArchiveSink
from diana.sinks.consumer import RetryableError, oldest_retry_s, write_until_done
from diana.storage import FilesystemStore, StorageError, StorageRefused, store_wide


class _Message:
    def __init__(self, event: dict, offset: int):
        self.event, self._offset = event, offset

    def value(self) -> dict:
        return self.event

    def topic(self) -> str:
        return "dicom.instances"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class _Decoded:
    """The codec's part: a message's value is its event already (no Avro here)."""

    def decode(self, value, expect=None):
        return None, value


class _Dead:
    """DeadLetters without a broker: what a flush would have produced."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, str]] = []
        self.produced: list[tuple[int, str]] = []

    def send(self, msg, reason: str) -> None:
        self.pending.append((msg.offset(), reason))

    def discard(self) -> None:
        self.pending.clear()

    def flush(self) -> None:
        self.produced += self.pending
        self.pending.clear()


class _NoWait:
    """A stop event that is never set and whose backoff returns at once."""

    def __init__(self) -> None:
        self.waits = 0

    def is_set(self) -> bool:
        return False

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        return False


class _FaultyLanding(FilesystemStore):
    """A landing folder whose objects in ``faults`` cannot be read (a bad sector, a permission, the store's no)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.faults: dict[str, OSError] = {}
        self.opens: dict[str, int] = {}

    def open(self, key: str):
        self.opens[key] = self.opens.get(key, 0) + 1
        if key in self.faults:
            raise self.faults[key]
        return super().open(key)


class _StreamingArchive(FilesystemStore):
    """An archive folder that copies by streaming the landing object (as from an S3 landing store), and
    whose puts of the keys in ``faults`` raise: each call takes the next error of the list, then succeeds."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.faults: dict[str, list[OSError]] = {}
        self.always: dict[str, OSError] = {}
        self.calls: dict[str, int] = {}

    def copy_from(self, other, source_key, target_key, sha256=None):
        self.calls[target_key] = self.calls.get(target_key, 0) + 1
        if target_key in self.always:
            raise self.always[target_key]
        if self.faults.get(target_key):
            raise self.faults[target_key].pop(0)
        with other.open(source_key) as stream:
            return self.put_stream(target_key, stream, sha256)


def _setup(tmp_path: Path, count: int = 3, **options):
    landing = LandingStore(tmp_path / "landing")
    stores = _FaultyLanding(tmp_path / "landing"), _StreamingArchive(tmp_path / "archive")
    sink = ArchiveSink(*stores, codec=_Decoded(), **options)
    stored = [landing.put(f"DICOM-{n}".encode() * 50) for n in range(count)]
    events = [
        {
            "study_instance_uid": "1.2.3",
            "series_instance_uid": "1.2.3.4",
            "sop_instance_uid": f"1.2.3.4.{n}",
            "sha256": s.sha256,
            "landing_uri": s.uri,
        }
        for n, s in enumerate(stored)
    ]
    batch = [_Message(e, offset=100 + n) for n, e in enumerate(events)]
    return sink, stores[0], stores[1], stored, batch


def _archived(archive: FilesystemStore) -> list[str]:
    return sorted(p.name for p in archive.root.rglob("*.dcm"))


def _key(n: int) -> str:
    return f"1.2.3/1.2.3.4/1.2.3.4.{n}.dcm"


@pytest.mark.parametrize(
    "fault",
    [
        OSError(errno.EIO, "Input/output error"),
        PermissionError(errno.EACCES, "Permission denied"),
        PermissionError(errno.EPERM, "Operation not permitted"),
        OSError(errno.ELOOP, "Too many levels of symbolic links"),
        StorageRefused("object store: get ab/x.dcm: An error occurred (InvalidObjectState) when calling GetObject"),
        StorageRefused("object store: get ab/x.dcm: An error occurred (AccessDenied) when calling GetObject"),
    ],
    ids=["EIO", "EACCES", "EPERM", "ELOOP", "InvalidObjectState", "AccessDenied"],
)
def test_a_landing_copy_that_cannot_be_read_is_dead_lettered_kept_and_the_partition_goes_on(tmp_path, fault):
    sink, landing, archive, stored, batch = _setup(tmp_path)
    landing.faults[stored[1].relative_path] = fault
    dead, stop = _Dead(), _NoWait()
    assert write_until_done(sink, batch, dead, stop) is True  # written: the consumer commits past all three
    assert stop.waits == 0  # not one retry
    [(offset, reason)] = dead.produced
    assert offset == 101
    assert reason.startswith("archive: the landing copy cannot be read (")
    assert "kept" in reason and type(fault).__name__ in reason
    assert _archived(archive) == ["1.2.3.4.0.dcm", "1.2.3.4.2.dcm"]
    # The landing copy of the one given up is kept; the others were removed once archived.
    assert [(landing.root / s.relative_path).exists() for s in stored] == [False, True, False]
    # Once fixed, the same event (replayed from the dead letter: a message of its own) archives it.
    del landing.faults[stored[1].relative_path]
    sink.write([_Message(batch[1].event, offset=500)], dead)
    assert dead.pending == []
    assert _archived(archive) == ["1.2.3.4.0.dcm", "1.2.3.4.1.dcm", "1.2.3.4.2.dcm"]


@pytest.mark.parametrize(
    "fault",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError(errno.EROFS, "Read-only file system"),
        StorageError("object store: put k: An error occurred (503) when calling PutObject: Slow Down"),
        StorageError("object store: put k: Could not connect to the endpoint URL"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        TimeoutError("timed out"),
    ],
    ids=["ENOSPC", "EDQUOT", "EROFS", "S3-503", "S3-unreachable", "ECONNRESET", "timeout"],
)
def test_the_stores_trouble_is_retried_past_every_limit_and_nothing_is_dead_lettered(tmp_path, monkeypatch, fault):
    clock = [1000.0]
    monkeypatch.setattr(archive_module.time, "monotonic", lambda: clock[0])
    sink, landing, archive, stored, batch = _setup(tmp_path, max_tries=3, max_retry_s=60)
    tries = 12  # four times max_tries, and (below) 20 minutes of it
    archive.faults[_key(1)] = [fault] * tries

    class Advancing(_NoWait):
        def wait(self, timeout: float) -> bool:
            clock[0] += 100.0
            return super().wait(timeout)

    dead, stop = _Dead(), Advancing()
    assert write_until_done(sink, batch, dead, stop) is True
    assert stop.waits == tries and archive.calls[_key(1)] == tries + 1
    assert dead.produced == []
    assert _archived(archive) == ["1.2.3.4.0.dcm", "1.2.3.4.1.dcm", "1.2.3.4.2.dcm"]
    assert not any((landing.root / s.relative_path).exists() for s in stored)


@pytest.mark.parametrize(
    "fault",
    [
        PermissionError(errno.EACCES, "Permission denied"),
        StorageRefused("object store: put k: An error occurred (AccessDenied) when calling PutObject"),
        OSError(errno.EIO, "Input/output error"),
        OSError("something no one foresaw"),
    ],
    ids=["EACCES", "AccessDenied", "EIO", "no-errno"],
)
def test_an_error_on_the_archives_side_is_retried_then_dead_lettered_after_max_tries(tmp_path, fault):
    """The landing copy reads, so the archive refused: perhaps every object (a folder's permission, a
    bucket policy), so it is tried again; but not for ever."""
    sink, landing, archive, stored, batch = _setup(tmp_path, max_tries=4)
    archive.always[_key(1)] = fault
    dead, stop = _Dead(), _NoWait()
    assert write_until_done(sink, batch, dead, stop) is True
    assert archive.calls[_key(1)] == 4 and stop.waits == 3
    [(offset, reason)] = dead.produced
    assert offset == 101
    assert reason.startswith("archive: gave up after 4 tries in ") and "landing copy is kept" in reason
    assert type(fault).__name__ in reason
    assert _archived(archive) == ["1.2.3.4.0.dcm", "1.2.3.4.2.dcm"]
    assert (landing.root / stored[1].relative_path).exists()


def test_an_instance_is_given_up_after_max_retry_s_whatever_its_tries(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(archive_module.time, "monotonic", lambda: clock[0])
    sink, landing, archive, stored, batch = _setup(tmp_path, count=1, max_tries=50, max_retry_s=60)
    archive.always[_key(0)] = PermissionError(errno.EACCES, "Permission denied")
    dead = _Dead()
    with pytest.raises(RetryableError, match=r"try 1 for this instance; dead-lettered after 50 tries or 60 s"):
        sink.write(batch, dead)
    clock[0] = 59.0
    with pytest.raises(RetryableError, match="try 2"):
        sink.write(batch, dead)
    clock[0] = 60.0
    sink.write(batch, dead)
    assert dead.pending == [(100, dead.pending[0][1])] and "gave up after 3 tries in 60 s" in dead.pending[0][1]
    assert (landing.root / stored[0].relative_path).exists()


def test_a_given_up_instance_stays_given_up_while_its_batch_is_written_again(tmp_path):
    """A later message's store trouble has the whole batch written again: the instance given up on is
    parked again at once (its count is not started over), and parked once when the batch is done."""
    sink, landing, archive, stored, batch = _setup(tmp_path, max_tries=3)
    archive.always[_key(0)] = PermissionError(errno.EACCES, "Permission denied")
    archive.faults[_key(2)] = [OSError(errno.ENOSPC, "No space left on device")] * 5
    dead, stop = _Dead(), _NoWait()
    assert write_until_done(sink, batch, dead, stop) is True
    assert archive.calls[_key(0)] == 3
    assert [offset for offset, _ in dead.produced] == [100]
    assert _archived(archive) == ["1.2.3.4.1.dcm", "1.2.3.4.2.dcm"]


def test_a_landing_store_refused_as_a_whole_is_not_dead_lettered_wholesale(tmp_path):
    """Ten unreadable landing copies in a row, none archived between: the eleventh is not dead-lettered
    (the landing store as a whole is likely refused) but retried without limit until one is archived."""
    sink, landing, archive, stored, batch = _setup(tmp_path, count=12, max_tries=3)
    for s in stored:
        landing.faults[s.relative_path] = PermissionError(errno.EACCES, "Permission denied")
    dead = _Dead()
    for _ in range(5):  # past max_tries: still not given up
        dead.discard()
        with pytest.raises(RetryableError, match="giving up paused: 10 instances given up"):
            sink.write(batch, dead)
    assert [offset for offset, _ in dead.pending] == list(range(100, 110))
    # Fixed for the eleventh: it is archived, which starts the count again, and the twelfth is parked at once.
    del landing.faults[stored[10].relative_path]
    dead.discard()
    sink.write(batch, dead)
    assert [offset for offset, _ in dead.pending] == [*range(100, 110), 111]
    assert _archived(archive) == ["1.2.3.4.10.dcm"]


def _given_up_offsets(sink, batch, dead, writes: int) -> set[int]:
    """The offsets dead-lettered over ``writes`` writes of the batch (each retried one's letters discarded,
    as write_until_done does: the given-up are parked again on each)."""
    offsets: set[int] = set()
    for _ in range(writes):
        dead.discard()
        try:
            sink.write(batch, dead)
        except RetryableError:
            pass
        offsets |= {offset for offset, _ in dead.pending}
    return offsets


def test_a_batch_written_again_does_not_reset_the_count_of_unreadable_landing_copies(tmp_path):
    """The first instance archived, the 39 after it unreadable (the landing store refuses them all): the
    batch written again finds the first already archived ('unchanged'), which is no evidence the landing
    store works. Before, it reset the count and each retry dead-lettered ten more (39 after 3 retries)."""
    sink, landing, archive, stored, batch = _setup(tmp_path, count=40)
    for s in stored[1:]:
        landing.faults[s.relative_path] = PermissionError(errno.EACCES, "Permission denied")
    dead = _Dead()
    assert _given_up_offsets(sink, batch, dead, writes=4) == set(range(101, 111))
    assert _archived(archive) == ["1.2.3.4.0.dcm"]


def _paused() -> float | None:
    return REGISTRY.get_sample_value("diana_archive_giving_up_paused")


def test_an_archive_refusing_every_object_pauses_giving_up_after_ten_until_one_is_archived(tmp_path):
    """The archive side refuses every put (a folder's permission, a bucket policy): ten instances are given
    up (tries limit), then none: retried without limit, logged once, shown by the gauge; the first instance
    archived resumes giving up. Before, every instance was dead-lettered, max_tries each."""
    sink, landing, archive, stored, batch = _setup(tmp_path, count=15, max_tries=3)
    for n in range(15):
        archive.always[_key(n)] = PermissionError(errno.EACCES, "Permission denied")
    dead = _Dead()
    with capture_logs() as logs:
        assert _given_up_offsets(sink, batch, dead, writes=100) == set(range(100, 110))
    paused = [entry for entry in logs if entry["event"] == "archive.giving_up_paused"]
    assert len(paused) == 1 and paused[0]["given_up"] == 10
    assert _paused() == 1.0
    with pytest.raises(RetryableError, match="giving up paused"):
        sink.write(batch, dead)
    # Fixed: the paused one is archived (giving up resumes), and so is every later one.
    archive.always.clear()
    dead.discard()
    with capture_logs() as logs:
        sink.write(batch, dead)
    assert [entry["event"] for entry in logs if "giving_up" in entry["event"]] == ["archive.giving_up_resumed"]
    assert _paused() == 0.0
    assert [offset for offset, _ in dead.pending] == list(range(100, 110))
    assert _archived(archive) == [f"1.2.3.4.{n}.dcm" for n in range(10, 15)]


def _given_up_total(cause: str) -> float:
    return REGISTRY.get_sample_value("diana_archive_given_up_total", {"cause": cause}) or 0.0


def test_while_paused_a_broken_instance_is_given_up_after_max_retry_s_and_the_next_is_reached(tmp_path, monkeypatch):
    """Ten given up pause giving up. Before, the eleventh broken instance then held the batch (every partition
    of the consumer) until a restart: the batch stopped at it, nothing after it was tried, and only its own
    archiving resumed giving up. Now, while paused, it is given up after max_retry_s (counted, logged, its
    landing copy kept), still paused, and the next instance is tried, waiting its own max_retry_s."""
    clock = [1000.0]
    monkeypatch.setattr(archive_module.time, "monotonic", lambda: clock[0])
    sink, landing, archive, stored, batch = _setup(tmp_path, count=13, max_tries=3, max_retry_s=60)
    for n in range(12):
        archive.always[_key(n)] = PermissionError(errno.EACCES, "Permission denied")
    dead = _Dead()
    assert _given_up_offsets(sink, batch, dead, writes=30) == set(range(100, 110))
    assert _paused() == 1.0
    assert _key(11) not in archive.calls  # the batch stops at the eleventh
    before = _given_up_total("retried_while_paused")
    clock[0] += 59.0
    with pytest.raises(RetryableError, match=r"giving up paused: 10 instances .* dead-lettered after 60 s"):
        sink.write(batch, dead)
    clock[0] += 1.0
    dead.discard()
    with capture_logs() as logs, pytest.raises(RetryableError, match="giving up paused: 11 instances"):
        sink.write(batch, dead)
    assert [offset for offset, _ in dead.pending] == list(range(100, 111))
    reason = dead.pending[-1][1]
    assert (
        reason.startswith("archive: gave up after 60 s while giving up was paused") and "landing copy is kept" in reason
    )
    [entry] = [entry for entry in logs if entry["event"] == "archive.given_up_while_paused"]
    assert entry["given_up"] == 11 and entry["origin"] == "dicom.instances/0/110"
    assert _given_up_total("retried_while_paused") == before + 1
    assert _paused() == 1.0  # still paused: one given up is no evidence the store works
    assert archive.calls[_key(11)] == 1  # the next one is reached
    assert (landing.root / stored[10].relative_path).exists()
    # The twelfth waits its own max_retry_s, then the thirteenth (which the archive takes) resumes giving up.
    clock[0] += 59.0
    with pytest.raises(RetryableError, match="giving up paused"):
        sink.write(batch, dead)
    clock[0] += 1.0
    dead.discard()
    sink.write(batch, dead)
    assert [offset for offset, _ in dead.pending] == list(range(100, 112))
    assert _archived(archive) == ["1.2.3.4.12.dcm"]
    assert _paused() == 0.0


class _S3Client:
    """boto3's S3 client for GetObject and DeleteObject, whose ``denied`` keys answer 403 AccessDenied (as for
    an object under an SSE-KMS key this role cannot use, or a Deny on its prefix)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.denied: set[str] = set()

    def get_object(self, Bucket: str, Key: str) -> dict:
        from botocore.exceptions import ClientError
        from botocore.response import StreamingBody

        if Key in self.denied:
            raise ClientError(
                {
                    "Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                    "ResponseMetadata": {"HTTPStatusCode": 403},
                },
                "GetObject",
            )
        data = self.objects[Key]
        return {"Body": StreamingBody(io.BytesIO(data), len(data))}

    def delete_object(self, Bucket: str, Key: str) -> None:
        self.objects.pop(Key, None)


def test_one_object_s3_refuses_with_access_denied_is_dead_lettered_not_retried_for_ever(tmp_path):
    """A 403 AccessDenied for one landed object (botocore's ClientError): StorageRefused, so its instance is
    dead-lettered (landing copy kept) and the rest of the batch archived. Before, AccessDenied was a
    StorageError: retried without limit, never counted, the whole sink stalled with no dead letter."""
    from diana.storage import S3Store

    client = _S3Client()
    landing = S3Store(client, "bucket", "landing/")
    sink = ArchiveSink(landing, tmp_path / "archive", codec=_Decoded())
    batch = []
    for n in range(3):
        data = f"DICOM-{n}".encode() * 50
        client.objects[f"landing/ab/{n}.dcm"] = data
        event = {
            "study_instance_uid": "1.2.3",
            "series_instance_uid": "1.2.3.4",
            "sop_instance_uid": f"1.2.3.4.{n}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "landing_uri": landing.uri(f"ab/{n}.dcm"),
        }
        batch.append(_Message(event, offset=100 + n))
    client.denied.add("landing/ab/1.dcm")

    class GivesUpWaiting(_NoWait):  # a retry for ever ends the test (write_until_done returns False)
        def is_set(self) -> bool:
            return self.waits >= 5

    dead, stop = _Dead(), GivesUpWaiting()
    assert write_until_done(sink, batch, dead, stop) is True
    assert stop.waits == 0
    [(offset, reason)] = dead.produced
    assert offset == 101 and reason.startswith("archive: the landing copy cannot be read (StorageRefused")
    assert "AccessDenied" in reason and "kept" in reason
    assert sorted(p.name for p in (tmp_path / "archive").rglob("*.dcm")) == ["1.2.3.4.0.dcm", "1.2.3.4.2.dcm"]
    assert sorted(client.objects) == ["landing/ab/1.dcm"]


def test_an_instance_failing_on_the_archive_side_has_its_landing_copy_read_once(tmp_path):
    """Each try of an archive-side failure needed to know the landing copy reads; it was read to its end on
    every try (gigabytes over S3, up to max_tries times). Now once per failing instance."""
    sink, landing, archive, stored, batch = _setup(tmp_path, count=1, max_tries=6)
    archive.always[_key(0)] = PermissionError(errno.EACCES, "Permission denied")
    dead = _Dead()
    assert write_until_done(sink, batch, dead, _NoWait()) is True
    assert archive.calls[_key(0)] == 6 and len(dead.produced) == 1
    assert landing.opens[stored[0].relative_path] == 1


def test_a_landing_copy_that_vanished_is_dead_lettered_and_the_partition_goes_on(tmp_path):
    sink, landing, archive, stored, batch = _setup(tmp_path)
    (landing.root / stored[1].relative_path).unlink()
    dead = _Dead()
    assert write_until_done(sink, batch, dead, _NoWait()) is True
    [(offset, reason)] = dead.produced
    assert offset == 101 and "is missing and was never archived" in reason
    assert _archived(archive) == ["1.2.3.4.0.dcm", "1.2.3.4.2.dcm"]


def test_the_landing_store_unavailable_while_checking_is_retried_not_counted(tmp_path):
    sink, landing, archive, stored, batch = _setup(tmp_path, count=1, max_tries=3)
    archive.always[_key(0)] = PermissionError(errno.EACCES, "Permission denied")
    landing.faults[stored[0].relative_path] = StorageError("object store: get k: 503 Slow Down")
    dead = _Dead()
    for _ in range(5):
        with pytest.raises(RetryableError, match="landing store unavailable"):
            sink.write(batch, dead)
    assert dead.pending == [] and sink._failing == {}


def test_classification():
    passing = [
        OSError(errno.ENOSPC, "full"),
        OSError(errno.EDQUOT, "quota"),
        OSError(errno.EHOSTUNREACH, "no route"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        TimeoutError(),
        StorageError("object store: put k: 500"),
    ]
    own = [
        StorageRefused("object store: get k: 403 AccessDenied"),
        PermissionError(errno.EACCES, "denied"),
        PermissionError(errno.EPERM, "not permitted"),
        OSError(errno.EIO, "I/O"),
        FileNotFoundError(errno.ENOENT, "gone"),
        OSError("no errno"),
    ]
    assert [store_wide(e) for e in passing] == [True] * len(passing)
    assert [store_wide(e) for e in own] == [False] * len(own)


def test_the_retry_gauge_says_how_long_a_batch_has_been_retried():
    class Sink:
        name, topics = "gauge-test", ("t",)
        seen: list[tuple[float, float | None]] = []
        tries = 0

        def write(self, batch, dead):
            Sink.tries += 1
            gauge = REGISTRY.get_sample_value("diana_sink_retrying_seconds", {"sink": "gauge-test"})
            Sink.seen.append((oldest_retry_s("gauge-test"), gauge))
            if Sink.tries < 3:
                raise RetryableError("store unavailable")

    assert write_until_done(Sink(), [], _Dead(), _NoWait()) is True
    first, *retried = Sink.seen
    assert first[0] == 0.0 and all(age > 0 and gauge > 0 for age, gauge in retried)
    assert oldest_retry_s("gauge-test") == 0.0
    assert REGISTRY.get_sample_value("diana_sink_retrying_seconds", {"sink": "gauge-test"}) == 0.0


def test_the_limits_have_floors():
    sinks = load_config(environ={}).sinks
    assert (sinks.archive_object_max_tries, sinks.archive_object_max_retry_s) == (50, 600.0)
    with pytest.raises(ConfigError, match="archive_object_max_tries = 2: use 3 or more"):
        load_config(environ={"DIANA_SINKS_ARCHIVE_OBJECT_MAX_TRIES": "2"})
    with pytest.raises(ConfigError, match="archive_object_max_retry_s = 10.0: use 60 or more"):
        load_config(environ={"DIANA_SINKS_ARCHIVE_OBJECT_MAX_RETRY_S": "10"})
