"""Objects full of identifying values, for the de-identification tests.

`identifying_object` builds an object of a given SOP class whose every Table E.1-1 attribute that
pydicom's dictionary knows carries a distinct identifying value of its VR (names, IDs, dates,
times, UIDs, free text quoting the patient's name and record number), plus the class's own
structures: an SR content tree with text, names and dates; RT beams and references; enhanced
multi-frame functional groups with frame date-times.
"""

from __future__ import annotations

import re

from pydicom import Dataset
from pydicom.datadict import dictionary_has_tag, dictionary_keyword, dictionary_VR
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from diana.access.deid_table import basic_profile
from tests.support.dicomgen import part10_dataset

__all__ = ["identifying_object", "value_for", "PATIENT_NAME", "PATIENT_ID", "SR_TEXT", "SOP_CLASSES"]

PATIENT_NAME = "Doe^John"
PATIENT_ID = "MRN123456"
SR_TEXT = "Patient John Doe, MRN123456, has a mass in the left lung"
SOP_CLASSES = {
    "sr": "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "rtplan": "1.2.840.10008.5.1.4.1.1.481.5",
    "enhanced_ct": "1.2.840.10008.5.1.4.1.1.2.1",
    "ct": "1.2.840.10008.5.1.4.1.1.2",
}
_SITE = re.compile(
    r"(Institution|Device|Station|Detector|Gantry|Generator|Plate|Cassette|Transducer|Machine|Serial|Lens|Source"
    r"|ClinicalTrial|Location)"
)
_SKIP = {"PatientName", "PatientID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "BurnedInAnnotation"}


def value_for(vr: str, i: int):
    """A distinct identifying value of ``vr`` (``i`` makes it unique in the object)."""
    vr = vr.split(" or ")[0]
    return {
        "PN": f"Smith{i:03d}^Anna",
        "LO": f"Ident LO {i:03d} {PATIENT_ID}",
        "SH": f"SH{i:03d}IDENT",
        "LT": f"{SR_TEXT} ({i})",
        "ST": f"{SR_TEXT} ({i})",
        "UT": f"{SR_TEXT} ({i})",
        "UC": f"Ident UC {i:03d}",
        "CS": f"IDENT{i:03d}",
        "AE": f"AE{i:03d}IDENT",
        "DA": "20190510",
        "TM": "101112.123",
        "DT": "20190510101112.123456+0100",
        "UI": f"1.2.826.0.1.3680043.10.543.{i}",
        "AS": "094Y",
        "DS": "71.5",
        "IS": str(90000 + i),
        "US": 7,
        "UR": f"http://hospital.example/patient/{i}",
        "OB": b"\x01\x02",
        "UN": b"\x01\x02",
    }.get(vr)


def _item(i: int) -> Dataset:
    """A sequence item holding a name, an ID, a date and a UID of its own."""
    item = Dataset()
    item.PersonName = f"Nested{i:03d}^Paul"
    item.PatientID = f"NESTED{i:03d}"
    item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.544.{i}"
    item.ReferencedSOPClassUID = SOP_CLASSES["ct"]
    item.ObservationDateTime = "20190511080910"
    return item


def _fill_table(ds: Dataset) -> None:
    for i, (tag, _code) in enumerate(sorted(basic_profile().tags().items())):
        if Tag(tag).group in (0x0000, 0x0002, 0x0004) or not dictionary_has_tag(tag):
            continue
        keyword = dictionary_keyword(tag)
        if keyword in _SKIP or keyword == "ContentSequence":
            continue
        vr = dictionary_VR(tag).split(" or ")[0]
        if _SITE.search(keyword) and vr in ("LO", "SH", "ST", "LT", "UT"):
            # the site's and the device's identity: what Retain Institution/Device Identity keeps
            ds.add_new(tag, vr, f"SITE{i:03d}")
        elif vr == "SQ":
            ds.add_new(tag, vr, Sequence([_item(i)]))
        else:
            value = value_for(vr, i)
            if value is not None:
                ds.add_new(tag, vr, value)


def _content(value_type: str, meaning: str, **values) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121071", "DCM", meaning
    item.ConceptNameCodeSequence = [code]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _sr(ds: Dataset) -> None:
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContentSequence = [
        _content("TEXT", "Finding", TextValue=SR_TEXT),
        _content("PNAME", "Person Observer Name", PersonName=PATIENT_NAME),
        _content("DATE", "Procedure date", Date="20190510"),
        _content("DATETIME", "Observation", DateTime="20190510101112+0100"),
        _content("UIDREF", "Study UID", UID="1.2.826.0.1.3680043.10.545.1"),
        _content("CONTAINER", "Section", ContinuityOfContent="SEPARATE"),
    ]
    ds.ContentSequence[-1].ContentSequence = [
        _content("TEXT", "Nested finding", TextValue=f"Seen by Dr Who for {PATIENT_ID}")
    ]


def _rtplan(ds: Dataset) -> None:
    ds.Modality = "RTPLAN"
    beam = Dataset()
    beam.BeamNumber = 1
    beam.BeamName = "Beam 1"
    beam.TreatmentMachineName = "LINAC-7"
    beam.DeviceSerialNumber = "SERIAL-77"
    ds.BeamSequence = [beam]
    ds.RTPlanLabel = "Plan Doe"
    ds.RTPlanDate, ds.RTPlanTime = "20190509", "090000"


def _enhanced(ds: Dataset) -> None:
    ds.Modality = "CT"
    ds.NumberOfFrames = 2
    frames = []
    for n in range(2):
        content = Dataset()
        content.FrameAcquisitionDateTime = f"2019051010111{n}.5+0100"
        content.FrameReferenceDateTime = f"2019051010111{n}"
        content.FrameComments = f"frame {n} of {PATIENT_NAME}"
        group = Dataset()
        group.FrameContentSequence = [content]
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = frames
    shared = Dataset()
    shared.FrameAnatomySequence = [Dataset()]
    ds.SharedFunctionalGroupsSequence = [shared]


def identifying_object(kind: str, *, patient_id: str = PATIENT_ID, study_uid: str | None = None) -> Dataset:
    """An object of ``kind`` (sr, rtplan, enhanced_ct, ct) carrying every Table E.1-1 attribute it can."""
    ds = part10_dataset(SOP_CLASSES[kind])
    _fill_table(ds)
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20190510", "101112"
    ds.PatientSex, ds.PatientWeight, ds.PatientAge = "F", "71.5", "094Y"
    ds.Manufacturer = "ACME"
    {"sr": _sr, "rtplan": _rtplan, "enhanced_ct": _enhanced, "ct": lambda d: setattr(d, "Modality", "CT")}[kind](ds)
    return ds
