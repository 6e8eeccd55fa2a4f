"""Unit: header reading and UID validation (what may become a path)."""

from __future__ import annotations

import json
from io import BytesIO

import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from diana.producers import header as header_module
from diana.producers.header import HeaderError, InvalidIdentifiers, Truncated, read_header, read_header_file
from diana.schemas.layout import archive_path, series_metadata_path
from diana.schemas.uid import is_conformant_uid, is_valid_uid
from tests.support.dicomgen import make_instance


@pytest.mark.parametrize(
    "uid,valid",
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("0", True),
        ("1.0.3", True),
        ("1.02.3", True),  # a leading zero: not PS3.5 9.1, but in the wild (pynetdicom#88, fo-dicom#859)
        ("1.2.03.4", True),
        ("00.1", True),
        ("1..2", False),
        ("..", False),
        (".", False),
        ("1.2.3 ", False),
        ("1.2.\u0663", False),  # an Arabic-Indic digit: str.isdigit() says yes, the pattern no
        (".1.2", False),
        ("1.2.", False),
        ("", False),
        ("../../etc/passwd", False),
        ("1.2/3", False),
        ("1.2.3\n", False),
        ("1" * 65, False),
        (None, False),
    ],
)
def test_uid_syntax(uid, valid):
    assert is_valid_uid(uid) is valid


@pytest.mark.parametrize("uid,conformant", [("1.2.3", True), ("0.0", True), ("1.02.3", False), ("1..2", False)])
def test_uid_conformance(uid, conformant):
    assert is_conformant_uid(uid) is conformant


def test_leading_zero_uids_are_accepted_counted_and_make_safe_paths():
    """A PACS migration stopped on 0xA900 for objects whose UIDs have a leading zero in a component."""
    study, series = "1.2.03.4", "1.2.03.4.05"
    ds = make_instance(study, series, 1, patient_id="P9", study_date="20240315", sop_uid="1.2.03.4.05.006")
    before = REGISTRY.get_sample_value("diana_nonconformant_uids_total", {"field": "study_instance_uid"}) or 0
    header = read_header(_bytes(ds))
    assert (header.study_instance_uid, header.sop_instance_uid) == (study, "1.2.03.4.05.006")
    after = REGISTRY.get_sample_value("diana_nonconformant_uids_total", {"field": "study_instance_uid"})
    assert after == before + 1
    assert archive_path(study, series, header.sop_instance_uid) == "1.2.03.4/1.2.03.4.05/1.2.03.4.05.006.dcm"
    assert series_metadata_path(study, series) == "1.2.03.4/1.2.03.4.05/.wado-metadata"


def _bytes(ds) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_header_fields_are_normalized():
    ds = make_instance(generate_uid(), generate_uid(), 5, patient_id="P9", study_date="20240315")
    header = read_header(_bytes(ds))
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    f = header.fields
    assert (f["study_date"], f["study_time"], f["patient_birth_date"]) == ("2024-03-15", "10:15:00", "1970-01-01")
    assert (f["instance_number"], f["series_number"], f["modality"]) == (5, 1, "CT")


@pytest.mark.parametrize("name", ["Smith^Anna^^Dr", "Müller^Jürgen", "Yamada^Tarou=山田^太郎=やまだ^たろう"])
def test_the_referring_physician_name_is_read_as_the_patient_name_is(name):
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
    ds.SpecificCharacterSet = ["ISO_IR 192"]
    ds.PatientName = ds.ReferringPhysicianName = name
    f = read_header(_bytes(ds)).fields
    # The same text, so that one matching (access/qr, kind "pn") serves both keys.
    assert f["referring_physician_name"] == f["patient_name"] == name


def test_an_empty_or_absent_referring_physician_name_is_none():
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
    ds.ReferringPhysicianName = ""  # Type 2 in the General Study module: present, often empty
    assert read_header(_bytes(ds)).fields["referring_physician_name"] is None
    del ds.ReferringPhysicianName
    assert read_header(_bytes(ds)).fields["referring_physician_name"] is None


def test_malformed_dates_become_absent_not_errors():
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20241399")
    ds.StudyTime = "99"
    f = read_header(_bytes(ds)).fields
    assert f["study_date"] is None and f["study_time"] is None


def test_impossible_calendar_dates_are_absent_and_do_not_reject_the_instance():
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
    ds.PatientBirthDate = "19700231"  # no 31 February: the age cannot come from it
    f = read_header(_bytes(ds)).fields
    assert f["patient_birth_date"] is None and f["patient_age_years"] is None
    assert f["study_date"] == "2024-03-15"


def test_missing_and_invalid_uids_are_rejected():
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
    del ds.SeriesInstanceUID
    with pytest.raises(InvalidIdentifiers, match="series_instance_uid"):
        read_header(_bytes(ds))
    ds = make_instance("1.2/../x", generate_uid(), 1, patient_id="P9", study_date="20240315")
    with pytest.raises(InvalidIdentifiers, match="study_instance_uid"):
        read_header(_bytes(ds))


def test_non_dicom_bytes_are_a_header_error():
    with pytest.raises(HeaderError):
        read_header(b"\x00" * 128 + b"DICM" + b"garbage" * 10)


def test_a_size_or_weight_no_32_bit_float_holds_is_absent():
    """The index maps them as float: 1e39 kg (a valid DS) made OpenSearch refuse the whole document."""
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
    ds.PatientWeight, ds.PatientSize = "1e39", "-3.5e38"
    f = read_header(_bytes(ds)).fields
    assert f["patient_weight_kg"] is None and f["patient_size_m"] is None
    ds.PatientWeight, ds.PatientSize = "3.4e38", "1.75"
    f = read_header(_bytes(ds)).fields
    assert (f["patient_weight_kg"], f["patient_size_m"]) == (3.4e38, 1.75)


def _saved(ds, transfer_syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = BytesIO()
    ds.save_as(
        buf,
        enforce_file_format=True,
        implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
        little_endian=transfer_syntax != ExplicitVRBigEndian,
    )
    return buf.getvalue()


def _native(transfer_syntax: str) -> bytes:
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
    return _saved(ds, transfer_syntax)


def _encapsulated(frames: int = 3) -> bytes:
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
    fragments = [bytes([i]) * 1000 for i in range(frames)]
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds.NumberOfFrames = frames
    return _saved(ds, JPEGBaseline8Bit)


def _pixel_offset(data: bytes) -> int:
    return data.rindex(b"\xe0\x7f\x10\x00") if b"\xe0\x7f\x10\x00" in data else data.rindex(b"\x7f\xe0\x00\x10")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_native_pixel_data_cut_short_is_truncated(syntax):
    """pydicom stops before the pixel data: a file cut in it parsed as whole and was stored (0x0000)."""
    data = _native(syntax)
    assert read_header(data).fields["header_json"]  # whole: accepted
    value = _pixel_offset(data) + (8 if syntax == ImplicitVRLittleEndian else 12)
    for keep in (value, value + 1, len(data) - 1000, len(data) - 500, len(data) - 1):
        with pytest.raises(Truncated, match="pixel data claims .* truncated"):
            read_header(data[:keep])
    if syntax != ImplicitVRLittleEndian:
        with pytest.raises(HeaderError):  # in the explicit-VR element's 4-byte length: pydicom cannot read it
            read_header(data[: value - 2])


def test_encapsulated_pixel_data_cut_short_is_truncated():
    data = _encapsulated()
    assert read_header(data).transfer_syntax_uid == JPEGBaseline8Bit
    end = len(data)
    # in the delimiter, at a fragment's end (no delimiter), in a fragment, in an item's header, in the offset table's
    for keep in (end - 4, end - 8, end - 9, end - 500, end - 8 - 1000 - 4, _pixel_offset(data) + 12 + 4):
        with pytest.raises(Truncated, match="truncated"):
            read_header(data[:keep])


def test_encapsulated_pixel_data_with_a_malformed_item_is_a_header_error():
    data = bytearray(_encapsulated())
    start = _pixel_offset(data)
    item = data.index(b"\xfe\xff\x00\xe0", start + 12 + 8)  # the first fragment after the offset table
    data[item : item + 4] = b"\x08\x00\x10\x00"
    with pytest.raises(HeaderError, match="malformed fragment item"):
        read_header(bytes(data))


def test_float_pixel_data_is_checked_too():
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
    del ds.PixelData
    ds.FloatPixelData = b"\x00" * 4 * 64 * 64
    data = _saved(ds, ExplicitVRLittleEndian)
    header = read_header(data)
    assert "7FE00010" not in json.loads(header.fields["header_json"])  # no Pixel Data to point to
    with pytest.raises(Truncated, match="float pixel data claims"):
        read_header(data[:-700])


def test_a_truncated_deflated_pixel_data_is_truncated(tmp_path):
    data = _native(DeflatedExplicitVRLittleEndian)
    path = tmp_path / "deflated.dcm"
    path.write_bytes(data)
    assert read_header_file(path).transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    path.write_bytes(data[:-300])
    with pytest.raises(HeaderError):
        read_header_file(path)


def _native_undefined_length(syntax: str) -> bytes:
    """Native pixel data of undefined length ended by a Sequence Delimitation Item (pydicom reads it)."""
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 16, 16, 15, 1
    del ds.PixelData  # pydicom writes native pixel data with a defined length: the element is written by hand
    implicit = syntax == ImplicitVRLittleEndian
    head = b"\xe0\x7f\x10\x00" + (b"" if implicit else b"OW\x00\x00") + b"\xff\xff\xff\xff"
    return _saved(ds, syntax) + head + bytes(range(1, 9)) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_pixel_data_of_undefined_length_is_accepted_whole_and_truncated_cut(syntax, tmp_path):
    """Not encapsulated: no item follows the header, the delimiter is found as pydicom finds it."""
    data = _native_undefined_length(syntax)
    path = tmp_path / "native.dcm"
    path.write_bytes(data)
    assert pydicom.dcmread(path).PixelData == bytes(range(1, 9))
    header = read_header_file(path)
    assert header.transfer_syntax_uid == syntax
    assert header.fields["patient_id"] == "P9"
    assert read_header(data).fields["patient_id"] == "P9"
    for keep in (len(data) - 8, len(data) - 9, len(data) - 16, len(data) - 6, len(data) - 2):
        path.write_bytes(data[:keep])  # before the delimiter, in the pixel data, in the delimiter or its length
        with pytest.raises(Truncated, match="truncated"):
            read_header_file(path)
        with pytest.raises(Truncated, match="truncated"):
            read_header(data[:keep])


def test_native_pixel_data_of_undefined_length_is_scanned_in_chunks(monkeypatch):
    """The delimiter is found across chunk boundaries (a huge file is not read whole)."""
    monkeypatch.setattr(header_module, "_SCAN_CHUNK", 3)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        data = _native_undefined_length(syntax)
        assert read_header(data).fields["patient_id"] == "P9"
        with pytest.raises(Truncated, match="before its sequence delimitation item"):
            read_header(data[:-8])
