"""Unit: the seekable view of an S3 object (S3Store.open_seekable) and its arithmetic: which ranges it asks
for, how many requests and bytes a read costs, and that every request after the first is pinned to the
first one's ETag.

The bucket here is a stand-in that answers GetObject and HeadObject as S3 documents them (Range,
Content-Range, If-Match, 416 for a range past the end), over botocore's own StreamingBody, so that
the arithmetic is checked byte for byte. The real server (S3Proxy) is exercised by the integration
tests: tests/integration/test_object_store.py and test_s3_ranged_reads.py.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from typing import Any

import pytest
import structlog
import structlog.testing
from botocore.exceptions import ClientError
from botocore.response import StreamingBody

from diana.storage import ObjectChanged, ObjectNotFound, S3Store, StorageError

KIB = 1024


def _error(status: int, code: str, operation: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


class _Bucket:
    """Objects by key, answered as S3 answers them; ``asked`` lists each GET's (Range, IfMatch)."""

    def __init__(self, ignores_if_match: bool = False):
        self.objects: dict[str, bytes] = {}
        self.asked: list[tuple[str | None, str | None]] = []
        self.ignores_if_match = ignores_if_match

    @staticmethod
    def _etag(data: bytes) -> str:
        return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        if Key not in self.objects:
            raise _error(404, "404", "HeadObject")
        data = self.objects[Key]
        return {"ContentLength": len(data), "ETag": self._etag(data)}

    def get_object(self, Bucket: str, Key: str, Range: str | None = None, IfMatch: str | None = None) -> dict:
        self.asked.append((Range, IfMatch))
        if Key not in self.objects:
            raise _error(404, "NoSuchKey", "GetObject")
        data = self.objects[Key]
        if IfMatch is not None and IfMatch != self._etag(data) and not self.ignores_if_match:
            raise _error(412, "PreconditionFailed", "GetObject")
        answer: dict[str, Any] = {"ETag": self._etag(data)}
        body = data
        if Range is not None:
            found = re.fullmatch(r"bytes=(\d+)-(\d+)", Range)
            assert found, Range
            start, end = int(found.group(1)), int(found.group(2))
            if start >= len(data):
                raise _error(416, "InvalidRange", "GetObject")
            end = min(end, len(data) - 1)
            body = data[start : end + 1]
            answer["ContentRange"] = f"bytes {start}-{end}/{len(data)}"
        answer.update(ContentLength=len(body), Body=StreamingBody(io.BytesIO(body), len(body)))
        return answer


DATA = random.Random(5).randbytes(5 * 1024 * KIB + 123)


def _store(bucket: _Bucket | None = None) -> tuple[S3Store, _Bucket]:
    bucket = bucket or _Bucket()
    bucket.objects["archive/a/b.dcm"] = DATA
    return S3Store(bucket, "bucket", "archive/"), bucket


def test_small_reads_share_one_window_and_a_large_read_is_one_request():
    store, bucket = _store()
    with store.open_seekable("a/b.dcm", read_ahead=64 * KIB) as view:
        # Opening fetches the first window: pydicom's header reads (4 and 8 bytes at a time) come from it.
        assert bucket.asked == [("bytes=0-65535", None)]
        etag = bucket._etag(DATA)
        assert view.read(128) == DATA[:128] and view.read(4) == DATA[128:132]
        view.seek(60 * KIB)
        assert view.read(8) == DATA[60 * KIB : 60 * KIB + 8]
        assert len(bucket.asked) == 1
        # A small read past the window: one window from where it starts.
        view.seek(3 * 1024 * KIB)
        assert view.read(10) == DATA[3 * 1024 * KIB : 3 * 1024 * KIB + 10]
        assert bucket.asked[1] == (f"bytes={3 * 1024 * KIB}-{3 * 1024 * KIB + 64 * KIB - 1}", etag)
        # A large read starting in the window: what the window holds, and the rest in one request.
        start = 3 * 1024 * KIB + 10
        assert view.read(500 * KIB) == DATA[start : start + 500 * KIB]
        assert bucket.asked[2] == (f"bytes={3 * 1024 * KIB + 64 * KIB}-{start + 500 * KIB - 1}", etag)
        assert len(bucket.asked) == 3
        assert view.fetched == 64 * KIB * 2 + (500 * KIB - (64 * KIB - 10))  # type: ignore[attr-defined]
        assert view.requests == 3  # type: ignore[attr-defined]


def test_it_reads_as_a_file_reads():
    """The same answers as a file for seeks from the start, the current position and the end, reads past
    the end, read(0), read() of the rest (one request), and a read of a whole window's size."""
    store, bucket = _store()
    expected = io.BytesIO(DATA)
    with store.open_seekable("a/b.dcm", read_ahead=64 * KIB) as view:
        assert view.seekable() and view.readable() and not view.writable()
        steps: list[tuple[str, tuple[int, ...]]] = [
            ("read", (132,)),
            ("seek", (-10, io.SEEK_END)),
            ("read", (100,)),  # 10 bytes: the object ends
            ("read", (100,)),  # none
            ("seek", (1000, io.SEEK_SET)),
            ("seek", (64 * KIB, io.SEEK_CUR)),
            ("read", (0,)),
            ("read", (64 * KIB,)),
            ("seek", (len(DATA) + 50, io.SEEK_SET)),
            ("read", (5,)),
            ("seek", (2 * 1024 * KIB, io.SEEK_SET)),
        ]
        for name, args in steps:
            assert getattr(view, name)(*args) == getattr(expected, name)(*args), (name, args)
            assert view.tell() == expected.tell()
        before = len(bucket.asked)
        assert view.read() == expected.read()
        assert len(bucket.asked) == before + 1
        with pytest.raises(ValueError, match="negative seek"):
            view.seek(-1)
        buffer = bytearray(16)
        view.seek(7)
        assert view.readinto(buffer) == 16 and bytes(buffer) == DATA[7:23]
    with pytest.raises(ValueError):
        view.read(1)  # closed with the block


def test_a_replaced_object_fails_the_next_request_never_mixing_versions():
    """Every request after the first carries If-Match with the first one's ETag: the object replaced
    meanwhile is ObjectChanged (412) at the next request. What the window held is of the old version."""
    store, bucket = _store()
    with store.open_seekable("a/b.dcm", read_ahead=64 * KIB) as view:
        bucket.objects["archive/a/b.dcm"] = DATA[::-1]  # same size, other bytes
        assert view.read(132) == DATA[:132]  # from the window: the old version
        view.seek(2 * 1024 * KIB)
        with pytest.raises(ObjectChanged, match="get a/b.dcm: the object was replaced while it was read"):
            view.read(16)
    assert bucket.asked[-1][1] == bucket._etag(DATA)


def test_a_server_that_ignores_if_match_is_caught_by_the_answers_etag():
    store, bucket = _store(_Bucket(ignores_if_match=True))
    with store.open_seekable("a/b.dcm", read_ahead=64 * KIB) as view:
        bucket.objects["archive/a/b.dcm"] = DATA[::-1]
        view.seek(1024 * KIB)
        with pytest.raises(ObjectChanged):
            view.read(16)


def test_a_later_answer_without_an_etag_is_refused_never_stitched_to_another_version():
    """A server (or a proxy before it) that ignores If-Match and sends no ETag with its later answers:
    before, only the first answer had to carry one, and a read after the object was replaced gave the
    new version's bytes at the old one's offsets. Now every later answer must carry the first's ETag.
    Its absence is a storage error, logged with its cause (s3.answer_without_etag, without the key's
    UIDs), not ObjectChanged ("changed; retry"): such a server answers every retry without one."""
    store, bucket = _store(_Bucket(ignores_if_match=True))
    original = bucket.get_object

    def etag_on_the_first_answer_only(**kwargs: Any) -> dict:
        answer = original(**kwargs)
        if kwargs.get("IfMatch"):
            del answer["ETag"]
        return answer

    bucket.get_object = etag_on_the_first_answer_only  # type: ignore[method-assign]
    replaced = DATA[::-1]
    with store.open_seekable("a/b.dcm", read_ahead=64 * KIB) as view:
        bucket.objects["archive/a/b.dcm"] = replaced
        view.seek(1024 * KIB)
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(StorageError, match="get a/b.dcm: a later answer has no ETag") as refused,
        ):
            view.read(16)
    assert not isinstance(refused.value, ObjectChanged)
    [logged] = logs
    assert (logged["event"], logged["log_level"], logged["bucket"], logged["prefix"]) == (
        "s3.answer_without_etag",
        "error",
        "bucket",
        "archive/",
    )
    assert "a/b.dcm" not in str(logged)
    # Unchanged, the same answer is refused too: without its ETag it cannot be shown to be the same version.
    bucket.objects["archive/a/b.dcm"] = DATA
    with store.open_seekable("a/b.dcm", read_ahead=64 * KIB) as view:
        view.seek(1024 * KIB)
        with pytest.raises(StorageError, match="no ETag"):
            view.read(16)
    assert bucket.asked[-1] == (f"bytes={1024 * KIB}-{1024 * KIB + 64 * KIB - 1}", bucket._etag(DATA))


def test_an_object_deleted_while_read_is_changed_and_one_never_there_is_not_found():
    store, bucket = _store()
    with store.open_seekable("a/b.dcm", read_ahead=64 * KIB) as view:
        del bucket.objects["archive/a/b.dcm"]
        view.seek(1024 * KIB)
        with pytest.raises(ObjectChanged, match="deleted while it was read"):
            view.read(16)
    with pytest.raises(ObjectNotFound), store.open_seekable("a/none.dcm"):
        pass


def test_an_empty_object_reads_empty():
    """S3 answers a range on an empty object with 416: its size and ETag come from a HEAD."""
    store, bucket = _store()
    bucket.objects["archive/a/empty.dcm"] = b""
    with store.open_seekable("a/empty.dcm") as view:
        assert view.read() == b"" and view.read(10) == b"" and view.seek(0, io.SEEK_END) == 0


def test_a_small_object_is_read_in_its_first_request():
    store, bucket = _store()
    bucket.objects["archive/a/small.dcm"] = DATA[:5000]
    with store.open_seekable("a/small.dcm") as view:
        view.seek(4000)
        assert view.read(2000) == DATA[4000:5000]
        view.seek(0)
        assert view.read() == DATA[:5000]
    assert bucket.asked == [(f"bytes=0-{(1 << 20) - 1}", None)]


def test_an_answer_of_another_range_or_without_etag_is_refused():
    store, bucket = _store()
    original = bucket.get_object

    def whole(**kwargs: Any) -> dict:  # a server that ignores Range after the first request
        answer = original(**kwargs)
        if kwargs.get("IfMatch"):
            kwargs.pop("Range")
            answer = original(**kwargs)
        return answer

    bucket.get_object = whole  # type: ignore[method-assign]
    with store.open_seekable("a/b.dcm", read_ahead=64 * KIB) as view:
        view.seek(1024 * KIB)
        with pytest.raises(StorageError, match="asked bytes 1048576-1114111/.*, answered no Content-Range"):
            view.read(1)

    def without_etag(**kwargs: Any) -> dict:
        answer = original(**kwargs)
        del answer["ETag"]
        return answer

    bucket.get_object = without_etag  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="no ETag"), store.open_seekable("a/b.dcm"):
        pass


def test_the_views_name_is_no_path_so_pydicom_reads_deferred_values_through_it():
    """pydicom re-reads a deferred value of an io.BufferedReader by opening its ``name`` as a local file; of
    any other stream, from that stream. The view is not a BufferedReader and has no name."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4.5"
    ds.add_new(0x00420011, "OB", DATA[: 300 * KIB])
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    store, bucket = _store()
    bucket.objects["archive/a/pdf.dcm"] = encoded.getvalue()
    with store.open_seekable("a/pdf.dcm", read_ahead=16 * KIB) as view:
        assert not isinstance(view, io.BufferedReader) and getattr(view, "name", None) is None
        read = pydicom.dcmread(view, defer_size=1024)
        assert read.filename is None and read.buffer is view
        assert read.get_item(0x00420011, keep_deferred=True).value is None
        assert read[0x00420011].value == DATA[: 300 * KIB]  # the deferred read, through the view


def _multiframe(syntax: str, frames: list[bytes], rows: int = 64, table: bool = True) -> bytes:
    """A multi-frame ``rows`` x ``rows`` 16-bit object in ``syntax`` (native, or RLE with a basic offset
    table, or without one when not ``table``), encoded."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    from tests.support.dicomgen import rle_literal

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.NumberOfFrames = 1, "MONOCHROME2", len(frames)
    if syntax == RLELossless:
        ds.add_new(0x7FE00010, "OB", encapsulate([rle_literal(f) for f in frames], has_bot=table))
        ds["PixelData"].is_undefined_length = True
    else:
        ds.add_new(0x7FE00010, "OW", b"".join(frames))
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    return encoded.getvalue()


@pytest.mark.parametrize("how", ["native", "RLE as stored", "RLE decoded"])
def test_a_frame_of_a_multiframe_object_costs_two_requests(how: str):
    """The header from the first request (read up to the pixel data, not through its items), the frame
    from one more: through the view, wado.py's and transcoded.py's readers, pydicom's pixel_array included."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from diana.access.dicomweb.transcoded import decoded_frames
    from diana.access.dicomweb.wado import frame_bytes

    native = [random.Random(n).randbytes(64 * 64 * 2) for n in range(1, 41)]
    data = _multiframe(ExplicitVRLittleEndian if how == "native" else RLELossless, native)
    store, bucket = _store()
    bucket.objects["archive/a/mf.dcm"] = data
    with store.open_seekable("a/mf.dcm", read_ahead=16 * KIB) as view:
        if how == "RLE decoded":
            assert decoded_frames(view, [33]) == [native[32]]
        elif how == "RLE as stored":
            import pydicom

            stored = list(generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=40))
            assert frame_bytes(view, [33]) == [stored[32]]
        else:
            assert frame_bytes(view, [33]) == [native[32]]
        assert view.requests == 2, bucket.asked  # type: ignore[attr-defined]
        assert view.fetched <= 2 * 16 * KIB < len(data) / 10  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["as stored", "decoded"])
def test_the_item_headers_of_frames_larger_than_a_window_are_read_exactly_without_an_offset_table(how: str):
    """No offset table, one fragment a frame, each longer than the read-ahead: the walk to the last frame
    reads each item header after the first as its 8 bytes, not a window of the fragment it skips (before:
    a window of read_ahead bytes a header, about the object's size for one frame). A request a header
    still: only the bytes go."""
    from pydicom.uid import RLELossless

    from diana.access.dicomweb.transcoded import decoded_frames
    from diana.access.dicomweb.wado import frame_bytes
    from tests.support.dicomgen import rle_literal

    count, rows = 10, 128  # 32 KiB frames (33 KiB as RLE literals), a 16 KiB read-ahead
    native = [random.Random(n).randbytes(rows * rows * 2) for n in range(count)]
    store, bucket = _store()
    bucket.objects["archive/a/mf.dcm"] = _multiframe(RLELossless, native, rows, table=False)
    with store.open_seekable("a/mf.dcm", read_ahead=16 * KIB) as view:
        if how == "decoded":
            assert decoded_frames(view, [count]) == [native[-1]]
        else:
            assert frame_bytes(view, [count]) == [rle_literal(native[-1])]
        # The first request (the header, the first item's), 9 item headers and the delimiter, the frame.
        assert view.requests == 1 + count + 1, bucket.asked  # type: ignore[attr-defined]
        frame = len(rle_literal(native[-1]))
        assert view.fetched <= 16 * KIB + count * 8 + frame  # type: ignore[attr-defined]


@pytest.mark.parametrize("number", [1, 5, 10])
def test_without_an_offset_table_every_frame_costs_the_walk_of_every_item_header(number: int):
    """What docs/DICOMWEB.md says: the walk reads every item's header to the delimiter whichever frame is
    asked (it counts the items against the frames to know there is one a frame), so the first frame costs
    the requests of the last: 12 for ten frames larger than the read-ahead."""
    from pydicom.uid import RLELossless

    from diana.access.dicomweb.wado import frame_bytes
    from tests.support.dicomgen import rle_literal

    count, rows = 10, 128
    native = [random.Random(n).randbytes(rows * rows * 2) for n in range(count)]
    store, bucket = _store()
    bucket.objects["archive/a/mf.dcm"] = _multiframe(RLELossless, native, rows, table=False)
    with store.open_seekable("a/mf.dcm", read_ahead=16 * KIB) as view:
        assert frame_bytes(view, [number]) == [rle_literal(native[number - 1])]
        assert view.requests == 1 + count + 1, bucket.asked  # type: ignore[attr-defined]


def test_the_item_headers_of_small_frames_keep_the_window_without_an_offset_table():
    """Fragments shorter than the read-ahead: a window fetched at a header holds the next ones, so the walk
    keeps reading ahead (fewer requests than items), as before."""
    from pydicom.uid import RLELossless

    from diana.access.dicomweb.wado import frame_bytes
    from tests.support.dicomgen import rle_literal

    native = [random.Random(n).randbytes(64 * 64 * 2) for n in range(40)]  # 8 KiB frames, 64 KiB windows
    store, bucket = _store()
    bucket.objects["archive/a/mf.dcm"] = _multiframe(RLELossless, native, table=False)
    with store.open_seekable("a/mf.dcm", read_ahead=64 * KIB) as view:
        assert frame_bytes(view, [40]) == [rle_literal(native[-1])]
        assert view.requests <= 8, bucket.asked  # type: ignore[attr-defined]


def test_read_exact_reads_what_is_held_from_memory_and_the_rest_alone():
    store, bucket = _store()
    with store.open_seekable("a/b.dcm", read_ahead=64 * KIB) as view:
        view.seek(100)
        assert view.read_exact(8) == DATA[100:108] and len(bucket.asked) == 1  # type: ignore[attr-defined]
        view.seek(2 * 1024 * KIB)
        assert view.read_exact(8) == DATA[2 * 1024 * KIB : 2 * 1024 * KIB + 8]  # type: ignore[attr-defined]
        assert bucket.asked[-1] == (f"bytes={2 * 1024 * KIB}-{2 * 1024 * KIB + 7}", bucket._etag(DATA))
        assert view.tell() == 2 * 1024 * KIB + 8 and view.fetched == 64 * KIB + 8  # type: ignore[attr-defined]
        view.seek(64 * KIB - 4)  # across the end of what is held: fetched whole
        assert view.read_exact(8) == DATA[64 * KIB - 4 : 64 * KIB + 4]  # type: ignore[attr-defined]
        view.seek(len(DATA) - 3)
        assert view.read_exact(8) == DATA[-3:] and view.read_exact(8) == b""  # type: ignore[attr-defined]


def test_a_connection_failing_while_a_body_is_read_is_the_stores_error_not_the_objects():
    """botocore's StreamingBody passes urllib3's errors on as they are (an SSLError is no OSError): unmapped,
    the WADO-RS routes took it for a corrupt object (500) instead of the archive not answering (503)."""
    from urllib3.exceptions import ProtocolError, SSLError

    from diana.storage import StorageError
    from diana.storage.s3 import _Errors

    for failure in (SSLError("decryption failed"), ProtocolError("connection broken")):
        with pytest.raises(StorageError, match="the connection failed"), _Errors("get x"):
            raise failure


class _ReplacedAfterFirst(_Bucket):
    """Ignores If-Match; after the first GET the object is replaced by ``then`` (an archive REPLACE), and
    the later answers carry no ETag (``later_etag`` "none") or the new version's."""

    def __init__(self, key: str, first: bytes, then: bytes, later_etag: str):
        super().__init__(ignores_if_match=True)
        self.key, self.then, self.later_etag = key, then, later_etag
        self.objects[key] = first

    def get_object(self, Bucket: str, Key: str, Range: str | None = None, IfMatch: str | None = None) -> dict:
        if self.asked:
            self.objects[self.key] = self.then
        answer = super().get_object(Bucket, Key, Range, IfMatch)
        if IfMatch and self.later_etag == "none":
            del answer["ETag"]
        return answer


@pytest.mark.parametrize("later_etag", ["none", "the new version's"])
def test_the_frames_route_answers_503_for_a_later_answer_of_another_or_no_etag_never_two_versions_bytes(
    later_etag: str,
):
    """The object replaced between the route's two GETs, by a server that ignores If-Match: a later
    answer with the new version's ETag is 503 "changed; retry", one without an ETag 503 as the archive's
    error (a retry cannot succeed with such a server: the log says why), both before anything is sent.
    Before, the answer without an ETag was accepted and the frame came from the new version, at the
    offsets the old version's header gave; then it was "changed; retry"."""
    from pydicom.uid import ExplicitVRLittleEndian

    from diana.access.dicomweb.app import build_app
    from diana.access.dicomweb.auth import Credentials
    from diana.schemas.layout import archive_path
    from tests.unit.test_dicomweb_app import SERIES, STUDY, _call, _Reader

    rows, count = 256, 16  # 128 KiB frames: the last ones past the first MiB the route's first GET reads
    old, new = ([random.Random(seed * 100 + n).randbytes(rows * rows * 2) for n in range(count)] for seed in (1, 2))
    key = archive_path(STUDY, SERIES, "1.2.3.4.5")
    bucket = _ReplacedAfterFirst(
        f"archive/{key}",
        _multiframe(ExplicitVRLittleEndian, old, rows),
        _multiframe(ExplicitVRLittleEndian, new, rows),
        later_etag,
    )
    doc = {"study_instance_uid": STUDY, "series_instance_uid": SERIES, "sop_instance_uid": "1.2.3.4.5"}
    app = build_app(_Reader(docs=[doc]), S3Store(bucket, "bucket", "archive/"), "DIANA", Credentials())
    path = f"/studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.5/frames/{count}"
    status, _, body = _call(app, path, headers={"Accept": "multipart/related; type=application/octet-stream"})
    if later_etag == "none":
        assert (status, body) == (503, b"the archive does not answer; retry later\n")
    else:
        assert (status, body) == (503, b"the archived object changed while it was read; retry\n")
    assert len(bucket.asked) == 2
