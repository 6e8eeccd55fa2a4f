"""WADO-RS frames and bulk data from an S3 archive are read by ranged requests pinned to one version.

A frame of a 20 MiB multi-frame object costs the header's request and the frame's, not the object; an
object replaced while it is read fails the read cleanly (503 before the status, a cut body after),
never mixing the old version's offsets with the new one's bytes.

The session's archive sink is swapped for one writing to S3 (S3Proxy) for this module and the objects
are sent to the receiver. The DICOMweb app runs in this process, over the real index and a real
S3Store whose botocore client reports each GetObject it makes through botocore's event hooks (observed,
nothing mocked), so that the test sees every byte fetched from S3.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    generate_uid,
)

from diana.storage import ObjectChanged, S3Store, open_store
from diana.storage.s3 import READ_AHEAD
from tests.support.asgi import asgi_get
from tests.support.dicomgen import make_instance, rle_literal
from tests.support.helpers import wait_until_caught_up

FRAMES = 40
ROWS = 512
FRAME_BYTES = ROWS * ROWS * 2  # 512 KiB: 20 MiB of pixel data an object
MIB = 1024**2
AS_STORED = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
CHANGED = b"the archived object changed while it was read; retry\n"


@dataclass
class Served:
    app: Any
    store: S3Store  # the app's, observed
    other: S3Store  # another client: the writer that replaces objects meanwhile
    study: str
    series: str
    native_sop: str
    rle_sop: str
    native: list[bytes]
    rle: list[bytes]
    gets: list[tuple[int, int]] = field(default_factory=list)  # (status, bytes announced) per GetObject

    def key(self, sop: str) -> str:
        return f"{self.study}/{self.series}/{sop}.dcm"

    def url(self, sop: str, tail: str) -> str:
        return f"/studies/{self.study}/series/{self.series}/instances/{sop}/{tail}"

    def fetched(self) -> int:
        return sum(length for _, length in self.gets)


def _object(path: Path, study: str, series: str, number: int, syntax: str, frames: list[bytes]) -> str:
    ds = make_instance(study, series, number, patient_id="S3RANGE1", study_date="20240707", rows=ROWS)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.BitsStored, ds.HighBit, ds.NumberOfFrames = 16, 15, FRAMES
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == RLELossless:
        ds.add_new(0x7FE00010, "OB", encapsulate([rle_literal(f) for f in frames], has_bot=True))
        ds["PixelData"].is_undefined_length = True
    else:
        ds.add_new(0x7FE00010, "OW", b"".join(frames))
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _send(cfg: Any, paths: list[Path]) -> None:
    from pynetdicom import AE, build_context

    ae = AE(ae_title="PYSENDER")
    ae.requested_contexts = [
        build_context(MultiFrameGrayscaleWordSecondaryCaptureImageStorage, syntax)
        for syntax in (ExplicitVRLittleEndian, RLELossless)
    ]
    assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title)
    assert assoc.is_established
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            assert status and status.Status == 0, path
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def served(pipeline, s3_archive_sink, tmp_path_factory) -> Served:
    from diana.access.dicomweb.app import build_app
    from diana.access.dicomweb.auth import Credentials
    from diana.access.qr.index_reader import IndexReader
    from diana.clients import opensearch_client

    folder = tmp_path_factory.mktemp("s3ranged")
    study, series = generate_uid(), generate_uid()
    native = [random.Random(n).randbytes(FRAME_BYTES) for n in range(1, FRAMES + 1)]
    native_sop = _object(folder / "native.dcm", study, series, 1, ExplicitVRLittleEndian, native)
    rle_sop = _object(folder / "rle.dcm", study, series, 2, RLELossless, native)
    _send(pipeline.cfg, [folder / "native.dcm", folder / "rle.dcm"])
    wait_until_caught_up(pipeline.cfg)
    reader = IndexReader(opensearch_client(pipeline.cfg.opensearch), pipeline.cfg.opensearch.index_prefix)
    reader.client.indices.refresh(index=reader.index)
    store, other = open_store(s3_archive_sink, "archive"), open_store(s3_archive_sink, "archive")
    assert isinstance(store, S3Store) and isinstance(other, S3Store)
    assert store.client is not other.client
    served = Served(
        build_app(reader, store, pipeline.cfg.receiver.ae_title, Credentials()),
        store,
        other,
        study,
        series,
        native_sop,
        rle_sop,
        native,
        [rle_literal(f) for f in native],
    )
    assert store.exists(served.key(native_sop)) and store.exists(served.key(rle_sop))

    def observe(http_response: Any, parsed: dict, **_: Any) -> None:
        served.gets.append((http_response.status_code, int(parsed.get("ContentLength") or 0)))

    store.client.meta.events.register("after-call.s3.GetObject", observe)
    return served


@pytest.fixture
def observed(served: Served) -> Served:
    served.gets.clear()
    return served


def _get(
    served: Served, path: str, accept: str | None = None, on_first_body: Callable[[], None] | None = None
) -> tuple[int, dict[str, str], bytes, int, BaseException | None]:
    """A GET through the ASGI app: (status, headers, body, GetObjects made when the first body bytes were
    sent, what the app raised once its answer had begun: a cut body). ``on_first_body`` runs (in a worker
    thread) when the first body bytes are sent, before the app reads on."""
    first_body_gets = [-1]

    def first_body() -> None:
        first_body_gets[0] = len(served.gets)
        if on_first_body is not None:
            on_first_body()

    headers = {"host": "127.0.0.1:8088"} | ({"accept": accept} if accept else {})
    answer = asgi_get(served.app, path, headers=headers, on_first_body=first_body)
    return answer.status, dict(answer.headers), answer.body, first_body_gets[0], answer.error


def _parts(head: dict[str, str], body: bytes) -> list[bytes]:
    boundary = head["content-type"].split("boundary=")[1]
    assert body.endswith(f"--{boundary}--\r\n".encode()), "the body is not whole"
    return [chunk.partition(b"\r\n\r\n")[2][:-2] for chunk in body.split(f"--{boundary}".encode())[1:-1]]


def _replaced(served: Served, sop: str) -> tuple[bytes, bytes]:
    """(the archived object, the same with its native frames in reverse order): one size, one header, so
    that the old version's offsets land on the new one's frames."""
    with served.other.open(served.key(sop)) as stream:  # not through the observed client
        original = stream.read()
    start = original.index(served.native[0])
    pixels = b"".join(served.native)
    assert original[start : start + len(pixels)] == pixels
    return original, original[:start] + b"".join(reversed(served.native)) + original[start + len(pixels) :]


@pytest.mark.parametrize(
    "which, accept",
    [("native", None), ("rle", None), ("rle", AS_STORED)],
    ids=["native", "rle-decoded", "rle-as-stored"],
)
def test_a_frame_of_a_large_s3_object_is_fetched_alone_by_ranged_requests(observed: Served, which, accept):
    """Frame 33 of 40 (512 KiB each): the header's request (READ_AHEAD bytes from the start, the offset
    table among them) and the frame's. Before, each frame request downloaded the whole object."""
    sop = observed.native_sop if which == "native" else observed.rle_sop
    size = observed.store.size(observed.key(sop))
    status, head, body, _, error = _get(observed, observed.url(sop, "frames/33"), accept)
    assert (status, error) == (200, None), body[:300]
    expected = observed.rle[32] if accept == AS_STORED else observed.native[32]
    assert _parts(head, body) == [expected]
    assert all(status == 206 for status, _ in observed.gets), observed.gets
    assert len(observed.gets) == 2, observed.gets
    assert observed.fetched() <= 2 * READ_AHEAD < size / 8, (observed.fetched(), size)


def test_bulk_data_of_a_large_s3_object_is_streamed_by_ranged_requests(observed: Served):
    """The native pixel data (20 MiB) as one value: its status goes out after the header's request and the
    value's first block; the rest follows block by block (4 MiB a request), never the object downloaded
    first."""
    url = observed.url(observed.native_sop, "bulk/7FE00010")
    status, _, body, gets_at_first_body, error = _get(observed, url, "application/octet-stream")
    assert (status, error) == (200, None)
    assert body == b"".join(observed.native)
    assert gets_at_first_body == 2, observed.gets
    assert max(length for _, length in observed.gets) <= 4 * MIB
    assert observed.fetched() <= len(body) + READ_AHEAD


def test_an_object_replaced_while_its_frame_is_read_is_a_503_and_the_retry_reads_the_new_one(observed: Served):
    """The object is replaced between the header's request and the frame's: the frame's request carries
    If-Match with the first ETag, S3 answers 412, the route 503 "retry" (never the new version's bytes
    at the old version's offsets); the retry reads the new version whole."""
    key = observed.key(observed.native_sop)
    original, replacement = _replaced(observed, observed.native_sop)
    replaced = []

    def replace_before_the_first_pinned_get(params: dict, **_: Any) -> None:
        if params.get("IfMatch") and not replaced:
            observed.other.put_stream(key, io.BytesIO(replacement))
            replaced.append(True)

    events = observed.store.client.meta.events
    events.register("before-parameter-build.s3.GetObject", replace_before_the_first_pinned_get)
    try:
        status, _, body, _, error = _get(observed, observed.url(observed.native_sop, "frames/33"))
        assert (status, body, error) == (503, CHANGED, None)
        assert replaced and [status for status, _ in observed.gets] == [206, 412]
        status, head, body, _, error = _get(observed, observed.url(observed.native_sop, "frames/33"))
        assert (status, error) == (200, None)
        assert _parts(head, body) == [observed.native[FRAMES - 33]]  # frame 33 of the new version
    finally:
        events.unregister("before-parameter-build.s3.GetObject", replace_before_the_first_pinned_get)
        observed.other.put_stream(key, io.BytesIO(original))


def test_an_object_replaced_while_its_bulk_data_is_sent_cuts_the_body_never_mixing_versions(observed: Served):
    """The status and the value's first block have gone out when the object is replaced: the next block's
    request fails (412, ObjectChanged) and the body is cut there, a prefix of the old value without its
    end (the client sees a short body), never the new version's bytes."""
    key = observed.key(observed.native_sop)
    original, replacement = _replaced(observed, observed.native_sop)
    try:
        status, _, body, _, error = _get(
            observed,
            observed.url(observed.native_sop, "bulk/7FE00010"),
            "application/octet-stream",
            on_first_body=lambda: observed.other.put_stream(key, io.BytesIO(replacement)),
        )
        assert status == 200 and isinstance(error, ObjectChanged), error
        value = b"".join(observed.native)
        assert 0 < len(body) < len(value) and value.startswith(body)
        assert observed.gets[-1][0] == 412
    finally:
        observed.other.put_stream(key, io.BytesIO(original))


@pytest.mark.parametrize("how", ["as stored", "decoded"])
def test_item_headers_after_fragments_of_a_mib_or_more_are_read_exactly_without_an_offset_table(s3proxy, how):
    """No offset table, one 2 MiB RLE fragment a frame: the last of 4 frames costs the first MiB, each item
    header after the first and the delimiter as their 8 bytes (S3Proxy answering an 8-byte range with the
    object's ETag), and the frame: not a MiB a header. Put straight into S3 and read through the store."""
    from diana.access.dicomweb.transcoded import decoded_frames
    from diana.access.dicomweb.wado import frame_bytes

    archive = open_store(s3proxy, "archive")
    assert isinstance(archive, S3Store)
    store = S3Store(archive.client, archive.bucket, "t-item-headers/")
    count, rows = 4, 1024
    native = [random.Random(100 + n).randbytes(rows * rows * 2) for n in range(count)]
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="S3RANGE2", study_date="20240707", rows=rows)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.BitsStored, ds.HighBit, ds.NumberOfFrames = 16, 15, count
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.add_new(0x7FE00010, "OB", encapsulate([rle_literal(f) for f in native], has_bot=False))
    ds["PixelData"].is_undefined_length = True
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    store.put_stream("mf.dcm", io.BytesIO(encoded.getvalue()))
    gets: list[tuple[int, int, str | None]] = []

    def observe(http_response: Any, parsed: dict, **_: Any) -> None:
        gets.append((http_response.status_code, int(parsed.get("ContentLength") or 0), parsed.get("ETag")))

    archive.client.meta.events.register("after-call.s3.GetObject", observe)
    try:
        with store.open_seekable("mf.dcm") as view:
            if how == "decoded":
                assert decoded_frames(view, [count]) == [native[-1]]
            else:
                assert frame_bytes(view, [count]) == [rle_literal(native[-1])]
    finally:
        archive.client.meta.events.unregister("after-call.s3.GetObject", observe)
    frame = len(rle_literal(native[-1]))
    assert [status for status, _, _ in gets] == [206] * (1 + count + 1), gets
    assert [length for _, length, _ in gets][1:count] == [8] * (count - 1), gets  # the headers of items 2..4
    assert sum(length for _, length, _ in gets) <= READ_AHEAD + count * 8 + frame, gets
    assert gets[0][2] and {etag for _, _, etag in gets} == {gets[0][2]}
