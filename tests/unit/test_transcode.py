"""access/transcode.py on pydicom's own test files: lossless syntaxes decode to the original pixels."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian

from diana.access.transcode import TranscodeError, decompressed


def _decoded_count(syntax: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("diana_decoded_objects_total", {"syntax": syntax, "outcome": outcome}) or 0.0


def _read(name: str):
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's test file {name} is missing"
    return dcmread(path)


@pytest.mark.parametrize(
    "compressed, original",
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),  # JPEG Lossless SV1 (GDCM) against RLE (pydicom's own decoder)
    ],
)
def test_lossless_syntaxes_decode_to_the_original_pixels_and_keep_the_uid(compressed, original):
    ds = _read(compressed)
    uid, syntax = ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID
    assert syntax.is_compressed
    out = decompressed(ds)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.SOPInstanceUID == uid  # the same object in another syntax
    assert np.array_equal(out.pixel_array, _read(original).pixel_array), f"{syntax.name}: pixels differ"
    assert "LossyImageCompression" not in out or out.LossyImageCompression != "01"


def test_a_jpeg_baseline_image_says_it_was_lossy_compressed():
    ds = _read("SC_rgb_jpeg_dcmtk.dcm")
    ds.pop("LossyImageCompression", None)
    before = _decoded_count("JPEG Baseline (Process 1)", "decoded")
    out = decompressed(ds)
    assert _decoded_count("JPEG Baseline (Process 1)", "decoded") == before + 1  # the Prometheus counter
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.LossyImageCompression == "01" and out.LossyImageCompressionMethod == "ISO_10918_1"
    assert out.PhotometricInterpretation == "RGB"  # YBR belongs to the compressed form
    assert len(out.PixelData) == out.Rows * out.Columns * 3


def test_uncompressed_objects_are_returned_as_they_are():
    ds = _read("CT_small.dcm")
    body = ds.PixelData
    assert decompressed(ds).PixelData is body


def test_a_damaged_stream_is_a_transcode_error_not_a_crash():
    ds = _read("SC_rgb_jpeg_dcmtk.dcm")
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not a jpeg"])
    before = _decoded_count("JPEG Baseline (Process 1)", "not_decodable")
    with pytest.raises(TranscodeError, match="JPEG Baseline.*not decodable"):
        decompressed(ds)
    assert _decoded_count("JPEG Baseline (Process 1)", "not_decodable") == before + 1


def test_an_object_decoding_past_the_limit_is_refused_before_decoding():
    ds = _read("SC_rgb_jpeg_dcmtk.dcm")
    ds.NumberOfFrames = 200_000  # 200,000 frames of 100 x 100 RGB: about 5.6 GiB decoded
    with pytest.raises(TranscodeError, match="over the limit"):
        decompressed(ds)


def test_missing_pixel_module_values_are_a_transcode_error():
    ds = _read("SC_rgb_jpeg_dcmtk.dcm")
    del ds.Rows
    with pytest.raises(TranscodeError, match="pixel module"):
        decompressed(ds)
