"""Unit: the event's header keeps what can be decoded and fits, and says what it left out and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from diana.producers.header import HeaderError, read_header, read_header_file
from tests.support.dicomgen import make_instance, write_deflate_bomb, write_deflated, write_misfit_length_instance


def _bytes(ds: Dataset, tmp_path: Path) -> bytes:
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_an_undecodable_element_is_left_out_with_its_reason_and_the_rest_kept(tmp_path):
    path = tmp_path / "misfit.dcm"
    write_misfit_length_instance(path)
    header = read_header(path.read_bytes())
    assert header.fields["header_omitted"] == [
        {"path": "00280106", "reason": "undecodable: a value of 3 bytes does not fit VR US"}
    ]
    model = json.loads(header.fields["header_json"])
    assert "00280106" not in model and model["00100020"]["Value"] == ["MISFIT1"]
    assert header.fields["patient_id"] == "MISFIT1"


def test_an_undecodable_element_inside_a_sequence_leaves_only_itself_out(tmp_path):
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="NESTED1", study_date="20240101")
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "X", "Y"
    item.add_new(0x00280106, "US", 7)
    ds.ProcedureCodeSequence = [item]
    header = read_header(_with_misfit_in_sequence(ds, tmp_path))
    assert [o["path"] for o in header.fields["header_omitted"]] == ["00081032/0/00280106"]
    sequence = json.loads(header.fields["header_json"])["00081032"]["Value"]
    assert sequence[0]["00080100"]["Value"] == ["X"] and "00280106" not in sequence[0]


def _with_misfit_in_sequence(ds: Dataset, tmp_path: Path) -> bytes:
    """The US element in the item made 3 bytes long; the sequence and item have undefined lengths,
    so the longer element needs no other length changed."""
    ds.ProcedureCodeSequence[0].is_undefined_length_sequence_item = True
    ds["ProcedureCodeSequence"].is_undefined_length = True
    data = _bytes(ds, tmp_path)
    good = b"\x28\x00\x06\x01US\x02\x00\x07\x00"
    assert data.count(good) == 1
    return data.replace(good, b"\x28\x00\x06\x01US\x03\x00\x07\x00\x00")


def test_a_header_over_its_budget_leaves_out_its_largest_elements(tmp_path):
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="BUDGET1", study_date="20240101")
    ds.add_new(0x00091011, "UT", "x" * 20000)  # private UT, 20 kB
    ds.add_new(0x00091010, "UT", "y" * 50000)  # private UT, 50 kB
    header = read_header(_bytes(ds, tmp_path), header_budget_bytes=30000)
    omitted = {o["path"]: o["reason"] for o in header.fields["header_omitted"]}
    assert set(omitted) == {"00091010"} and omitted["00091010"].startswith("too large: 50000 encoded bytes")
    assert len(header.fields["header_json"]) <= 30000 and "00091011" in json.loads(header.fields["header_json"])
    # Under 20 kB: the 20 kB element fits its encoded size but not the JSON budget with the rest.
    header = read_header(_bytes(ds, tmp_path), header_budget_bytes=21000)
    omitted = {o["path"]: o["reason"] for o in header.fields["header_omitted"]}
    assert set(omitted) == {"00091010", "00091011"} and "bytes of JSON" in omitted["00091011"]


def test_a_deflated_data_set_is_read_and_a_deflate_bomb_refused(tmp_path):
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="DEFL1", study_date="20240101")
    del ds.PixelData
    header = read_header_file(write_deflated(ds, tmp_path / "small.dcm"))
    assert header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian and header.fields["patient_id"] == "DEFL1"
    write_deflate_bomb(tmp_path / "bomb.dcm", inflated_bytes=64 << 20)
    with pytest.raises(HeaderError, match="inflates past"):
        read_header_file(tmp_path / "bomb.dcm", max_inflated_bytes=16 << 20)
    assert not list(tmp_path.glob(".inflate-*"))


def test_a_deflate_bomb_whose_meta_understates_its_length_is_still_capped(tmp_path):
    """The file meta's group length (0002,0000) is the sender's word: pydicom reads every group-2
    element whatever it says, so must the check for a deflated data set (a scan trusting it let pydicom
    inflate such a file whole, in memory, past max_inflated_bytes)."""
    bomb = tmp_path / "bomb.dcm"
    write_deflate_bomb(bomb, inflated_bytes=64 << 20)
    data = bomb.read_bytes()
    group_length = b"\x02\x00\x00\x00UL\x04\x00"
    assert data[132:140] == group_length
    bomb.write_bytes(data[:140] + (0).to_bytes(4, "little") + data[144:])
    with pytest.raises(HeaderError, match="inflates past"):
        read_header_file(bomb, max_inflated_bytes=16 << 20)


def _with_document(tmp_path: Path, document: bytes, implicit: bool = False) -> Path:
    """An instance holding ``document`` as its Encapsulated Document (0042,0011, OB) at the top level."""
    from pydicom.uid import ImplicitVRLittleEndian

    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="DOC1", study_date="20240101")
    ds.EncapsulatedDocument = document
    ds.TextValue = "t" * 100_000  # a long text (UT): over the defer size, read as before
    path = tmp_path / "document.dcm"
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True, implicit_vr=implicit)
    return path


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit VR", "implicit VR"])
def test_a_large_binary_value_is_referenced_by_its_uri_without_being_read(tmp_path, implicit):
    """A 32 MB encapsulated document (over the 7.75 MB budget, and over pydicom's defer size): before, it was
    read whole into memory and then left out of the header; now it is referenced, as smaller binary values
    are, and never read (the receiver's memory does not grow with it)."""
    import tracemalloc

    path = _with_document(tmp_path, b"%PDF" + bytes(32 << 20), implicit)
    tracemalloc.start()
    try:
        header = read_header_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    model = json.loads(header.fields["header_json"])
    assert model["00420011"]["vr"] == "OB"
    assert model["00420011"]["BulkDataURI"].endswith(f"/instances/{header.sop_instance_uid}/bulk/00420011")
    assert model["0040A160"]["Value"] == ["t" * 100_000]
    assert header.fields["header_omitted"] == [] and header.fields["patient_id"] == "DOC1"


def test_a_large_value_cut_short_is_still_refused_as_truncated(tmp_path):
    """Its value is deferred, not read: its claimed length is still checked against the file's."""
    from diana.producers.header import Truncated

    path = _with_document(tmp_path, bytes(1 << 20))
    data = path.read_bytes()
    cut = data.index(b"\x42\x00\x11\x00OB") + 12 + 1000  # the element's header, then 1,000 of its bytes
    path.write_bytes(data[:cut])
    with pytest.raises(Truncated, match="claims 1048576 bytes, only 1000 follow"):
        read_header_file(path)


def test_a_deferred_value_is_read_from_the_open_file_when_its_path_is_gone(tmp_path, monkeypatch):
    """The receiver's reconcile reads landed files the archive sink removes once archived: a deferred value
    (a 100 kB text, read for the header) read by opening the path again raised a bare OSError when the
    file was removed meanwhile, and the whole reconcile pass stopped. It is read from the open file."""
    import diana.producers.header as header_module

    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="GONE1", study_date="20240101")
    ds.TextValue = "g" * 100_000
    path = tmp_path / "landed.dcm"
    ds.save_as(path, enforce_file_format=True)
    check = header_module._check_lengths

    def check_then_remove(ds, total):
        check(ds, total)
        path.unlink()  # archived and removed while the header is being read

    monkeypatch.setattr(header_module, "_check_lengths", check_then_remove)
    header = read_header_file(path)
    assert json.loads(header.fields["header_json"])["0040A160"]["Value"] == ["g" * 100_000]
