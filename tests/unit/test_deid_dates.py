"""DA, TM and DT in every form PS3.5 allows, and the malformed ones devices send: shifted, or the
object refused with a reason, never a crash."""

from __future__ import annotations

import pytest

from diana.access.dateshift import MalformedTemporal, shift_value
from diana.access.deid import Deidentifier, Refused
from diana.access.deid_options import ProfileOptions
from diana.access.pseudonyms import ProjectKeys
from tests.support.deidgen import identifying_object

VALID = [
    ("DA", "20190510", 10, "20190430"),
    ("DA", "2019.05.10", 10, "20190430"),  # ACR-NEMA form, written back as YYYYMMDD
    ("DA", "20190301", 1, "20190228"),
    ("DA", "20200301", 1, "20200229"),  # leap year
    ("DA", "20190101-20190131", 1, "20181231-20190130"),  # range
    ("DA", "-20190131", 1, "-20190130"),
    ("DA", "20190101-", 1, "20181231-"),
    ("DA", " 20190510 ", 10, "20190430"),  # padding
    ("DA", "", 10, ""),
    ("TM", "101112", 10, "101112"),  # whole-day shifts leave times of day alone
    ("TM", "1011", 10, "1011"),
    ("TM", "10", 10, "10"),
    ("TM", "101112.123456", 10, "101112.123456"),
    ("TM", "10:11:12", 10, "10:11:12"),  # ACR-NEMA form
    ("TM", "235960", 10, "235960"),  # leap second
    ("TM", "080000-170000", 10, "080000-170000"),
    ("DT", "20190510101112.123456+0100", 10, "20190430101112.123456+0100"),
    ("DT", "20190510101112-0500", 10, "20190430101112-0500"),  # a UTC offset is not a range
    ("DT", "20190510101112.1", 10, "20190430101112.1"),
    ("DT", "201905101011", 10, "201904301011"),
    ("DT", "2019051010", 10, "2019043010"),
    ("DT", "20190510", 10, "20190430"),
    ("DT", "201905", 40, "201903"),  # kept at its own precision
    ("DT", "2019", 300, "2018"),
    ("DT", "20190101000000-20190131235959", 1, "20181231000000-20190130235959"),
    ("DT", "20190101000000+0100-20190131235959+0100", 1, "20181231000000+0100-20190130235959+0100"),
    ("DT", "-20190131", 1, "-20190130"),
]
MALFORMED = [
    ("DA", "20190510%"),  # the value that crashed dicognito
    ("DA", "2019-05-10"),
    ("DA", "20191332"),
    ("DA", "20190230"),
    ("DA", "00000000"),
    ("DA", "2019051"),
    ("DA", "Unknown"),
    ("DA", "20190101-20190131-20190228"),
    ("DA", "-"),
    ("TM", "251000"),
    ("TM", "1061"),
    ("TM", "10.5"),
    ("TM", "noon"),
    ("DT", "20190510T101112"),
    ("DT", "20190510101112.1234567"),
    ("DT", "20190510101112+2500"),
    ("DT", "20191310"),
    ("DT", "201905101099"),
    ("DT", "%Y%m%d%"),
]


@pytest.mark.parametrize(("vr", "value", "days", "expected"), VALID)
def test_valid_forms_are_shifted(vr, value, days, expected):
    assert shift_value(value, vr, days) == expected


@pytest.mark.parametrize(("vr", "value"), MALFORMED)
def test_malformed_forms_raise_without_quoting_the_value(vr, value):
    with pytest.raises(MalformedTemporal) as caught:
        shift_value(value, vr, 10)
    assert value not in str(caught.value) or len(value) < 3


@pytest.mark.parametrize(("vr", "value"), MALFORMED)
def test_an_object_with_a_malformed_date_is_refused_with_the_element_path(vr, value):
    d = Deidentifier(ProjectKeys(b"s" * 32, "p"), ProfileOptions())
    ds = identifying_object("enhanced_ct")
    frame = ds.PerFrameFunctionalGroupsSequence[1].FrameContentSequence[0]
    keyword = {"DA": "ContentDate", "TM": "ContentTime", "DT": "FrameAcquisitionDateTime"}[vr]
    target = frame if vr == "DT" else ds
    target.add_new(keyword, vr, value)
    with pytest.raises(Refused) as caught:
        d.deidentify(ds)
    path = "PerFrameFunctionalGroupsSequence[1].FrameContentSequence[0]." if vr == "DT" else ""
    assert str(caught.value).startswith(path + keyword + ": not a")


def test_a_date_written_with_dashes_is_said_to_be_no_date_not_a_bad_range():
    with pytest.raises(MalformedTemporal, match=r"not a DA \(YYYYMMDD\) nor a range of them"):
        shift_value("2024-01-15", "DA", 3)
    assert shift_value("20240110-20240120", "DA", 3) == "20240107-20240117"
