"""Unit: the header read from raw bytes (raw_element_json.py) is the header pydicom's own path gives.

Every case is read twice: as the receiver reads it, and with the raw path turned off (every element
converted by pydicom and rendered by ``to_json_dict``, every field read with ``Dataset.get``, as
before issue 19's change). The two must agree on the event's header JSON, its omissions, every
search field and every refusal, on pydicom's test files, its character-set files, the vendor dose
reports of ../shared, the bench's CT slice and crafted edge cases of each VR.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from diana.producers import header, header_model
from diana.producers.header import read_header
from diana.producers.raw_element_json import element_json, text_is_ascii_compatible
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.paths import dose_acceptance_dir


def _pydicom_get(self: header._Values, keyword: str, _kinds: tuple[type, ...]) -> object:
    try:
        return self.ds.get(keyword)
    except Exception:
        return None


@contextmanager
def _pydicom_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as patch:
        patch.setattr(header_model, "element_json", lambda *_args: None)
        patch.setattr(header, "element_json", lambda *_args: None)
        patch.setattr(header._Values, "get", _pydicom_get)
        yield


def _outcome(data: bytes) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on the invalid values the cases hold on purpose
        try:
            read = read_header(data)
        except Exception as exc:
            return ("refused", type(exc).__name__, str(exc))
    return ("read", read)


def _assert_same(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple:
    raw_path = _outcome(data)
    with _pydicom_path(monkeypatch):
        pydicom_path = _outcome(data)
    assert raw_path == pydicom_path
    return raw_path


def _files() -> list[Path]:
    # The files pydicom ships (its get_testdata_files would also try to download more).
    shipped = Path(pydicom.data.__file__).parent
    candidates = [*(shipped / "test_files").glob("*.dcm"), *(shipped / "charset_files").glob("*.dcm")]
    return sorted(candidates) + sorted(dose_acceptance_dir().glob("*.dcm"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_real_files_read_the_same(path: Path, monkeypatch: pytest.MonkeyPatch):
    _assert_same(path.read_bytes(), monkeypatch)


def test_the_test_files_are_there_and_mostly_read():
    """The parametrised cases above test something: enough files, most of them with a header."""
    files = _files()
    read = [p for p in files if _outcome(p.read_bytes())[0] == "read"]
    assert len(files) >= 90 and len(read) >= 60


def test_the_bench_slice_reads_the_same_and_fully_from_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    study = make_study(tmp_path, [SeriesSpec("CT", "BENCH CT", 1)], rows=64, patient_id="BENCHCT")
    data = study.files[0].read_bytes()
    outcome = _assert_same(data, monkeypatch)
    assert outcome[0] == "read" and outcome[1].fields["patient_id"] == "BENCHCT"
    ds = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    rendered = [element_json(ds.get_item(t), True, str, 1024) for t in ds.keys()]  # noqa: SIM118
    assert all(r is not None for r in rendered)  # the common case takes the fast path, element by element


# Crafted explicit VR little endian data sets: each element's bytes exactly as written here.


def _element(tag: int, vr: str, value: bytes) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"):
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _part10(elements: list[tuple[int, str, bytes]], implicit: bool = False) -> bytes:
    meta = FileMetaDataset()
    sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    base = [
        (0x00080016, "UI", _even(sop_class.encode(), b"\0")),
        (0x00080018, "UI", _even(sop_instance.encode(), b"\0")),
        (0x0020000D, "UI", _even(generate_uid().encode(), b"\0")),
        (0x0020000E, "UI", _even(generate_uid().encode(), b"\0")),
    ]
    body = b""
    for tag, vr, value in sorted(base + elements):
        if implicit:
            body += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
        else:
            body += _element(tag, vr, value)
    ds = Dataset()
    ds.file_meta = meta
    buffer = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + body


def _even(value: bytes, pad: bytes = b" ") -> bytes:
    return value + pad if len(value) % 2 else value


TEXT_CASES = [
    (0x00100010, "PN", b"DOE^JOHN"),
    (0x00100010, "PN", b"DOE^JOHN=YAMADA^TARO=yamada^taro"),
    (0x00100010, "PN", b"A^B=C=D=E "),
    (0x00100010, "PN", b"A^B="),
    (0x00100010, "PN", b"=B "),
    (0x00100010, "PN", b"A\\B^C"),
    (0x00100010, "PN", b"\\ "),
    (0x00100010, "PN", b"  "),
    (0x00100020, "LO", b"ID 1  "),
    (0x00100020, "LO", b" A \\ B "),
    (0x00100020, "LO", b"\\"),
    (0x00100020, "LO", b"  "),
    (0x00100020, "LO", b"A\0"),
    (0x00080060, "CS", b"CT"),
    (0x00080008, "CS", b"ORIGINAL\\PRIMARY\\AXIAL "),
    (0x00080008, "CS", b"A  \\B "),
    (0x00080008, "CS", b"\\"),
    (0x00080008, "CS", b" A"),
    (0x00101010, "AS", b"045Y"),
    (0x00080020, "DA", b"20240101"),
    (0x00080020, "DA", b"2024"),
    (0x00080030, "TM", b"101010.123 "),
    (0x0008002A, "DT", b"20240101101010"),
    (0x00081030, "LO", b"BRAIN\\HEAD"),
    (0x00324000, "LT", b"line one\\still one  "),
    (0x00324000, "LT", b"  "),
    (0x00081030, "UC", b"X\\Y "),
    (0x00080054, "AE", b" AE1 \\ AE2  "),
    (0x00080054, "AE", b"  "),
    (0x00081190, "UR", b"http://example.org/x  "),
    (0x00081155, "UI", b"1.2.3\0"),
    (0x00081155, "UI", b" 1.2.3 \\1.2.4\0"),
    (0x00081155, "UI", b"\0\0"),
    (0x00200013, "IS", b"12"),
    (0x00200013, "IS", b" +12 "),
    (0x00200013, "IS", b"-0"),
    (0x00200013, "IS", b"1.0 "),
    (0x00200013, "IS", b"12\\"),
    (0x00200013, "IS", b"x1"),
    (0x00200013, "IS", b"  "),
    (0x00200013, "IS", b"99999999999999999999"),
    (0x00101020, "DS", b"1.75"),
    (0x00101020, "DS", b" 1.5\\-2e3 "),
    (0x00101020, "DS", b".5\\5.\\+1E-2"),
    (0x00101020, "DS", b"1e999 "),
    (0x00101020, "DS", b"nan "),
    (0x00101020, "DS", b"1_0 "),
    (0x00101020, "DS", b"\\1"),
    (0x00101020, "DS", b"  "),
    (0x00180050, "DS", b"0.625000"),
    (0x00280010, "US", b"\x00\x02"),
    (0x00280010, "US", b"\x00\x02\x01"),
    (0x00280010, "US", b""),
    (0x00281052, "SS", b"\xff\xff\x01\x00"),
    (0x00186020, "SL", b"\xff\xff\xff\xff"),
    (0x00186028, "UL", b"\x01\x00\x00\x00\x02\x00\x00\x00"),
    (0x00189327, "FD", b"\x00\x00\x00\x00\x00\x00\xf0\x3f"),
    (0x00189327, "FD", b"\x00\x00\x00\x00\x00\x00\xf0\x7f"),
    (0x00189327, "FD", b"\x01\x00\x00\x00\x00\x00\xf0\x7f"),
    (0x00189306, "FL", b"\x00\x00\xc0\x3f"),
    (0x00189306, "FL", b"\x00\x00\xc0\x7f"),
    (0x00720032, "AT", b"\x10\x00\x20\x00"),
    (0x00281101, "SS", b"\x00\x80\x00\x00\x10\x00"),  # LUT descriptor: pydicom adds 65536 to a negative first
    (0x00281101, "US", b"\x00\x01\x00\x00\x10\x00"),
    (0x00101030, "IS", b"72.5"),  # a weight under VR IS: the search field stays 72.5
    (0x00101020, "IS", b"2 "),
    (0x00101030, "DS", b"72.5"),
    (0x00091010, "LO", b"PRIVATE CREATOR"),
    (0x00091011, "DS", b"2.5 "),
    (0x00091012, "UN", b"\x01\x02\x03\x04"),
    (0x00100020, "UN", b"UNID"),
    (0x7FE00011, "OB", b"\x01" * 700),
    (0x00091013, "OB", b"\x01" * 768),
    (0x00091014, "OB", b"\x01" * 770),
    (0x00091015, "OW", b"\x01\x02" * 400),
    (0x00091016, "OB", b""),
    (0x00091017, "OF", b"\x00\x00\x80\x3f"),
    (0x00091018, "UV", b"\x01\x00\x00\x00\x00\x00\x00\x80"),
    (0x00091019, "SV", b"\xff" * 8),
]


@pytest.mark.parametrize("tag,vr,value", TEXT_CASES, ids=lambda c: repr(c)[:40] if isinstance(c, bytes) else None)
def test_each_vr_edge_case_reads_the_same(tag: int, vr: str, value: bytes, monkeypatch: pytest.MonkeyPatch):
    padded = _even(value, b"\0" if vr in ("UI", "OB", "OW", "UN") else b" ")
    _assert_same(_part10([(tag, vr, padded)]), monkeypatch)


@pytest.mark.parametrize(
    "charset,value",
    [
        (b"ISO_IR 100", "MÜLLER^HANS".encode("latin-1")),
        (b"ISO_IR 100", b"MULLER^HANS"),
        (b"ISO_IR 192", "Müller^Hans".encode()),
        (b"\\ISO 2022 IR 87", b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"),
        (b"\\ISO 2022 IR 87", b"YAMADA^TARO"),
        (b"ISO 2022 IR 13", b"YAMADA\\TARO"),
        (b"ISO_IR 13", b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3"),
        (b"GB18030", "王^小东".encode("gb18030")),
        (b"UNKNOWN CHARSET", b"ASCII^ONLY"),
        (b"", "Ö".encode("latin-1")),
    ],
)
def test_character_sets_read_the_same(charset: bytes, value: bytes, monkeypatch: pytest.MonkeyPatch):
    for vr, tag in (("PN", 0x00100010), ("LO", 0x00081030), ("SH", 0x00080050), ("LT", 0x00324000)):
        elements = [(0x00080005, "CS", _even(charset)), (tag, vr, _even(value))]
        _assert_same(_part10(elements), monkeypatch)


def test_an_item_with_a_character_set_of_its_own_reads_the_same(monkeypatch: pytest.MonkeyPatch):
    name = _element(0x00100010, "PN", _even("MÜLLER".encode("latin-1")))
    item = _element(0x00080005, "CS", b"ISO_IR 100") + name + _element(0x00100020, "LO", b"ID")
    undefined = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + item + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    sequence = undefined + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    data = _part10([(0x00081032, "SQ", b"")])
    # The sequence's undefined length, then its items (the helper writes defined lengths only).
    data = data.replace(_element(0x00081032, "SQ", b""), _element(0x00081032, "SQ", b"")[:-4] + b"\xff" * 4 + sequence)
    outcome = _assert_same(data, monkeypatch)
    assert outcome[0] == "read"
    item = json.loads(outcome[1].fields["header_json"])["00081032"]["Value"][0]
    assert item["00100010"]["Value"] == [{"Alphabetic": "MÜLLER"}]


def test_implicit_vr_reads_the_same(monkeypatch: pytest.MonkeyPatch):
    elements = [
        (0x00100010, "", b"DOE^JANE"),
        (0x00100020, "", b"IMPL1 "),
        (0x00200013, "", b"7 "),
        (0x00280010, "", b"\x00\x01"),
        (0x00091010, "", b"PRIV"),
        (0x00280106, "", b"\x00\x00"),  # "US or SS" in the dictionary: pydicom's path
        (0x60003000, "", b"\x00\x00"),  # overlay data, a repeater
    ]
    outcome = _assert_same(_part10(elements, implicit=True), monkeypatch)
    assert outcome[0] == "read" and outcome[1].fields["patient_id"] == "IMPL1"


def test_identifiers_refused_the_same(monkeypatch: pytest.MonkeyPatch):
    data = _part10([])
    bad_study = data.replace(b"\x20\x00\x0d\x00UI", b"\x20\x00\x0d\x00LO", 1)
    for case in (bad_study, data.replace(b"1.2.840.10008.5.1.4.1.1.7\0", b"1.2.840/../1.1.7\0\0")):
        _assert_same(case, monkeypatch)


def test_character_set_compatibility():
    assert text_is_ascii_compatible(None) and text_is_ascii_compatible("ISO_IR 100")
    assert text_is_ascii_compatible(["", "ISO 2022 IR 100"])
    assert not text_is_ascii_compatible(["", "ISO 2022 IR 87"]) and not text_is_ascii_compatible("ISO_IR 13")
