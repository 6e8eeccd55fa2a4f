"""QIDO-RS query parameters as a C-FIND identifier, so both services share one matching (access/qr).

Parameters are attribute keywords or tags (``PatientName=doe*``, ``00100010=doe*``), plus ``limit``,
``offset``, ``includefield`` (repeatable, comma-separated, or ``all``) and ``fuzzymatching``. Each
value is put into the identifier as its bytes would arrive in a C-FIND, so a value that cannot be a
matching key fails in the same place and is answered 400 naming the parameter.

A comma in the value of an attribute whose VR cannot hold one (UI, CS, dates, times, numbers) makes a
list of values, any of which matches (PS3.18 8.3.4.1; dicomweb-client joins a list with commas, as
OHIF's worklist sends ``ModalitiesInStudy=CT,MR``): it becomes the backslash of a C-FIND value list.
In person names and other text a comma is part of the value (``PatientName=Doe,John`` is one name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from diana.access.qr.identifier import ATTRIBUTES, attribute_name

__all__ = [
    "QidoError",
    "QidoRequest",
    "DEFAULT_KEYS",
    "MAX_OFFSET",
    "LIST_VRS",
    "ignored_keys",
    "within_level",
    "parameter_message",
    "parameter_name",
    "parse_qido",
]


class QidoError(ValueError):
    """A QIDO-RS request that cannot be answered: 400, the message names the parameter."""


# PS3.18 Table 10.6.3-3: the attributes every match returns, per level.
DEFAULT_KEYS = {
    "STUDY": [
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
        "StudyInstanceUID",
    ],
    "IMAGE": [
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    ],
}
_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
_WHOLE_NUMBER = re.compile(r"^[0-9]{1,12}$")  # ASCII digits only: str.isdigit() also takes "²"
# The deepest page a query may ask for (`offset`).
MAX_OFFSET = 100_000
# VRs whose values never hold a comma (PS3.5 6.2): a comma in their parameter separates values of a list.
LIST_VRS = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})


@dataclass
class QidoRequest:
    identifier: Dataset
    limit: int
    offset: int
    include_all: bool = False
    parameters: dict[str, str] = field(default_factory=dict)  # tag -> the parameter name used
    # The limit in effect is the server's maximum ([dicomweb] max_results): none or a larger one was asked.
    capped: bool = False
    # The matching keys as given: tag -> value (the path's UIDs not among them).
    matching: dict[int, str] = field(default_factory=dict)


def _tag(name: str) -> int:
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise QidoError(f"query parameter {name!r} is not a DICOM attribute keyword or tag")
    return int(tag)


def _raw(tag: int, text: str) -> RawDataElement:
    """The element as it would come off the wire (explicit VR little endian, UTF-8)."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "UN"
    data = text.encode("utf-8")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return RawDataElement(Tag(tag), vr, len(data), data, 0, False, True)


def parse_qido(
    params: list[tuple[str, str]],
    level: str,
    path_uids: dict[str, str],
    max_results: int,
) -> QidoRequest:
    """``params`` as (name, value) pairs in request order; ``path_uids`` the UIDs the URL path fixes."""
    limit, offset, include_all, fuzzy, capped = max_results, 0, False, False, True
    includes: list[int] = []
    matching: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, value in params:
        if name in _CONTROL:
            if name in ("limit", "offset"):
                if not _WHOLE_NUMBER.match(value):
                    raise QidoError(f"{name}={value!r}: a whole number is expected")
                if name == "limit":
                    limit = min(int(value), max_results)
                    capped = int(value) > max_results
                else:
                    offset = int(value)
                    if offset > MAX_OFFSET:
                        # Matches before the offset are read and skipped: paging this deep reads the index
                        # that far on every request.
                        raise QidoError(
                            f"offset={value}: at most {MAX_OFFSET}; narrow the query (e.g. by StudyDate) instead"
                        )
            elif name == "fuzzymatching":
                if value not in ("true", "false"):
                    raise QidoError(f"fuzzymatching={value!r}: use true or false")
                fuzzy = value == "true"
            else:
                for item in filter(None, (v.strip() for v in value.split(","))):
                    if item == "all":
                        include_all = True
                    else:
                        try:
                            includes.append(_tag(item))
                        except QidoError:
                            raise QidoError(f"includefield={item!r} is not a DICOM attribute keyword or tag") from None
                        names.setdefault(f"{includes[-1]:08X}", item)
            continue
        tag = _tag(name)
        if tag in matching:
            raise QidoError(f"query parameter {name!r} is given twice")
        names[f"{tag:08X}"] = name  # a matching key's own name, before an includefield's
        matching[tag] = value.replace(",", "\\") if _vr(tag) in LIST_VRS else value
    given = dict(matching)
    if fuzzy:
        # Fuzzy matching of names (PS3.18 8.3.4.6): each given name component matches a prefix, any case.
        for tag, value in matching.items():
            if _vr(tag) == "PN" and value and "*" not in value and "?" not in value:
                matching[tag] = value + "*"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # the values are UTF-8, as URLs carry them
    ds.QueryRetrieveLevel = level
    for keyword in DEFAULT_KEYS[level]:
        ds[_tag(keyword)] = _raw(_tag(keyword), "")
    for tag in includes:
        ds[tag] = _raw(tag, "")
    for keyword, uid in path_uids.items():
        matching[_tag(keyword)] = uid
    for tag, value in matching.items():
        ds[tag] = _raw(tag, value)
    return QidoRequest(ds, limit, offset, include_all, names, capped, given)


# includefield=all answers, of each match's stored header, the attributes of the query's level and the
# levels above (an instance's whole header only at the instance level). PS3.3's modules, per level:
# Patient (group 0010 whole, with Patient Study's), General Study, General Series, General Equipment,
# Frame of Reference; an attribute of none of them is an instance's.
_STUDY_KEYWORDS = """StudyInstanceUID StudyDate StudyTime ReferringPhysicianName ReferringPhysicianIdentificationSequence
ConsultingPhysicianName ConsultingPhysicianIdentificationSequence StudyID AccessionNumber IssuerOfAccessionNumberSequence
StudyDescription PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence NameOfPhysiciansReadingStudy
PhysiciansReadingStudyIdentificationSequence RequestingService RequestingServiceCodeSequence ReferencedStudySequence
ProcedureCodeSequence ReasonForPerformedProcedureCodeSequence AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence
AdmissionID IssuerOfAdmissionIDSequence ServiceEpisodeID ServiceEpisodeDescription IssuerOfServiceEpisodeIDSequence
ModalitiesInStudy SOPClassesInStudy NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances
SpecificCharacterSet TimezoneOffsetFromUTC RetrieveAETitle InstanceAvailability"""
_SERIES_KEYWORDS = """Modality SeriesInstanceUID SeriesNumber Laterality SeriesDate SeriesTime PerformingPhysicianName
PerformingPhysicianIdentificationSequence ProtocolName SeriesDescription SeriesDescriptionCodeSequence OperatorsName
OperatorIdentificationSequence ReferencedPerformedProcedureStepSequence RelatedSeriesSequence BodyPartExamined
PatientPosition SmallestPixelValueInSeries LargestPixelValueInSeries RequestAttributesSequence PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformedProcedureStepEndDate
PerformedProcedureStepEndTime PerformedProcedureStepDescription PerformedProtocolCodeSequence
CommentsOnThePerformedProcedureStep AnatomicalOrientationType PerformedStationAETitle Manufacturer InstitutionName
InstitutionAddress StationName InstitutionalDepartmentName ManufacturerModelName DeviceSerialNumber SoftwareVersions
SpatialResolution DateOfLastCalibration TimeOfLastCalibration FrameOfReferenceUID PositionReferenceIndicator
NumberOfSeriesRelatedInstances"""
_STUDY_TAGS = frozenset(int(tag_for_keyword(k)) for k in _STUDY_KEYWORDS.split())  # type: ignore[arg-type]
_SERIES_TAGS = frozenset(int(tag_for_keyword(k)) for k in _SERIES_KEYWORDS.split())  # type: ignore[arg-type]


def within_level(tag: int, level: str) -> bool:
    """Whether ``tag`` is an attribute of ``level`` (STUDY, SERIES, IMAGE) or a level above it."""
    if level == "IMAGE" or tag >> 16 == 0x0010 or tag in _STUDY_TAGS:
        return True
    return level == "SERIES" and tag in _SERIES_TAGS


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def ignored_keys(request: QidoRequest) -> list[str]:
    """The request's names of the matching keys given a value that the index cannot match: they are
    return keys only, matched universally (C.2.2.1.3), and the answer's Warning says so."""
    ignored = []
    for tag, value in request.matching.items():
        if value.strip() in ("", "*") or keyword_for_tag(tag) in ATTRIBUTES:
            continue
        ignored.append(parameter_name(request, tag))
    return ignored


def parameter_name(request: QidoRequest, tag: int | None) -> str:
    """The request's own name for the attribute a failure is about."""
    if tag is None:
        return "the query"
    return request.parameters.get(f"{tag:08X}") or attribute_name(tag)


def parameter_message(request: QidoRequest, tag: int | None, message: str) -> str:
    """A failure's message led by the request's own name for the attribute, said once (the identifier's
    messages start with the attribute's keyword)."""
    keyword = keyword_for_tag(tag) if tag is not None else ""
    if keyword and message.startswith(f"{keyword}: "):
        message = message[len(keyword) + 2 :]
    return f"{parameter_name(request, tag)}: {message}"
