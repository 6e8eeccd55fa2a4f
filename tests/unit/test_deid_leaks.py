"""Identifiers that left a research export unnoticed (found by an audit of the de-identification):
each test builds the leaking object and asserts that the value is gone or the residual scan finds it."""

from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from diana.access.dateshift import shift_value
from diana.access.deid import Deidentifier
from diana.access.deid_options import DateOption, ProfileOptions
from diana.access.export import REPORT_NAME, export_instances
from diana.access.pseudonyms import ProjectKeys
from diana.access.research import load_safe_private
from diana.access.residual import Hit, scan
from tests.support.dicomgen import make_instance

KEYS = ProjectKeys(b"unit-test-site-secret-32-bytes!!", "audit")


def _source(patient_id: str = "MRN998877", name: str = "Doe^John") -> Dataset:
    ds = make_instance("1.2.3.4", "1.2.3.4.5", 1, patient_id=patient_id, study_date="20240115")
    ds.PatientName = name
    return ds


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deidentify(ds: Dataset, **options) -> tuple[Dataset, list[Hit]]:
    result = Deidentifier(KEYS, ProfileOptions(**options)).deidentify(ds)
    return result.dataset, scan(result.dataset, result.identifiers)


def _archived(archive: Path, ds: Dataset) -> dict:
    """``ds`` written into an archive folder by its UIDs; its cohort row."""
    path = archive / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(_bytes(ds))
    return {
        "study_instance_uid": ds.StudyInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
        "sop_instance_uid": ds.SOPInstanceUID,
        "patient_id": ds.PatientID,
    }


def _export_zip(tmp_path: Path, ds: Dataset, **options) -> tuple[dict, list[Dataset]]:
    """A zip research export of ``ds`` from an archive folder: its report and its objects."""
    archive = tmp_path / "archive"
    row = _archived(archive, ds)
    target = tmp_path / "out.zip"
    export_instances([row], archive, target, deidentifier=Deidentifier(KEYS, ProfileOptions(**options)))
    with zipfile.ZipFile(target) as zf:
        report = json.loads(zf.read(REPORT_NAME))
        objects = [pydicom.dcmread(io.BytesIO(zf.read(n))) for n in zf.namelist() if n.endswith(".dcm")]
    return report, objects


def test_a_name_part_inside_our_own_words_is_redacted_and_searched(tmp_path):
    """ "Ted" is inside "[REDACTED]": a substring test against the de-identifier's own words dropped it
    from both the redaction and the scan, and "CT follow-up for Ted" went out in a complete export."""
    ds = _source(name="Doe^Ted")
    ds.StudyDescription = "CT follow-up for Ted"
    report, [out] = _export_zip(tmp_path, ds, clean_descriptors=True)
    assert report["status"] == "complete"
    assert out.StudyDescription == "CT follow-up for [REDACTED]"
    for part in ("Ted", "Red", "One", "Anonym"):
        ds = _source(name=f"Doe^{part}")
        ds.AcquisitionProtocolName = f"head for {part}"  # kept as it is (Table E.1-1 does not list it)
        _, hits = _deidentify(ds)
        assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "person name")], part


def test_a_value_in_kept_text_or_equal_to_a_kept_code_is_found():
    """Before, any element the profile keeps excused a value it held: the institution inside a kept
    protocol name, the PatientID as a component of a kept file ID."""
    ds = _source()
    ds.InstitutionName = "Mercy General"
    ds.AcquisitionProtocolName = "Mercy General head"  # not in Table E.1-1: kept as it is
    _, hits = _deidentify(ds)
    assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "InstitutionName")]
    ds = _source(patient_id="12345678")
    record = Dataset()
    record.DirectoryRecordType = "IMAGE"
    record.ReferencedFileID = ["DICOM", "12345678", "IM0001"]
    ds.DirectoryRecordSequence = [record]
    _, hits = _deidentify(ds)
    assert [(h.path, h.kind) for h in hits] == [("DirectoryRecordSequence[0].ReferencedFileID", "PatientID")]


def test_what_the_equipment_or_a_retain_option_keeps_still_excuses_an_equal_value():
    """The narrower rule that replaced it: a dose report's content tree names its scanner and station
    in text the profile removes, while the equipment's description (and the station, when device
    identity is retained) stays. A word of the equipment's own description excuses a value too."""
    ds = _source()
    ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = "SIEMENS", "SOMATOM Flash", "CTSTATION7"
    ds.InstitutionName = "Here"
    ds.SoftwareVersions = "Made here"
    ds.ContentSequence = []
    for text in ("SIEMENS", "SOMATOM Flash", "CTSTATION7"):
        item = Dataset()
        item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", text
        ds.ContentSequence.append(item)
    out, hits = _deidentify(ds, retain_device_identity=True)
    assert out.StationName == "CTSTATION7" and hits == []
    _, hits = _deidentify(ds)  # the station removed: its name in a kept attribute would be found
    assert hits == []


def test_short_and_ideographic_name_parts_are_redacted_and_searched():
    """Name parts under 3 letters were never redacted nor searched: most Chinese and Korean surnames,
    ideographic name groups. Now 2+ letters as words, 1+ in another alphabet; CJK, kana and Hangul
    anywhere in text (they do not separate words by spaces)."""
    ds = _source(name="Yamada^Tarou=山田^太郎")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDescription = "CT 山田 太郎"
    ds.SeriesDescription = "山田太郎さん 胸部"
    out, hits = _deidentify(ds, clean_descriptors=True)
    assert (out.StudyDescription, out.SeriesDescription) == (
        "CT [REDACTED] [REDACTED]",
        "[REDACTED][REDACTED]さん 胸部",
    )
    assert hits == []
    ds = _source(name="Li^Wu")
    ds.StudyDescription = "CT for Wu Li, clinical"
    ds.AcquisitionProtocolName = "head Li"  # kept as it is
    out, hits = _deidentify(ds, clean_descriptors=True)
    assert out.StudyDescription == "CT for [REDACTED] [REDACTED], clinical"  # not "c[REDACTED]nical"
    assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "person name")]
    ds = _source(name="김^민수")
    ds.AcquisitionProtocolName = "김민수님 CT"
    _, hits = _deidentify(ds)
    assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "person name")]
    ds = _source(name="Doe^J")  # a 1-letter Latin initial is not searched: it would be found everywhere
    ds.AcquisitionProtocolName = "J series"
    assert _deidentify(ds)[1] == []


def test_an_id_glued_to_other_text_is_found_and_redacted():
    """A whole-word search missed a PatientID "998877" written "MRN998877" in kept text."""
    ds = _source(patient_id="998877")
    ds.AcquisitionProtocolName = "MRN998877 head"  # kept as it is
    _, hits = _deidentify(ds)
    assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "PatientID")]
    ds = _source(patient_id="998877")
    record = Dataset()
    record.ReferencedFileID = ["DICOM", "P998877", "IM0001"]  # a code: compared whole, and IDs inside
    ds.DirectoryRecordSequence = [record]
    _, hits = _deidentify(ds)
    assert [(h.path, h.kind) for h in hits] == [("DirectoryRecordSequence[0].ReferencedFileID", "PatientID")]
    ds = _source(patient_id="998877")
    ds.StudyDescription = "CT MRN998877/2"
    out, _ = _deidentify(ds, clean_descriptors=True)
    assert out.StudyDescription == "CT MRN[REDACTED]/2"
    ds = _source(patient_id="P1234")  # 5 characters with a digit, the shortest searched inside words
    ds.AcquisitionProtocolName = "XP1234"
    assert [h.kind for h in _deidentify(ds)[1]] == ["PatientID"]
    ds = _source(patient_id="1234")  # shorter: only as a word, or it would be found in every number
    ds.AcquisitionProtocolName = "head 51234"
    assert _deidentify(ds)[1] == []


def test_an_unknown_public_element_is_removed():
    """(0010,9998) is in neither Table E.1-1 nor pydicom's dictionary: read as UN bytes, it was kept
    (not listed: K) and never scanned (binary)."""
    ds = _source()
    ds.add_new(0x00109998, "UN", b"Doe^John MRN998877 ")
    ds.add_new(0x00431234, "LO", "Doe^John")  # a private group stays the safe list's business
    out, hits = _deidentify(pydicom.dcmread(io.BytesIO(_bytes(ds))))
    assert 0x00109998 not in out and 0x00431234 not in out and hits == []
    ds = _source()
    ds.add_new(0x0040B034, "UN", b"Doe^John")  # in the 2026c table (X), not yet in pydicom's dictionary
    ds.add_new(0x00181000, "UN", b"SN4711")  # known to pydicom (DeviceSerialNumber): by the table
    out, _ = _deidentify(pydicom.dcmread(io.BytesIO(_bytes(ds))), retain_device_identity=True)
    assert 0x0040B034 not in out and out.DeviceSerialNumber == "SN4711"


def _with_private(value_vr: str, value, transfer_syntax=ImplicitVRLittleEndian) -> Dataset:
    """The source with ACME 1.0's element 10 (creator unknown to pydicom), as read back from its file."""
    ds = _source()
    ds.file_meta.TransferSyntaxUID = transfer_syntax  # implicit VR: an unknown private element is read as UN
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091010, value_vr, value)
    return pydicom.dcmread(io.BytesIO(_bytes(ds)))


def _sequence_item() -> Dataset:
    inner = Dataset()
    inner.PatientName, inner.PatientID, inner.OperatorsName = "Doe^John", "MRN998877", "Other^Person"
    inner.AcquisitionDate = "20240115"
    return inner


SAFE = frozenset({("ACME 1.0", 0x10)})


def test_a_safe_listed_private_sequence_read_as_un_is_de_identified(tmp_path):
    """Read with implicit VR and a creator pydicom does not know, a private sequence is UN bytes: it
    was copied byte for byte, neither de-identified nor scanned."""
    source = _with_private("SQ", [_sequence_item()])
    assert source[0x00091010].VR == "UN"
    out, hits = _deidentify(source, retain_safe_private=SAFE)
    assert hits == []
    (item,) = out[0x00091010].value
    assert not item.PatientName and item.PatientID != "MRN998877" and item.OperatorsName != "Other^Person"
    assert item.AcquisitionDate == out.StudyDate != "20240115"  # shifted as the object's own
    data = _bytes(out)
    for value in (b"Doe^John", b"MRN998877", b"Other^Person", b"20240115"):
        assert value not in data
    report, [exported] = _export_zip(tmp_path, _with_private("SQ", [_sequence_item()]), retain_safe_private=SAFE)
    assert report["status"] == "complete" and report["safe_private_elements_removed_unreadable"] == 0
    assert 0x00091010 in exported


def test_a_safe_listed_un_value_that_does_not_read_as_listed_is_removed_and_counted(tmp_path):
    item = b"\xfe\xff\x00\xe0" + (400).to_bytes(4, "little") + b"\x10\x00\x10\x00" + b"Doe^John"  # cut short
    report, [out] = _export_zip(tmp_path, _with_private("UN", item), retain_safe_private=SAFE)
    assert 0x00091010 not in out and 0x00090010 not in out
    assert report["safe_private_elements_removed_unreadable"] == 1 and report["status"] == "complete"
    # the list says a sequence, the bytes are text
    vrs = frozenset({("ACME 1.0", 0x10, "SQ")})
    result = Deidentifier(KEYS, ProfileOptions(retain_safe_private=SAFE, safe_private_vrs=vrs)).deidentify(
        _with_private("UN", b"Doe^John")
    )
    assert 0x00091010 not in result.dataset and result.unreadable_private == 1


def test_the_scan_searches_binary_values():
    """UN, OB and other binary values were skipped by the scan. A safe-listed UN value that is no
    sequence and that the list keeps as bytes (VR UN or OB given) is searched for the identifiers."""
    as_bytes = {"retain_safe_private": SAFE, "safe_private_vrs": frozenset({("ACME 1.0", 0x10, "UN")})}
    out, hits = _deidentify(_with_private("UN", b"Doe^John MRN998877 "), **as_bytes)
    assert out[0x00091010].VR == "UN" and [(h.path, h.kind) for h in hits] == [("(0009,1010)", "person name")]
    _, hits = _deidentify(_with_private("UN", b"\x00\x01note 20240115\x00"), **as_bytes)
    assert [h.kind for h in hits] == ["date"]
    _, hits = _deidentify(_with_private("UN", b"\x00\x01\x02\x03 head"), **as_bytes)
    assert hits == []
    ds = _source()
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091010, "OB", b"\x07\x00scanned for mrn998877\x00")  # explicit VR: OB
    assert [h.kind for h in _deidentify(ds, retain_safe_private=SAFE)[1]] == ["PatientID"]
    ds = _source()
    ds.PixelData = b"MRN998877 " * 10  # bulk data is not searched
    assert _deidentify(ds)[1] == []


def test_a_safe_list_line_may_give_the_vr(tmp_path):
    listed = tmp_path / "safe.txt"
    listed.write_text("ACME 1.0,10,SQ\nACME 1.0,11\nVENDOR, INC.,12,DA  # a date\n")
    assert load_safe_private(listed) == {("ACME 1.0", 0x10, "SQ"), ("ACME 1.0", 0x11, ""), ("VENDOR, INC.", 0x12, "DA")}


def test_dates_in_safe_listed_private_elements_follow_the_dates_option():
    """A safe-listed private DA/DT went out unshifted whatever --dates said."""
    ds = _source()
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091011, "DA", "20231201")
    ds.add_new(0x00091012, "DT", "20231201083000")
    ds.add_new(0x00091013, "TM", "083000")
    safe = frozenset({("ACME 1.0", 0x11), ("ACME 1.0", 0x12), ("ACME 1.0", 0x13)})
    d = Deidentifier(KEYS, ProfileOptions(retain_safe_private=safe))
    days = KEYS.date_shift_days(d.subjects.subject(ds.StudyInstanceUID, ds.PatientID))
    result = d.deidentify(copy.deepcopy(ds))
    out = result.dataset
    assert out[0x00091011].value == shift_value("20231201", "DA", days) != "20231201"
    assert out[0x00091012].value == shift_value("20231201083000", "DT", days)
    assert out[0x00091013].value == "083000" and scan(out, result.identifiers) == []  # whole-day shifts
    out, hits = _deidentify(copy.deepcopy(ds), retain_safe_private=safe, dates=DateOption.REMOVE)
    assert not {0x00091011, 0x00091012, 0x00091013} & set(out.keys()) and hits == []
    out, hits = _deidentify(copy.deepcopy(ds), retain_safe_private=safe, dates=DateOption.FULL)
    assert out[0x00091011].value == "20231201" and hits == []
    # read as UN from an implicit VR file: the safe list's VR makes it a date, shifted as the others
    source = _with_private("DA", "20231201")
    assert source[0x00091010].VR == "UN"
    vrs = frozenset({("ACME 1.0", 0x10, "DA")})
    out, hits = _deidentify(source, retain_safe_private=SAFE, safe_private_vrs=vrs)
    assert out[0x00091010].VR == "DA" and out[0x00091010].value == shift_value("20231201", "DA", days)
    assert hits == []
    # kept as bytes (VR OB given), the scan finds a date of the object in them
    vrs = frozenset({("ACME 1.0", 0x10, "OB")})
    _, hits = _deidentify(_with_private("DA", "20240115"), retain_safe_private=SAFE, safe_private_vrs=vrs)
    assert [(h.path, h.kind) for h in hits] == [("(0009,1010)", "date")]


def test_the_file_preamble_is_written_zeroed():
    """The source's 128-byte preamble (free for any use: a TIFF header, or text) was copied into the export."""
    raw = _bytes(_source())
    raw = b"DOE^JOHN MRN998877".ljust(128, b"\0") + raw[128:]
    out, _ = _deidentify(pydicom.dcmread(io.BytesIO(raw)))
    assert _bytes(out)[:132] == bytes(128) + b"DICM"


class _Leaky(Deidentifier):
    """A de-identifier with a bug: the patient's name left in the study description."""

    def deidentify(self, ds):
        name = str(ds.PatientName)
        result = super().deidentify(ds)
        result.dataset.StudyDescription = f"study of {name}"
        return result


def test_no_key_file_for_an_export_that_failed_its_scan(tmp_path):
    """The key file (pseudonym -> patient) was written although the zip was never published."""
    archive = tmp_path / "archive"
    ds = _source()
    row = _archived(archive, ds)
    for name in ("out.zip", "out"):
        key = tmp_path / f"key-{name}.csv"
        summary = export_instances(
            [row], archive, tmp_path / name, deidentifier=_Leaky(KEYS, ProfileOptions()), key_file=key
        )
        assert summary.failed and not key.exists(), name
    key = tmp_path / "key.csv"
    export_instances([row], archive, tmp_path / "good.zip", deidentifier=Deidentifier(KEYS), key_file=key)
    assert key.exists() and (tmp_path / "good.zip").exists()


def test_redaction_keeps_a_value_within_its_vr_length():
    """A redacted value could outgrow its VR (LO: 64 characters) and make the object invalid."""
    ds = _source(name="Li^Wu")
    ds.StudyDescription = " ".join(["Li Wu"] * 10)  # 59 characters, each name part becoming [REDACTED]
    out, hits = _deidentify(ds, clean_descriptors=True)
    assert len(out.StudyDescription) == 64 and out.StudyDescription.startswith("[REDACTED] [REDACTED] ")
    assert hits == []


def test_the_console_summary_names_objects_by_their_pseudonymous_uids(tmp_path):
    """ExportSummary.lines() printed the original SOP Instance UIDs of refused and missing objects."""
    archive = tmp_path / "archive"
    bad = _source()
    bad.ContentDate = "20190510%"  # refused: a date no program can read
    rows = []
    for ds in (bad, make_instance("1.2.3.4", "1.2.3.4.5", 2, patient_id="MRN998877", study_date="20240115")):
        rows.append(
            {
                "study_instance_uid": ds.StudyInstanceUID,
                "series_instance_uid": ds.SeriesInstanceUID,
                "sop_instance_uid": ds.SOPInstanceUID,
                "patient_id": ds.PatientID,
            }
        )
    path = archive / bad.StudyInstanceUID / bad.SeriesInstanceUID / f"{bad.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(_bytes(bad))  # the second is indexed but not in the archive
    summary = export_instances(rows, archive, tmp_path / "out.zip", deidentifier=Deidentifier(KEYS))
    text = "\n".join(summary.lines())
    for row in rows:
        assert row["sop_instance_uid"] not in text and KEYS.uid(row["sop_instance_uid"]) in text
    assert rows[0]["sop_instance_uid"] in "\n".join(summary.lines(original_uids=True))
    plain = export_instances(rows, archive, tmp_path / "plain")  # no de-identification: the archive's own UIDs
    assert rows[1]["sop_instance_uid"] in "\n".join(plain.lines())


def test_zip_members_carry_a_fixed_date(tmp_path):
    """Zip members were stamped with the time of the export."""
    _export_zip(tmp_path, _source())
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def test_a_code_sequence_the_profile_replaces_gets_dummy_codes_and_excuses_nothing():
    """InstitutionCodeSequence (X/Z/D: D) kept its codes, "Mercy General" included, and that kept code
    meaning excused the InstitutionName in a kept protocol name; a code only in a sequence that is
    never exported excused it as well; a staff ID went out in PersonIdentificationCodeSequence (D)."""
    ds = _source()
    ds.InstitutionName = "Mercy General"
    ds.InstitutionCodeSequence = [_code("MG01", "99MERCY", "Mercy General")]
    ds.AcquisitionProtocolName = "Mercy General head"  # kept as it is
    out, hits = _deidentify(ds)
    (code,) = out.InstitutionCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "ANONYMIZED",
        "99ANONYMIZED",
        "ANONYMIZED",
    )
    assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "InstitutionName")]
    # a code meaning in a removed sequence, in an emptied one, in a private one the safe list does not keep
    for where in ("ReferringPhysicianIdentificationSequence", "ReferencedStudySequence", "private"):
        ds = _source()
        ds.InstitutionName = "Mercy General"
        ds.AcquisitionProtocolName = "Mercy General head"
        item = Dataset()
        item.InstitutionCodeSequence = [_code("MG01", "99MERCY", "Mercy General")]
        item.ConceptNameCodeSequence = [_code("MG02", "99MERCY", "Mercy General")]  # kept where it is exported
        if where == "private":
            ds.add_new(0x00090010, "LO", "ACME 1.0")
            ds.add_new(0x00091020, "SQ", [item])
        else:
            setattr(ds, where, [item])
        _, hits = _deidentify(ds, retain_safe_private=SAFE)
        assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "InstitutionName")], where
    # a staff ID and name in the operator's identification codes
    ds = _source()
    operator = Dataset()
    operator.PersonName = "Roe^Jane"
    operator.PersonIdentificationCodeSequence = [_code("EMP4711", "99MERCY", "Jane Roe")]
    ds.OperatorIdentificationSequence = [operator]
    ds.AcquisitionProtocolName = "head EMP4711"
    out, hits = _deidentify(ds)
    (code,) = out.OperatorIdentificationSequence[0].PersonIdentificationCodeSequence
    assert (code.CodeValue, code.CodeMeaning) == ("ANONYMIZED", "ANONYMIZED")
    assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "PersonIdentificationCodeSequence")]


def test_underscores_and_digits_separate_name_parts():
    """Words were told apart by \\w, which holds "_" and digits: "Li" in "CT_Li_Wei" was neither redacted
    nor found, nor "SMITH" in "SMITH_JOHNATHAN". A name part is now a word between any non-letters."""
    ds = _source(name="Li^Wei")
    ds.StudyDescription = "CT_Li_Wei chest"
    ds.AcquisitionProtocolName = "head Li_2"  # kept as it is
    out, hits = _deidentify(ds, clean_descriptors=True)
    assert out.StudyDescription == "CT_[REDACTED]_[REDACTED] chest"
    assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "person name")]
    for kept in ("SMITH_JOHNATHAN head", "head2SMITH", "Johnathan_1"):
        ds = _source(name="Smith^Johnathan")
        ds.AcquisitionProtocolName = kept
        assert [(h.path, h.kind) for h in _deidentify(ds)[1]] == [("AcquisitionProtocolName", "person name")], kept
    ds = _source(name="Li^Wu")
    ds.StudyDescription = "Clinical CT_2 Wuhan"  # letters still glue: no name part here
    out, hits = _deidentify(ds, clean_descriptors=True)
    assert out.StudyDescription == "Clinical CT_2 Wuhan" and hits == []
    ds = _source(patient_id="1234")  # a number is still a whole number: "1234" is not in "51234"
    ds.AcquisitionProtocolName = "head 51234 ID_1234"
    assert [h.kind for h in _deidentify(ds)[1]] == ["PatientID"]


def test_a_safe_listed_un_value_without_its_vr_is_removed_and_dates_are_found_inside_bytes():
    """A safe-listed private value read as UN, no sequence, with no VR on its safe-list line, went out
    as its bytes: a date-time "20240115093512" unshifted, and the byte scan looked for the study date
    20240115 only as a whole word. Bytes whose VR nobody gave cannot be de-identified: removed and
    counted; a VR given keeps it (OB: as bytes, searched), and a date is found anywhere in bytes."""
    result = Deidentifier(KEYS, ProfileOptions(retain_safe_private=SAFE)).deidentify(
        _with_private("DT", "20240115093512")
    )
    assert 0x00091010 not in result.dataset and 0x00090010 not in result.dataset
    assert result.unreadable_private == 1 and scan(result.dataset, result.identifiers) == []
    vrs = frozenset({("ACME 1.0", 0x10, "OB")})
    out, hits = _deidentify(_with_private("DT", "20240115093512"), retain_safe_private=SAFE, safe_private_vrs=vrs)
    assert out[0x00091010].value == b"20240115093512" and [(h.path, h.kind) for h in hits] == [("(0009,1010)", "date")]


def test_colour_tables_are_bulk_and_short_terms_are_not_searched_in_bytes():
    """The byte scan failed exports by chance: a 2-letter name part ("Li") or a 2-byte GB18030
    character matched bytes of a kept palette colour table or ICC profile. Those tables are bulk data
    now (not searched), and a term under 3 bytes is not searched in any binary value."""
    ds = _source(name="Li^Wu")
    table = b"\x00\x01LI\x00WU\x02MRN998877\x03" * 64
    for keyword in ("RedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData", "ICCProfile"):
        setattr(ds, keyword, table)
    out, hits = _deidentify(ds)
    assert out.ICCProfile == table and hits == []
    ds = _source(name="李^小龙")
    ds.SpecificCharacterSet = "GB18030"
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091010, "OB", b"\x07" + "李".encode("gb18030") + b"\x00Li\x00")  # 2 bytes each
    assert _deidentify(copy.deepcopy(ds), retain_safe_private=SAFE)[1] == []
    ds[0x00091010].value = b"\x07" + "小龙".encode("gb18030") + b"\x00"  # 4 bytes: found
    assert [h.kind for h in _deidentify(ds, retain_safe_private=SAFE)[1]] == ["person name"]


def _blob_hits(name: str, charset: str, blob: bytes, **options) -> list[str]:
    ds = _source(name=name)
    ds.SpecificCharacterSet = charset
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091010, "OB", blob)
    return [h.kind for h in _deidentify(ds, retain_safe_private=SAFE, **options)[1]]


def test_bytes_are_searched_in_the_original_case_and_in_latin_1_and_utf_16():
    """The byte scan built its terms from the upper-cased value ("STRAUSS": "Strauß" never found), in
    UTF-8 and the object's character sets only (a Latin-1 blob in a UTF-8 object, a UTF-16 blob went
    unnoticed); and "Strauß" stayed in cleaned text (upper-cased to "STRAUSS", which it is not)."""
    assert _blob_hits("Strauß^Anna", "ISO_IR 100", b"\x00pat Strau\xdf\x00") == ["person name"]
    assert _blob_hits("Strauß^Anna", "ISO_IR 192", "\x00STRAUß".encode()) == ["person name"]
    assert _blob_hits("Müller^Anna", "ISO_IR 192", b"\x00pat M\xfcller\x00") == ["person name"]
    assert _blob_hits("Smith^Anna", "ISO_IR 100", "pat SMITH, 12".encode("utf-16-le")) == ["person name"]
    assert _blob_hits("Li^Wu", "ISO_IR 100", "Dr Li".encode("utf-16-le")) == ["person name"]
    assert _blob_hits("Li^Wu", "ISO_IR 100", "Clinic, Wuhan".encode("utf-16-le")) == []
    ds = _source(name="Strauß^Anna")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDescription = "CT Strauß, Anna"
    out, hits = _deidentify(ds, clean_descriptors=True)
    assert out.StudyDescription == "CT [REDACTED], [REDACTED]" and hits == []


def test_the_birth_date_is_searched_under_full_dates():
    """With --dates full the birth date was not collected at all (dates are kept), although the profile
    still empties PatientBirthDate: a safe-listed private copy of it, or "DOB 19650312" in kept text,
    went out with no hit."""
    ds = _source()
    ds.PatientBirthDate = "19650312"
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091011, "DA", "19650312")  # the vendor's copy of it
    ds.AcquisitionProtocolName = "DOB 19650312"  # kept as it is
    out, hits = _deidentify(ds, retain_safe_private=frozenset({("ACME 1.0", 0x11)}), dates=DateOption.FULL)
    assert not out.PatientBirthDate and out.StudyDate == "20240115"
    assert [(h.path, h.kind) for h in hits] == [("(0009,1011)", "date"), ("AcquisitionProtocolName", "date")]
    ds = _source()  # a newborn imaged on the day of its birth: the kept study date is no copy of it
    ds.PatientBirthDate = "20240115"
    out, hits = _deidentify(ds, dates=DateOption.FULL)
    assert not out.PatientBirthDate and out.StudyDate == "20240115" and hits == []
