"""Every attribute against its Table E.1-1 action code, for each option set, over generated SR, RT,
enhanced multi-frame and CT objects full of identifying values and over pydicom's test files; the
residual scan finds nothing in the results and does find a planted identifier."""

from __future__ import annotations

import copy
import io
import warnings

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_files

from diana.access.dateshift import shift_value
from diana.access.deid import Deidentifier, Refused
from diana.access.deid_options import DateOption, ProfileOptions, method_codes
from diana.access.deid_table import EDITION, TABLE_SOURCE, basic_profile
from diana.access.pseudonyms import ProjectKeys
from diana.access.residual import collect, scan
from tests.support.deidcheck import check_actions
from tests.support.deidgen import PATIENT_ID, PATIENT_NAME, SR_TEXT, identifying_object

SECRET = b"unit-test-site-secret-32-bytes!!"
TABLE = basic_profile()
ALL_RETAIN = ProfileOptions(
    dates=DateOption.FULL,
    retain_patient_characteristics=True,
    retain_device_identity=True,
    retain_uids=True,
    retain_institution_identity=True,
)
ALL_CLEAN = ProfileOptions(clean_descriptors=True, clean_structured_content=True, clean_graphics=True)
OPTION_SETS = {
    "basic": ProfileOptions(dates=DateOption.REMOVE),
    "modified-dates": ProfileOptions(),
    "all-retain": ALL_RETAIN,
    "all-clean": ALL_CLEAN,
    "retain-and-clean": ProfileOptions(
        dates=DateOption.MODIFIED,
        retain_patient_characteristics=True,
        clean_descriptors=True,
        clean_structured_content=True,
    ),
}


def _deidentifier(options: ProfileOptions, project: str = "lung-study", **kw) -> Deidentifier:
    return Deidentifier(ProjectKeys(SECRET, project), options, **kw)


@pytest.mark.parametrize("options_name", sorted(OPTION_SETS))
@pytest.mark.parametrize("kind", ["sr", "rtplan", "enhanced_ct", "ct"])
def test_every_table_attribute_gets_its_action(kind, options_name):
    options = OPTION_SETS[options_name]
    d = _deidentifier(options)
    source = identifying_object(kind)
    result = d.deidentify(copy.deepcopy(source))
    out = result.dataset
    subject = d.subjects.subject(source.StudyInstanceUID, PATIENT_ID)
    checked = check_actions(source, out, d, d.keys.date_shift_days(subject))
    assert checked > 400  # every table row pydicom's dictionary knows
    assert scan(out, result.identifiers) == []
    assert out.PatientName == d.keys.patient_name(subject) and out.PatientID == d.keys.patient_id(subject)
    assert out.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == [c.CodeValue for c in method_codes(options)]
    assert f"Table E.1-1 of DICOM {EDITION}" in out.DeidentificationMethod
    text = out.to_json()
    for value in (PATIENT_NAME, "John", PATIENT_ID, "Smith0", "Nested0"):
        assert value.upper() not in text.upper()
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)  # still a writable Part 10 object
    assert pydicom.dcmread(io.BytesIO(buf.getvalue())).SOPInstanceUID == out.SOPInstanceUID


def _testdata():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in get_testdata_files():
            try:
                yield path, pydicom.dcmread(path)
            except Exception:  # the collection holds non-DICOM and deliberately broken files
                continue


@pytest.mark.parametrize("options_name", ["basic", "modified-dates", "all-clean", "all-retain"])
def test_pydicom_test_files(options_name):
    """Over pydicom's own test files: never a crash; every object de-identified or refused with a reason;
    each attribute checked against its action; the scan finds nothing."""
    d = _deidentifier(OPTION_SETS[options_name], allow_risky=True)
    done = refused = checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _path, source in _testdata():
            try:
                result = d.deidentify(copy.deepcopy(source))
            except Refused as exc:
                assert str(exc)
                refused += 1
                continue
            subject = d.subjects.subject(str(source.StudyInstanceUID).strip(), str(source.get("PatientID", "")))
            checked += check_actions(source, result.dataset, d, d.keys.date_shift_days(subject))
            # examples_palette.dcm: an ultrasound whose PatientName is its preset "OB^^^^", kept in its
            # ProcessingFunction "OB_GENERAL" ("_" separates words): a 2-letter name part found as a
            # word of kept text fails the export rather than be guessed innocent (docs/COHORT.md)
            expected = [("ProcessingFunction", "person name")] if _path.endswith("examples_palette.dcm") else []
            assert [(h.path, h.kind) for h in scan(result.dataset, result.identifiers)] == expected, _path
            result.dataset.save_as(io.BytesIO(), enforce_file_format=True)
            done += 1
    assert done > 100 and checked > 3000
    assert refused < 25  # the ones without a Study or SOP Instance UID


def test_scan_finds_a_planted_identifier():
    d = _deidentifier(ProfileOptions())
    source = identifying_object("sr")
    result = d.deidentify(copy.deepcopy(source))
    assert scan(result.dataset, result.identifiers) == []
    planted = copy.deepcopy(result.dataset)
    planted.ContentSequence[-1].ContentSequence[0].TextValue = f"note: {PATIENT_ID}"
    hits = scan(planted, result.identifiers)
    assert [h.path for h in hits] == ["ContentSequence[5].ContentSequence[0].TextValue"]
    assert PATIENT_ID not in str(hits[0])  # the hit names the place and kind, never the value
    planted = copy.deepcopy(result.dataset)
    planted.StudyDate = source.StudyDate  # a date left unshifted
    planted.ReferencedImageSequence[0].ReferencedSOPInstanceUID = source.ReferencedImageSequence[
        0
    ].ReferencedSOPInstanceUID
    assert {h.path for h in scan(planted, result.identifiers)} == {
        "StudyDate",
        "ReferencedImageSequence[0].ReferencedSOPInstanceUID",
    }


def test_scan_finds_what_the_table_does_not_list():
    """Annex E keeps attributes it does not list (a beam's name): the scan still finds a name in one."""
    d = _deidentifier(ProfileOptions())
    source = identifying_object("rtplan")
    source.BeamSequence[0].BeamName = "Beam for Doe"
    result = d.deidentify(source)
    assert [(h.path, h.kind) for h in scan(result.dataset, result.identifiers)] == [
        ("BeamSequence[0].BeamName", "person name")
    ]


def test_an_id_in_kept_text_is_found_there_and_still_redacted_elsewhere():
    """A Patient ID inside text the profile keeps (a segment's description, which Table E.1-1 does not
    list) is a leak the scan reports; before, its presence there excused it, and with it cleaned
    descriptions stopped losing it."""
    source = identifying_object("ct")
    segment = Dataset()
    segment.SegmentDescription = f"liver contour for {PATIENT_ID}"
    source.SegmentSequence = [segment]
    source.StudyDescription = f"CT abdomen {PATIENT_ID}"
    result = _deidentifier(ProfileOptions(clean_descriptors=True)).deidentify(source)
    assert PATIENT_ID not in result.dataset.StudyDescription
    assert [(h.path, h.kind) for h in scan(result.dataset, result.identifiers)] == [
        ("SegmentSequence[0].SegmentDescription", "PatientID")
    ]


def test_a_name_part_that_is_the_manufacturers_is_no_hit_there_but_redacted_in_cleaned_text():
    source = identifying_object("ct")
    source.PatientName = "Philips^Anna"
    source.Manufacturer = "Philips"
    source.StudyDescription = "MR knee, Anna Philips"
    result = _deidentifier(ProfileOptions(clean_descriptors=True)).deidentify(source)
    assert result.dataset.Manufacturer == "Philips" and scan(result.dataset, result.identifiers) == []
    assert result.dataset.StudyDescription == "MR knee, [REDACTED] [REDACTED]"


@pytest.mark.parametrize("options_name", sorted(OPTION_SETS))
def test_the_referring_physicians_name_is_emptied_under_every_option(options_name):
    """(0008,0090) is Z in Table E.1-1: present (Type 2 in the General Study module), empty. No option
    retains it; the index now matches it, and an export must not carry it."""
    assert TABLE.code(0x00080090) == "Z"
    source = identifying_object("ct")
    source.ReferringPhysicianName = "Referrer^Harriet"
    source.StudyDescription = "CT chest for Dr Harriet Referrer"
    result = _deidentifier(OPTION_SETS[options_name]).deidentify(source)
    out = result.dataset
    assert "ReferringPhysicianName" in out and not out.ReferringPhysicianName
    assert "REFERRER" not in out.to_json().upper() and "HARRIET" not in out.to_json().upper()
    assert scan(out, result.identifiers) == []


def test_a_table_row_pydicom_does_not_know_is_applied_by_tag():
    ds = identifying_object("ct")
    ds.add_new(0x0040B034, "UN", PATIENT_NAME.encode())  # in the 2026c table (X), newer than pydicom's dictionary
    out = _deidentifier(ProfileOptions()).deidentify(ds).dataset
    assert 0x0040B034 not in out


def test_table_is_the_standards_and_its_source_is_recorded():
    assert len(TABLE) > 600 and EDITION in TABLE_SOURCE and "dicom-anonymizer" in TABLE_SOURCE
    codes = {
        TABLE.code(pydicom.tag.Tag(k)) for k in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber")
    }
    assert codes == {"Z", "Z/D", "U"}
    assert TABLE.code(0x60003000) == "X" and TABLE.code(0x60023000) == "X"  # overlay data, any group 60xx
    assert TABLE.code(pydicom.tag.Tag("Modality")) is None  # not in the table: kept


# --- one test per option --------------------------------------------------------------------------
def _run(options: ProfileOptions, kind: str = "ct", **kw):
    d = _deidentifier(options, **kw)
    source = identifying_object(kind)
    return d, source, d.deidentify(copy.deepcopy(source)).dataset


def test_retain_uids():
    _, source, out = _run(ProfileOptions(retain_uids=True))
    assert out.SOPInstanceUID == source.SOPInstanceUID and out.StudyInstanceUID == source.StudyInstanceUID
    _, source, out = _run(ProfileOptions())
    assert out.SOPInstanceUID != source.SOPInstanceUID and out.SOPInstanceUID.startswith("2.25.")
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


def test_retain_device_identity():
    _, source, out = _run(ProfileOptions(retain_device_identity=True), "rtplan")
    assert out.DeviceSerialNumber == source.DeviceSerialNumber and out.StationName == source.StationName
    assert out.BeamSequence[0].TreatmentMachineName == "LINAC-7"
    _, source, out = _run(ProfileOptions(), "rtplan")
    assert out.DeviceSerialNumber != source.DeviceSerialNumber and out.BeamSequence[0].TreatmentMachineName != "LINAC-7"


def test_retain_institution_identity():
    _, source, out = _run(ProfileOptions(retain_institution_identity=True))
    assert out.InstitutionName == source.InstitutionName and out.InstitutionAddress == source.InstitutionAddress
    _, source, out = _run(ProfileOptions())
    assert out.get("InstitutionName") != source.InstitutionName and "InstitutionAddress" not in out


def _with_subject_age(ds: Dataset, value: str, unit: str) -> Dataset:
    age = Dataset()
    age.RelationshipType, age.ValueType = "CONTAINS", "NUM"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121033", "DCM", "Subject Age"
    age.ConceptNameCodeSequence = [concept]
    measured, units = Dataset(), Dataset()
    units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning = unit, "UCUM", unit
    measured.MeasurementUnitsCodeSequence = [units]
    measured.NumericValue = value
    age.MeasuredValueSequence = [measured]
    ds.ContentSequence.append(age)
    return ds


def _subject_ages(ds: Dataset) -> list[tuple[str, str]]:
    return [
        (
            str(i.MeasuredValueSequence[0].NumericValue),
            i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
        )
        for i in ds.ContentSequence
        if i.ValueType == "NUM"
    ]


def test_retain_patient_characteristics_and_ages_over_89():
    """Ages over 89 are written 90 (HIPAA Safe Harbor) unless patient characteristics are retained."""
    _, source, out = _run(ProfileOptions(retain_patient_characteristics=True))
    assert (out.PatientSex, out.PatientWeight, out.PatientAge) == ("F", source.PatientWeight, "094Y")
    _, _, out = _run(ProfileOptions())
    assert "PatientAge" not in out and "PatientWeight" not in out and not out.get("PatientSex")
    for options, expected in (
        (ProfileOptions(), [("90", "a"), ("45", "a"), ("90", "a"), ("12", "mo")]),
        (ProfileOptions(retain_patient_characteristics=True), [("94", "a"), ("45", "a"), ("1100", "mo"), ("12", "mo")]),
    ):
        sr = identifying_object("sr")
        for value, unit in (("94", "a"), ("45", "a"), ("1100", "mo"), ("12", "mo")):
            _with_subject_age(sr, value, unit)
        out = _deidentifier(options).deidentify(sr).dataset
        assert _subject_ages(out) == expected


def test_dates_full_modified_removed():
    _, source, out = _run(ProfileOptions(dates=DateOption.FULL))
    assert out.StudyDate == source.StudyDate and out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    d, source, out = _run(ProfileOptions(dates=DateOption.MODIFIED), "enhanced_ct")
    days = d.keys.date_shift_days(d.subjects.subject(source.StudyInstanceUID, PATIENT_ID))
    assert out.StudyDate == shift_value("20190510", "DA", days) != "20190510"
    assert out.StudyTime == source.StudyTime and out.LongitudinalTemporalInformationModified == "MODIFIED"
    frame = out.PerFrameFunctionalGroupsSequence[1].FrameContentSequence[0]
    assert frame.FrameAcquisitionDateTime == shift_value("20190510101111.5+0100", "DT", days)
    _, _, out = _run(ProfileOptions(dates=DateOption.REMOVE))
    assert not out.StudyDate and out.LongitudinalTemporalInformationModified == "REMOVED"


def test_clean_descriptors():
    _, source, out = _run(ProfileOptions(clean_descriptors=True))
    assert out.StudyDescription.startswith("Ident LO") and PATIENT_ID not in out.StudyDescription
    assert "[REDACTED]" in out.StudyDescription
    _, _, out = _run(ProfileOptions())
    assert "StudyDescription" not in out


def test_clean_structured_content():
    _, _, out = _run(ProfileOptions(clean_structured_content=True), "sr")
    text = out.ContentSequence[0].TextValue
    assert text == "Patient [REDACTED] [REDACTED], [REDACTED], has a mass in the left lung"
    _, _, out = _run(ProfileOptions(), "sr")
    assert out.ContentSequence[0].TextValue == "ANONYMIZED" and SR_TEXT not in out.to_json()
    assert out.ContentSequence[1].PersonName != PATIENT_NAME


def test_clean_graphics():
    def with_graphics(options):
        d = _deidentifier(options)
        ds = identifying_object("ct")
        text = Dataset()
        text.UnformattedTextValue = f"{PATIENT_NAME} {PATIENT_ID} left"
        annotation = Dataset()
        annotation.TextObjectSequence = [text]
        ds.GraphicAnnotationSequence = [annotation]
        ds.add_new(0x60003000, "OW", b"\x00" * 8)
        ds.add_new(0x60004000, "LT", f"overlay of {PATIENT_ID}")
        return d.deidentify(ds).dataset

    out = with_graphics(ProfileOptions(clean_graphics=True))
    assert out.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue == "[REDACTED] [REDACTED] left"
    assert 0x60004000 not in out and 0x60003000 not in out  # overlays are not graphics: removed (X)
    out = with_graphics(ProfileOptions())
    assert 0x60004000 not in out and 0x60003000 not in out
    assert out.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue == "ANONYMIZED"


def test_retain_safe_private():
    ds = identifying_object("ct")
    block = ds.private_block(0x0019, "SAFE VENDOR", create=True)
    block.add_new(0x10, "DS", "1.5")  # listed safe
    block.add_new(0x11, "LO", PATIENT_NAME)  # not listed
    other = ds.private_block(0x0021, "OTHER VENDOR", create=True)
    other.add_new(0x10, "LO", PATIENT_ID)
    d = _deidentifier(ProfileOptions(retain_safe_private=frozenset({("SAFE VENDOR", 0x10)})))
    out = d.deidentify(copy.deepcopy(ds)).dataset
    kept = out.private_block(0x0019, "SAFE VENDOR")
    assert kept[0x10].value == "1.5" and 0x00191011 not in out and 0x00211010 not in out and 0x00210010 not in out
    out = _deidentifier(ProfileOptions()).deidentify(copy.deepcopy(ds)).dataset
    assert not [e for e in out if e.tag.is_private]
    assert "113111" in [c.CodeValue for c in method_codes(d.options)]


def test_method_codes_list_exactly_what_was_applied():
    assert [c.CodeValue for c in method_codes(ProfileOptions(dates=DateOption.REMOVE))] == ["113100"]
    codes = [c.CodeValue for c in method_codes(ProfileOptions(clean_graphics=True, retain_uids=True))]
    assert codes == ["113100", "113103", "113107", "113110"]
    every = ProfileOptions(
        dates=DateOption.FULL,
        retain_patient_characteristics=True,
        retain_device_identity=True,
        retain_uids=True,
        retain_safe_private=frozenset({("X", 1)}),
        retain_institution_identity=True,
        clean_descriptors=True,
        clean_structured_content=True,
        clean_graphics=True,
    )
    assert sorted(c.CodeValue for c in method_codes(every)) == [
        "113100", "113103", "113104", "113105", "113106", "113108", "113109", "113110", "113111", "113112"
    ]  # fmt: skip


def test_identifiers_of_the_source_are_what_the_profile_removes():
    ids = collect(identifying_object("sr"), TABLE, ProfileOptions(dates=DateOption.FULL))
    assert "DOE" in ids.text and "JOHN" in ids.text and PATIENT_ID in "".join(ids.text)
    assert "20190510" not in ids.whole  # full dates are retained: not identifiers
    ids = collect(identifying_object("sr"), TABLE, ProfileOptions())
    assert "20190510" in ids.whole


def test_what_the_table_does_not_list_but_identifies_by_its_nature():
    """Stricter than Table E.1-1, for attributes it does not list: a UID is replaced as the listed ones
    are (references between exported objects hold), a URL goes unless the institution is retained,
    the patient's dates in another calendar go, and with dates removed an unlisted date goes too."""
    source = identifying_object("ct")
    source.FrameOfReferenceUID = "1.2.3.4.900"
    source.SOPInstanceUIDOfConcatenationSource = source.SOPInstanceUID  # not in the table
    source.TableFrameOfReferenceUID = source.FrameOfReferenceUID  # not in the table
    source.PixelDataProviderURL = "https://pacs.hospital.example/jpip"
    source.PatientBirthDateInAlternativeCalendar = "13590220"
    source.PatientAlternativeCalendar = "I"
    source.ExpiryDate = "20300101"
    source.file_meta.SourcePresentationAddress = "dicom://ct1.hospital.example:104"
    source.file_meta.SendingPresentationAddress = "dicom://pacs.hospital.example:104"
    d = _deidentifier(ProfileOptions(dates=DateOption.REMOVE))
    result = d.deidentify(copy.deepcopy(source))
    out = result.dataset
    assert out.SOPInstanceUIDOfConcatenationSource == out.SOPInstanceUID != source.SOPInstanceUID
    assert out.TableFrameOfReferenceUID == out.FrameOfReferenceUID != source.FrameOfReferenceUID
    assert out.SOPClassUID == source.SOPClassUID  # the standard's UIDs stay
    kinds = copy.deepcopy(source)  # UIDs and URLs that name kinds of things, known to pydicom or not
    kinds.SOPClassUID = kinds.file_meta.MediaStorageSOPClassUID = "1.2.840.113619.4.27"  # a vendor's class
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-A0100", "SRT", "Brain"
    code.CodingSchemeUID = "2.16.840.1.113883.6.96"
    urn = Dataset()
    urn.URNCodeValue, urn.CodingSchemeDesignator, urn.CodeMeaning = "urn:oid:1.2.3", "99X", "x"
    kinds.AnatomicRegionSequence = [code, urn]
    kept = d.deidentify(kinds).dataset
    assert kept.SOPClassUID == kept.file_meta.MediaStorageSOPClassUID == "1.2.840.113619.4.27"
    assert kept.AnatomicRegionSequence[0].CodingSchemeUID == "2.16.840.1.113883.6.96"
    assert kept.AnatomicRegionSequence[1].URNCodeValue == "urn:oid:1.2.3"
    for gone in ("PixelDataProviderURL", "PatientBirthDateInAlternativeCalendar", "PatientAlternativeCalendar"):
        assert gone not in out, gone
    assert "ExpiryDate" not in out and out.LongitudinalTemporalInformationModified == "REMOVED"
    assert "SourcePresentationAddress" not in out.file_meta and "SendingPresentationAddress" not in out.file_meta
    assert scan(out, result.identifiers) == []
    out = _deidentifier(ProfileOptions()).deidentify(copy.deepcopy(source)).dataset
    assert out.ExpiryDate != source.ExpiryDate  # modified dates: shifted as the others
    out = _deidentifier(ALL_RETAIN).deidentify(copy.deepcopy(source)).dataset
    assert out.TableFrameOfReferenceUID == source.FrameOfReferenceUID
    assert out.PixelDataProviderURL == source.PixelDataProviderURL


def test_a_safe_listed_private_sequence_is_kept_and_what_its_items_hold_is_de_identified():
    ds = identifying_object("ct")
    ds.private_block(0x0029, "ACME 1.1", create=True)
    inner = Dataset()
    inner.OperatorsName = PATIENT_NAME
    inner.PatientAddress = "12 Elm Street Springfield"
    inner.SeriesInstanceUID = ds.SeriesInstanceUID
    inner.AcquisitionDate = ds.StudyDate
    ds.add_new(0x00291010, "SQ", [inner])
    study_date = ds.StudyDate
    result = _deidentifier(ProfileOptions(retain_safe_private=frozenset({("ACME 1.1", 0x10)}))).deidentify(ds)
    (item,) = result.dataset[0x00291010].value
    assert "PatientAddress" not in item and item.OperatorsName != PATIENT_NAME
    assert item.SeriesInstanceUID == result.dataset.SeriesInstanceUID  # mapped as the object's own
    assert item.AcquisitionDate == result.dataset.StudyDate != study_date  # shifted as the object's own
    assert scan(result.dataset, result.identifiers) == []


def test_overlays_go_whole_and_an_overlay_in_the_pixel_bits_is_refused():
    ds = identifying_object("ct")
    ds.add_new(0x60000010, "US", 512)  # Overlay Rows
    ds.add_new(0x60000022, "LO", "overlay of the contour")  # Overlay Description
    ds.add_new(0x60001500, "LO", "contour")  # Overlay Label
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    out = _deidentifier(ProfileOptions()).deidentify(copy.deepcopy(ds)).dataset
    assert not [e for e in out if e.tag.group == 0x6000]
    ds.add_new(0x60000102, "US", 12)  # Overlay Bit Position: the plane is in the pixel data's bit 12
    with pytest.raises(Refused, match="unused bits"):
        _deidentifier(ProfileOptions()).deidentify(copy.deepcopy(ds))
    faces = identifying_object("ct")
    faces.RecognizableVisualFeatures = "YES"
    with pytest.raises(Refused, match="RecognizableVisualFeatures"):
        _deidentifier(ProfileOptions()).deidentify(faces)
