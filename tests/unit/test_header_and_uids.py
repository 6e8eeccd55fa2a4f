"""Unit: header reading and UID validation (what may become a path)."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.uid import generate_uid

from diana.producers.header import HeaderError, InvalidIdentifiers, read_header
from diana.schemas.uid import is_valid_uid
from tests.support.dicomgen import make_instance


@pytest.mark.parametrize(
    "uid,valid",
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("0", True),
        ("1.0.3", True),
        ("1.02.3", False),
        ("1..2", False),
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
