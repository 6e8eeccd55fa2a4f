"""De-identification for research export: PS3.15 Annex E Basic Application Level Confidentiality
Profile with the options the user chose, and project-keyed pseudonyms.

Every element of the object, in every sequence item and SR content item, gets the one action
its Table E.1-1 row and the options give (`deid_options.resolve`): kept, removed, emptied,
replaced by a dummy, its UID mapped, or cleaned (dates shifted, identifying words redacted from
text). Private elements go unless the site's safe list keeps them. Person names the table does
not list are replaced too. Inside a content tree the profile replaces (Content Sequence, D),
names and free text are replaced; inside one it cleans (Clean Structured Content), they are
redacted. A code sequence the profile replaces (InstitutionCodeSequence, PersonIdentification-
CodeSequence) gets a dummy code in each item. An object that cannot be handled (a date no program
can read, a risky class without the opt-in, no Study Instance UID) raises Refused with a reason
that holds no patient data.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import pydicom
from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from pydicom.values import convert_SQ, convert_value

from diana.access.dateshift import MalformedTemporal, shift_value
from diana.access.deid_options import (
    DUMMY_CODE,
    Action,
    DateOption,
    ProfileOptions,
    method_codes,
    replaced_codes,
    resolve,
)
from diana.access.deid_table import EDITION, TABLE_PACKAGE, ProfileTable, basic_profile
from diana.access.pseudonyms import ProjectKeys, StudySubjects
from diana.access.residual import Identifiers, collect
from diana.access.risk import risk_of

__all__ = ["Deidentifier", "Deidentified", "PseudonymKey", "Refused", "RiskRefused"]

_DUMMY_TEXT = "ANONYMIZED"
_REDACTED = "[REDACTED]"
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC"})
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}  # PS3.5 6.2, characters
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_DUMMY_BY_VR = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "IS": "0", "DS": "0", "AS": "000Y"}
# AE titles, the presentation addresses (dicom://host:port of the sender and the receiver), private info
_META_REMOVE = (0x00020016, 0x00020017, 0x00020018, 0x00020026, 0x00020027, 0x00020028, 0x00020100, 0x00020102)
_AGE = re.compile(r"^(\d{3})Y$")
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: how a UN value holding a sequence starts


class Refused(Exception):
    """This object is not exported; the message says why and holds no patient data."""


class RiskRefused(Refused):
    """Refused by the risk policy (access/risk.py) alone: the object was read and could be de-identified
    as far as its header goes, but its class or flags say its pixels or payload may identify the patient.
    A deliberate omission, not a gap: an export whose only omissions are these is complete."""


@dataclass
class PseudonymKey:
    """Original identity -> pseudonym, for the key file the user asked for (and only then)."""

    rows: dict[str, dict] = field(default_factory=dict)

    def add(self, subject: str, original_id: str, original_name: str, keys: ProjectKeys) -> None:
        self.rows.setdefault(  # one row per original ID: a mixed study's second PatientID is in the key too
            f"{subject}\0{original_id}",
            {
                "project": keys.project,
                "original_patient_id": original_id,
                "original_patient_name": original_name,
                "pseudonym_patient_id": keys.patient_id(subject),
                "pseudonym_patient_name": keys.patient_name(subject),
            },
        )


@dataclass
class Deidentified:
    dataset: Dataset
    identifiers: Identifiers  # what the residual scan must not find in ``dataset``
    risk: str | None  # set when a risky object was exported by opt-in
    unreadable_private: int = 0  # safe-listed private elements removed: not readable as what the list says


@dataclass
class _Context:
    subject: str
    days: int
    redact: re.Pattern[str]  # every identifying value of the source, for cleaned text
    tree: Action | None = None  # inside a content tree the profile replaces (D) or cleans (C)


class Deidentifier:
    def __init__(
        self,
        keys: ProjectKeys,
        options: ProfileOptions | None = None,
        *,
        allow_risky: bool = False,
        table: ProfileTable | None = None,
    ):
        self.keys = keys
        self.options = options or ProfileOptions()
        self.allow_risky = allow_risky
        self.table = table or basic_profile()
        self.subjects = StudySubjects()
        self.key = PseudonymKey()

    def method_description(self) -> list[str]:
        return ["PS3.15 Annex E Basic Profile", f"Table E.1-1 of DICOM {EDITION}", f"read from {TABLE_PACKAGE}"]

    def deidentify(self, ds: Dataset) -> Deidentified:
        """De-identify ``ds`` in place (and its file meta); raise Refused when it must not go out."""
        risk = risk_of(ds)
        if risk and not self.allow_risky:
            raise RiskRefused(f"risky object: {risk} (export it with --allow-risky, checked by hand)")
        study_uid = str(ds.get("StudyInstanceUID", "")).strip()
        if not study_uid or "SOPInstanceUID" not in ds:
            raise Refused("no Study or SOP Instance UID: the object cannot be placed in the export")
        original = (str(ds.get("PatientID", "")).strip(), str(ds.get("PatientName", "")))
        subject = self.subjects.subject(study_uid, original[0])
        unreadable_private = self._read_safe_private(ds)  # before collect: the scan reads what is exported
        identifiers = collect(ds, self.table, self.options)
        context = _Context(subject, self.keys.date_shift_days(subject), identifiers.redaction())
        self._private(ds)
        self._apply(ds, context, "")
        ds.PatientID = self.keys.patient_id(subject)
        ds.PatientName = self.keys.patient_name(subject)
        self._age(ds)
        ds.PatientIdentityRemoved = "NO" if risk else "YES"
        ds.DeidentificationMethod = self.method_description()
        ds.DeidentificationMethodCodeSequence = method_codes(self.options)
        ds.LongitudinalTemporalInformationModified = {
            DateOption.FULL: "UNMODIFIED",
            DateOption.MODIFIED: "MODIFIED",
            DateOption.REMOVE: "REMOVED",
        }[self.options.dates]
        self._file_meta(ds)
        ds.preamble = bytes(128)  # the source's preamble is anybody's 128 bytes (a TIFF header, a name)
        self.key.add(subject, *original, self.keys)
        return Deidentified(ds, identifiers, risk, unreadable_private)

    # --- the walk -------------------------------------------------------------------------------
    def _read_safe_private(self, ds: Dataset) -> int:
        """Read each safe-listed private element that pydicom left as UN bytes (implicit VR, a creator
        it does not know) as the VR the list gives it, or as a sequence when its bytes are items, so
        that it is de-identified and scanned like any other (before, its bytes went out as they came);
        remove those that cannot be read so, whose VR is not the listed one, or that are UN bytes with no
        VR given and no sequence. Returns how many went."""
        safe = self.options.retain_safe_private
        if not safe:
            return 0
        vrs = {(creator, element): vr for creator, element, vr in self.options.safe_private_vrs}
        removed = 0
        for elem in list(ds):
            tag = elem.tag
            if not tag.is_private or tag.is_private_creator or tag.element < 0x1000:
                continue
            key = (_owner(ds, tag), tag.element & 0xFF)
            if key not in safe:
                continue  # removed by _private
            read = _as_listed(ds, elem, vrs.get(key))
            if read is None:
                del ds[tag]
                removed += 1
            elif read is not elem:
                ds[tag] = read
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value or []:
                    removed += self._read_safe_private(item)
        return removed

    def _private(self, ds: Dataset) -> None:
        """Remove private elements, except those the site's safe list names (creator, element byte)."""
        safe = self.options.retain_safe_private
        if not safe:
            ds.remove_private_tags()
            return
        for item in list(_datasets(ds)):
            kept: set[int] = set()
            for elem in list(item):
                tag = elem.tag
                if not tag.is_private or tag.is_private_creator or tag.element < 0x1000:
                    continue
                if (_owner(item, tag), tag.element & 0xFF) in safe:
                    kept |= {int(tag), int(Tag(tag.group, tag.element >> 8))}
            for elem in list(item):
                if elem.tag.is_private and int(elem.tag) not in kept:
                    del item[elem.tag]

    def _apply(self, ds: Dataset, ctx: _Context, path: str) -> None:
        for elem in list(ds):
            if elem.tag.is_private and elem.VR == "SQ":
                # kept by the site's safe list (_private): the attributes in its items are de-identified
                # as everywhere else; the list vouches for the sequence, not for what a vendor put in it
                self._sequence(elem, Action.KEEP, ctx, path + f"({elem.tag.group:04X},{elem.tag.element:04X})")
                continue
            if elem.tag.is_private and elem.VR in _TEMPORAL_VRS:
                # kept by the safe list, a date is still the patient's: shifted, kept or removed with the
                # public ones, by the dates option (before, it went out as it came)
                action = resolve(int(elem.tag), elem.VR, None, self.options)
            elif elem.tag.is_private or elem.tag.group == 0x0002:
                continue
            else:
                action = resolve(int(elem.tag), elem.VR, self.table.code(elem.tag), self.options)
            if action is Action.KEEP and elem.VR in _FREE_TEXT_VRS | {"PN"}:
                if ctx.tree is Action.DUMMY:
                    action = Action.DUMMY
                elif ctx.tree is Action.CLEAN:
                    action = Action.CLEAN
            where = path + (elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})")
            binary_replaced = elem.VR in _BINARY_VRS and action not in (Action.KEEP, Action.EMPTY)
            if action is Action.REMOVE or (binary_replaced and not self._keeps_document(elem)):
                del ds[elem.tag]  # no dummy can stand in for bytes (or a tag pydicom does not know, read as UN)
            elif elem.VR == "SQ":
                self._sequence(elem, action, ctx, where)
            elif action is Action.EMPTY:
                elem.value = None
            elif action is Action.DUMMY:
                self._dummy(ds, elem)
            elif action is Action.UID:
                elem.value = self._map(elem.value, self.keys.uid) if elem.VR == "UI" else _DUMMY_TEXT
            elif action is Action.CLEAN:
                self._clean(ds, elem, ctx, where)

    def _sequence(self, elem: DataElement, action: Action, ctx: _Context, where: str) -> None:
        if action is Action.EMPTY:
            elem.value = Sequence()
            return
        if replaced_codes(elem.keyword, action):  # the institution's or a person's codes: dummy codes
            elem.value = Sequence([_dummy_code() for _ in elem.value or []])
            return
        inner = _Context(
            ctx.subject, ctx.days, ctx.redact, action if action in (Action.DUMMY, Action.CLEAN) else ctx.tree
        )
        for i, item in enumerate(elem.value or []):
            self._apply(item, inner, f"{where}[{i}].")

    def _keeps_document(self, elem: DataElement) -> bool:
        """An encapsulated document exported by --allow-risky keeps its payload (the report flags it)."""
        return self.allow_risky and elem.keyword == "EncapsulatedDocument"

    def _dummy(self, ds: Dataset, elem: DataElement) -> None:
        if elem.VR == "UI":
            elem.value = self._map(elem.value, self.keys.uid)
        elif elem.VR in _BINARY_VRS:
            pass  # only a kept encapsulated document gets here
        elif elem.VR in _NUMBER_VRS:
            elem.value = 0
        elif elem.VR == "AT":
            del ds[elem.tag]
        else:
            elem.value = _DUMMY_BY_VR.get(elem.VR, _DUMMY_TEXT)

    def _clean(self, ds: Dataset, elem: DataElement, ctx: _Context, where: str) -> None:
        if elem.VR in ("DA", "DT", "TM"):
            try:
                elem.value = self._map(elem.value, lambda v: shift_value(v, elem.VR, ctx.days))
            except MalformedTemporal as exc:
                raise Refused(f"{where}: {exc}") from None
        elif elem.VR == "PN":
            elem.value = _DUMMY_TEXT
        elif isinstance(elem.value, (str, MultiValue)):
            elem.value = self._map(elem.value, lambda v: _fit(ctx.redact.sub(_REDACTED, v), elem.VR, len(v)))

    @staticmethod
    def _map(value: object, fn) -> object:
        if isinstance(value, MultiValue):
            return [fn(str(v)) for v in value]
        return fn(str(value)) if value not in (None, "") else value

    def _age(self, ds: Dataset) -> None:
        """HIPAA Safe Harbor, unless patient characteristics are retained: an age over 89 left in the
        object (an SR's Subject Age, a PatientAge the table does not remove) is written as 90."""
        if self.options.retain_patient_characteristics:
            return
        for item in _datasets(ds):
            m = _AGE.match(str(item.get("PatientAge", "")).strip())
            if m and int(m[1]) > 89:
                item.PatientAge = "090Y"
            _aggregate_subject_age(item)

    def _file_meta(self, ds: Dataset) -> None:
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        for tag in _META_REMOVE:
            if tag in meta:
                del meta[tag]
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID  # the writer is now pydicom, not the source's
        meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
        if "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta = meta


def _dummy_code() -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = DUMMY_CODE
    return item


def _fit(text: str, vr: str, before: int) -> str:
    """``text`` cut to its VR's maximum length when redaction made it longer ("[REDACTED]" for "Li")."""
    limit = _MAX_LENGTH.get(vr)
    return text[: max(limit, before)] if limit else text


def _owner(item: Dataset, tag: BaseTag) -> str:
    """The private creator of ``tag`` in ``item`` ("" when the block has none)."""
    creator = Tag(tag.group, tag.element >> 8)
    return str(item[creator].value).strip() if creator in item else ""


def _as_listed(item: Dataset, elem: DataElement, vr: str | None) -> DataElement | None:
    """``elem`` as the VR the safe list gives it (``vr``, None: not given), or None when it is not one.

    A UN value is read as that VR; without one, as a sequence when its bytes are items (PS3.5 6.2.2:
    implicit VR little endian), else None: bytes whose VR nobody gave cannot be de-identified (a
    date-time in them would go out unshifted, a name unreplaced), only searched; the site keeps them
    by giving the VR (OB or UN: kept as bytes, the scan searches them). A sequence that does not read
    to its end, or a value that is not the listed VR, is None too: removed."""
    raw = elem.value
    if elem.VR == "UN" and isinstance(raw, bytes):
        try:
            if vr == "SQ" or (vr is None and raw[:4] == _ITEM):
                if _items(raw, 0, len(raw), undefined=False) != len(raw):
                    return None  # pydicom would read on past a cut item, and make up what it finds
                encodings = item._character_set
                sequence = convert_SQ(raw, True, True, [encodings] if isinstance(encodings, str) else encodings)
                _read_all(sequence)  # pydicom reads items lazily: a broken one must fail here
                return DataElement(elem.tag, "SQ", sequence)
            if vr is not None:
                raw_elem = RawDataElement(elem.tag, vr, len(raw), raw, 0, True, True)
                return DataElement(elem.tag, vr, convert_value(vr, raw_elem, item._character_set))
        except Exception:  # whatever pydicom raises on bytes that are not what they should be
            return None
        return None  # no VR given, no sequence: removed
    return elem if vr in (None, elem.VR) else None


_ITEM_END, _SEQUENCE_END, _UNDEFINED = (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD), 0xFFFFFFFF


def _items(raw: bytes, pos: int, end: int, *, undefined: bool) -> int | None:
    """Where the items of a sequence value starting at ``pos`` end (after its delimiter when of
    ``undefined`` length), or None when they do not fit in ``raw[:end]`` (implicit VR little endian)."""
    while pos + 8 <= end:
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8
        if (group, element) == _SEQUENCE_END:
            return pos if undefined else None
        if (group, element) != (0xFFFE, 0xE000):
            return None
        if length == _UNDEFINED:
            found = _elements(raw, pos, end, in_undefined_item=True)
        else:
            found = pos + length if _elements(raw, pos, pos + length, in_undefined_item=False) == pos + length else None
        if found is None:
            return None
        pos = found
    return pos if pos == end and not undefined else None


def _elements(raw: bytes, pos: int, end: int, *, in_undefined_item: bool) -> int | None:
    """Where the elements of an item starting at ``pos`` end, or None when they do not fit."""
    while pos + 8 <= end:
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8
        if (group, element) == _ITEM_END:
            return pos if in_undefined_item else None
        if group == 0xFFFE:
            return None
        if length == _UNDEFINED:  # implicit VR: a sequence
            found = _items(raw, pos, end, undefined=True)
            if found is None:
                return None
            pos = found
        elif pos + length > end:
            return None
        else:
            pos += length
    return pos if pos == end and not in_undefined_item else None


def _read_all(sequence: Sequence) -> None:
    for item in sequence:
        if not isinstance(item, Dataset):
            raise ValueError("not a sequence item")
        for elem in item:  # converts each raw element
            if elem.VR == "SQ":
                _read_all(elem.value)


_YEARS_PER_UNIT = {"a": 1.0, "mo": 1 / 12, "wk": 7 / 365.25, "d": 1 / 365.25}  # UCUM units of an age


def _aggregate_subject_age(item: Dataset) -> None:
    """A NUM content item "Subject Age" (DCM 121033) over 89 years becomes 90 years."""
    if str(item.get("ValueType", "")) != "NUM" or not item.get("ConceptNameCodeSequence"):
        return
    concept = item.ConceptNameCodeSequence[0]
    if (str(concept.get("CodeValue", "")), str(concept.get("CodingSchemeDesignator", ""))) != ("121033", "DCM"):
        return
    for measured in item.get("MeasuredValueSequence") or []:
        units = measured.get("MeasurementUnitsCodeSequence") or [Dataset()]
        per_unit = _YEARS_PER_UNIT.get(str(units[0].get("CodeValue", "")))
        try:
            years = float(measured.NumericValue) * per_unit if per_unit else None
        except (AttributeError, TypeError, ValueError):
            years = None
        if years is not None and years > 89:
            measured.NumericValue = "90"
            unit = Dataset()
            unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "a", "UCUM", "year"
            measured.MeasurementUnitsCodeSequence = [unit]


def _datasets(ds: Dataset):
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _datasets(item)
