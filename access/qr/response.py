"""The C-FIND response identifier for one match: the requested keys, from the stored DICOM JSON header.

Each key the requester sent comes back: its value from the instance's header (DICOM JSON model,
as the receiver stored it), a value computed over the level (counts, ModalitiesInStudy), or empty
when the object has no such attribute (C.2.2.1: a return key with no value is returned empty).
The unique keys of the level and the levels above are always returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from diana.access.qr.identifier import MODELS, UNIQUE_KEY, Query
from diana.access.qr.index_reader import Match

__all__ = ["build_response", "header_fields", "response_tags"]

_CHARSET = 0x00080005
_RETRIEVE_AE = 0x00080054


def _dicom_date(iso: str | None) -> str:
    return iso.replace("-", "") if iso else ""


def _dicom_time(iso: str | None) -> str:
    return iso.replace(":", "") if iso else ""


# keyword -> how to read it from the typed fields when the document has no header
_FALLBACK: dict[str, tuple[str, Callable[[Any], str]]] = {
    "PatientID": ("patient_id", str),
    "PatientName": ("patient_name", str),
    "PatientBirthDate": ("patient_birth_date", _dicom_date),
    "PatientSex": ("patient_sex", str),
    "StudyInstanceUID": ("study_instance_uid", str),
    "StudyDate": ("study_date", _dicom_date),
    "StudyTime": ("study_time", _dicom_time),
    "AccessionNumber": ("accession_number", str),
    "StudyID": ("study_id", str),
    "StudyDescription": ("study_description", str),
    "ReferringPhysicianName": ("referring_physician_name", str),
    "SeriesInstanceUID": ("series_instance_uid", str),
    "Modality": ("modality", str),
    "SeriesNumber": ("series_number", str),
    "SeriesDescription": ("series_description", str),
    "BodyPartExamined": ("body_part_examined", str),
    "SOPInstanceUID": ("sop_instance_uid", str),
    "SOPClassUID": ("sop_class_uid", str),
    "InstanceNumber": ("instance_number", str),
    "NumberOfFrames": ("number_of_frames", str),
}


def _no_bulk(_tag: str, _vr: str, _uri: str) -> bytes:
    return b""  # large binary values are not C-FIND return values


def _empty(tag: int, template: Dataset | None) -> DataElement:
    if template is not None and tag in template:
        vr = template[tag].VR
    else:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
    return DataElement(tag, vr, Sequence() if vr == "SQ" else None)


def response_tags(query: Query) -> list[int]:
    """The tags a response to ``query`` holds: its return keys and the unique keys down to its level."""
    levels = MODELS[query.model]
    tags = list(query.return_tags)
    for level in levels[: levels.index(query.level) + 1]:
        tag = int(Tag(UNIQUE_KEY[level]))
        if tag not in tags:
            tags.append(tag)
    return tags


def header_fields(query: Query) -> list[str]:
    """The stored header's elements ``build_response`` reads for ``query`` (the character set too): what
    the index needs to return, instead of each match's whole header (often ~10 KB of JSON)."""
    return [f"{t:08X}" for t in (*response_tags(query), _CHARSET)]


def build_response(query: Query, match: Match, ae_title: str) -> Dataset:
    header: dict[str, Any] = match.document.get("dicom") or {}
    tags = response_tags(query)
    wanted = {f"{t:08X}": t for t in tags}
    subset = {k: v for k, v in header.items() if k in wanted}
    if f"{_CHARSET:08X}" in header:
        subset[f"{_CHARSET:08X}"] = header[f"{_CHARSET:08X}"]
    ds = Dataset.from_json(subset, bulk_data_uri_handler=_no_bulk) if subset else Dataset()
    for tag in tags:
        if tag in ds:
            continue
        keyword = keyword_for_tag(tag)
        if keyword in match.computed:
            value = match.computed[keyword]
            ds[tag] = DataElement(tag, dictionary_VR(tag), value if isinstance(value, list) else str(value))
        elif tag == _RETRIEVE_AE:
            ds.RetrieveAETitle = ae_title
        elif keyword in _FALLBACK and match.document.get(_FALLBACK[keyword][0]) is not None:
            name, convert = _FALLBACK[keyword]
            ds[tag] = DataElement(tag, dictionary_VR(tag), convert(match.document[name]))
        else:
            ds[tag] = _empty(tag, query.identifier)
    ds.QueryRetrieveLevel = query.level
    if "SpecificCharacterSet" not in ds and not _is_ascii(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _is_ascii(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "UC") and elem.value is not None:
            if not str(elem.value).isascii():
                return False
    return True
