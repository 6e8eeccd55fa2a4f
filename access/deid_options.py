"""The Basic Profile's options (PS3.15 E.3) and the one action each attribute gets under them.

Table E.1-1 gives, per attribute, an action for the Basic Profile (read from the package in
`deid_table.py`) and one column per option. No installable package ships those option columns
for us (docs/COHORT.md says which we looked at), so each option is applied here by the rule the
standard's text gives for it, and a unit test checks each rule on the attributes it names:

- Retain UIDs (E.3.9): every U becomes K, and so do the reference sequences made of UIDs.
- Retain Device Identity (E.3.8): what identifies a device (serial numbers, device IDs, labels and
  UIDs, station names and AE titles, lens, source, treatment machine) becomes K.
- Retain Institution Identity (E.3.11): the Institution* attributes and the clinical trial site,
  coordinating centre and ethics committee names become K.
- Retain Patient Characteristics (E.3.7): age, sex, size, weight, ethnic group, smoking and
  pregnancy status become K; allergies, patient state, pre-medication, special needs become C.
- Retain Longitudinal Temporal Information (E.3.6): Full Dates keeps every date and time (K);
  Modified Dates shifts every date (C) by the patient's offset and keeps times of day and UTC offsets.
- Clean Descriptors (E.3.5): descriptions, comments, labels, notes, reasons, diagnoses, history,
  impressions and protocol names are kept, cleaned (C).
- Clean Structured Content (E.3.4): the SR content tree, acquisition context and specimen
  preparation are kept, cleaned (C).
- Clean Graphics (E.3.3): graphic annotations are kept, their text cleaned (C); overlays stay removed.
- Retain Safe Private (E.3.10): private elements named in a safe list the site supplies are kept;
  one read as UN (implicit VR, a creator pydicom does not know) is read as the VR the list gives it,
  or as a sequence when its bytes are items, and removed when it cannot be (deid.py).

A public element neither Table E.1-1 nor pydicom's dictionary knows is removed under every option.

These rules were checked against the option columns of the 2020 table that the `dicom-standard`
0.1.0 package ships (not a dependency): they give its K or C on every attribute it lists, except
the UTC offset under Modified Dates (C there; kept here, which a whole-day shift makes the same).

Combined codes resolve to the choice that keeps any IOD valid: Z/D and X/D and X/Z/D -> D,
X/Z -> Z, X/Z/U* -> U (a sequence of references: its UIDs replaced, the rest by the table).
A code sequence whose action is D (InstitutionCodeSequence, PersonIdentificationCodeSequence) gets
a dummy code in each item (`replaced_codes`, `DUMMY_CODE`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "Action",
    "DateOption",
    "ProfileOptions",
    "resolve",
    "method_codes",
    "replaced_codes",
    "DUMMY_CODE",
    "PATIENT_CHARACTERISTICS",
]


class Action(StrEnum):
    KEEP = "K"
    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    UID = "U"
    CLEAN = "C"


class DateOption(StrEnum):
    REMOVE = "remove"  # the Basic Profile: dates removed, emptied or dummied per the table
    MODIFIED = "modified"  # Retain Longitudinal Temporal Information with Modified Dates
    FULL = "full"  # Retain Longitudinal Temporal Information with Full Dates


@dataclass(frozen=True)
class ProfileOptions:
    dates: DateOption = DateOption.MODIFIED
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_uids: bool = False
    retain_safe_private: frozenset[tuple[str, int]] = field(default_factory=frozenset)  # (creator, element low byte)
    # the VR the safe list gives some of them (creator, element low byte, VR): a UN value is read as it
    safe_private_vrs: frozenset[tuple[str, int, str]] = field(default_factory=frozenset)
    retain_institution_identity: bool = False
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    clean_graphics: bool = False


# CID 7050 codes, in the order PS3.16 lists them
_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

PATIENT_CHARACTERISTICS = frozenset(
    {
        "PatientAge",
        "PatientSex",
        "PatientSexNeutered",
        "PatientSize",
        "PatientWeight",
        "EthnicGroup",
        "EthnicGroupCodeSequence",
        "SmokingStatus",
        "PregnancyStatus",
    }
)
_PATIENT_FREE_TEXT = frozenset({"Allergies", "PatientState", "PreMedication", "SpecialNeeds"})
# identifiers of a device: its serial numbers, IDs, labels, UIDs; its station; its lens and source
_DEVICE = re.compile(
    r"(DeviceSerialNumber|DeviceUID|DeviceLabel|^DeviceDescription$|DeviceAlternateIdentifier|UniqueDeviceIdentifier"
    r"|UDISequence|ManufacturerDevice|Detector(ID|Label)$|^(Cassette|Gantry|Generator|Plate|XRaySource)ID$|^Lens"
    r"|Station(AETitle|Name|GeographicLocation)|Scheduled(ProcedureStep|Study)Location|^Source(Manufacturer|SerialNumber)"
    r"|TreatmentMachineName)"
)
_INSTITUTION = re.compile(
    r"^(Institution|ClinicalTrial(CoordinatingCenterName|ProtocolEthicsCommitteeName|Site(ID|Name))$)"
)
# descriptions, comments, labels, notes, reasons, diagnoses and the other free text about the procedure
_DESCRIPTOR = re.compile(
    r"(Description|Comments?$|^CommentsOn|Label$|LabelText|LongLabel|Notes?(Sequence)?$|^ReasonFor|Diagnos|History|MedicalAlerts"
    r"|Allergies|Occupation|Impressions|InterpretationText|Narrative|PatientState|ContrastBolusAgent|ContrastAgent$"
    r"|^ProtocolName|^RTPlanName|^EntityName|^TreatmentSite|MakerNote|RequestAttributesSequence)"
)
_STRUCTURED = frozenset({"ContentSequence", "AcquisitionContextSequence", "SpecimenPreparationSequence"})
_GRAPHICS = frozenset({"GraphicAnnotationSequence", "TextObjectSequence", "UnformattedTextValue"})
_REFERENCES = re.compile(
    r"^(Referenced(?!Patient|DigitalSignature|SOPInstanceMAC)\w*|Source\w*Image)Sequence$"
)  # references made of UIDs
_TEMPORAL_NOT_DATES = {"TimezoneOffsetFromUTC": "keep", "FrameOriginTimestamp": "binary"}
_BIRTH = frozenset({"PatientBirthDate", "PatientBirthTime"})
_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT"})
_COMBINED = {"Z/D": Action.DUMMY, "X/D": Action.DUMMY, "X/Z/D": Action.DUMMY, "X/Z": Action.EMPTY, "X/Z/U*": Action.UID}


@functools.cache
def _dictionary() -> Callable[[int], str]:
    # pydicom imported on first use, not above: the CLI reads this module to declare its export
    # options, and pydicom's import (0.2 s) would slow every diana command.
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag


def _keyword(tag: int) -> str:
    if (tag >> 16) & 0xFF00 == 0x6000:
        return {0x3000: "OverlayData", 0x4000: "OverlayComments"}.get(tag & 0xFFFF, "")
    return _dictionary()(tag) or ""


# Not in Table E.1-1, yet the patient's: birth and death dates in another calendar, and the calendar.
_PATIENT_UNLISTED = frozenset(
    {
        "PatientBirthDateInAlternativeCalendar",
        "PatientDeathDateInAlternativeCalendar",
        "PatientAlternativeCalendar",
    }
)

# UIDs Table E.1-1 does not list that identify an instance, an event or the site's systems (the
# others the dictionary has name kinds of things: SOP classes, transfer syntaxes, coding schemes).
_INSTANCE_UID = re.compile(
    r"(InstanceUID|FrameOfReferenceUID|UIDOfConcatenationSource|AssertionUID|FiducialUID|EventUID"
    r"|PrivateRecordUID|InputSetUID|RetrieveLocationUID|RepositoryUniqueID|HomeCommunityID|FindingsGroupUIDTrial)$"
)
# URLs of public vocabularies: a code's own value (Code Sequence macro, 1C) and its scheme's address.
_PUBLIC_URLS = frozenset({"URNCodeValue", "CodingSchemeURL"})


def _unlisted(keyword: str, vr: str, options: ProfileOptions) -> Action:
    """An attribute Table E.1-1 does not list: kept, except what identifies by its nature."""
    if vr == "PN" or keyword in _PATIENT_UNLISTED:
        return Action.DUMMY if vr == "PN" else Action.REMOVE
    if vr == "UI" and _INSTANCE_UID.search(keyword):
        # A reference to an instance, a frame of reference, a concatenation: replaced as every listed
        # UID is, so that the references between exported objects still hold. A UID that names a kind
        # of thing (a SOP class, a transfer syntax, a coding scheme, a context group) stays, known to
        # pydicom's registry or not (a vendor's private SOP class).
        return Action.KEEP if options.retain_uids else Action.UID
    if vr == "UR" and keyword not in _PUBLIC_URLS:  # a URL names the site's hosts (a PACS, a JPIP server)
        return Action.KEEP if options.retain_institution_identity else Action.REMOVE
    return Action.KEEP


def resolve(tag: int, vr: str, code: str | None, options: ProfileOptions) -> Action:
    """The one action for an attribute of Table E.1-1 (``code``: its Basic Profile code, None if not listed)."""
    if (tag >> 16) & 0xFF00 == 0x6000:
        # An overlay: the table removes its data and comments (X); its other attributes (its label, its
        # description, where it lies) would describe a plane no longer there: the whole group goes.
        return Action.REMOVE
    keyword = _keyword(tag)
    if code is None and not keyword and not (tag >> 16) & 1:
        # A public element neither the table nor pydicom's dictionary knows (newer than both, or made
        # up; read as UN bytes from an implicit VR file): nothing says what it holds, so it goes.
        return Action.REMOVE
    is_date = vr in ("DA", "DT")
    if (is_date or vr == "TM" or keyword in _TEMPORAL_NOT_DATES) and keyword not in _BIRTH:
        if options.dates is DateOption.FULL:
            return Action.KEEP
        if options.dates is DateOption.MODIFIED:
            # dates shifted; times of day checked and kept (whole-day shifts); a UTC offset is unchanged
            # by a shift; a binary timestamp cannot be shifted, so it goes (C on bytes removes)
            return Action.KEEP if _TEMPORAL_NOT_DATES.get(keyword) == "keep" else Action.CLEAN
        if code is None and keyword not in _TEMPORAL_NOT_DATES:
            # Dates removed, and the object says so (LongitudinalTemporalInformationModified REMOVED):
            # one the table does not list (StudyUpdateDateTime, ExpiryDate...) goes with the others.
            return Action.REMOVE
    if code is None:  # not in the table: kept, except what identifies by its nature (stricter than E.1-1)
        return _unlisted(keyword, vr, options)
    if options.retain_uids and ("U" in code or "UID" in keyword or _REFERENCES.match(keyword)):
        return Action.KEEP
    if options.retain_device_identity and _DEVICE.search(keyword):
        return Action.KEEP
    if options.retain_institution_identity and _INSTITUTION.match(keyword):
        return Action.KEEP
    if options.retain_patient_characteristics:
        if keyword in PATIENT_CHARACTERISTICS:
            return Action.KEEP
        if keyword in _PATIENT_FREE_TEXT:
            return Action.CLEAN
    if options.clean_structured_content and keyword in _STRUCTURED:
        return Action.CLEAN
    if options.clean_graphics and keyword in _GRAPHICS:
        return Action.CLEAN
    if (
        options.clean_descriptors
        and vr not in ("PN", "UI")
        and _DESCRIPTOR.search(keyword)
        and not _DEVICE.search(keyword)
    ):
        return Action.CLEAN
    return _COMBINED.get(code) or Action(code)


# A dummy code (Code Sequence Macro: value, scheme, meaning, each Type 1); "99" marks a private coding
# scheme (PS3.3 8.2), so no one takes it for a code of a public vocabulary.
DUMMY_CODE = ("ANONYMIZED", "99ANONYMIZED", "ANONYMIZED")


def replaced_codes(keyword: str, action: Action) -> bool:
    """A code sequence the profile replaces (D: InstitutionCodeSequence, X/Z/D; PersonIdentificationCode-
    Sequence): its codes are what identifies (the institution's code and name, a staff ID), so each of
    its items becomes DUMMY_CODE. D asks for a non-zero length value: removing the items would leave an
    empty sequence, which D (a Type 1 sequence) does not allow; a dummy code keeps the IOD valid."""
    return action is Action.DUMMY and keyword.endswith("CodeSequence")


def _item(value: str, meaning: str) -> Dataset:
    from pydicom import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def method_codes(options: ProfileOptions) -> list[Dataset]:
    """DeidentificationMethodCodeSequence: the profile and exactly the options applied."""
    chosen = ["basic"]
    chosen += [
        name for name in ("clean_graphics", "clean_structured_content", "clean_descriptors") if getattr(options, name)
    ]
    if options.dates is DateOption.FULL:
        chosen.append("full_dates")
    elif options.dates is DateOption.MODIFIED:
        chosen.append("modified_dates")
    chosen += [
        name
        for name in (
            "retain_patient_characteristics",
            "retain_device_identity",
            "retain_uids",
            "retain_safe_private",
            "retain_institution_identity",
        )
        if getattr(options, name)
    ]
    return [_item(*_CODES[name]) for name in chosen]
