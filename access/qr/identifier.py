"""A C-FIND/C-MOVE/C-GET identifier, checked against its information model and level (PS3.4 C.2-C.4).

What is checked here decides the DIMSE status: an identifier whose *shape* does not fit the SOP
class (no or unknown level, a level the model lacks, a missing unique key of a level above, a
matching key of a level below) is 0xA900; a value that cannot be a matching key for its VR
(a date that is no date, a wildcard in a UID, text in a number) is 0xC000. Both name the attribute.

The matching rules of C.2.2.2 become ``Matcher`` objects that know nothing of OpenSearch; keys the
index holds are matched there (opensearch_query.py), every other key is a return key (C.2.2.1.3:
an SCP may treat an optional key it cannot match as universal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "IdentifierError",
    "Matcher",
    "Query",
    "LEVELS",
    "MODELS",
    "attribute_name",
    "parse_identifier",
]

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# information model -> the levels it has, top down
MODELS = {"PATIENT": LEVELS, "STUDY": LEVELS[1:]}


class IdentifierError(ValueError):
    """Why an identifier cannot be answered, with the DIMSE status and the attribute at fault."""

    def __init__(self, status: int, message: str, tag: int | None = None):
        super().__init__(message)
        self.status = status
        self.tag = tag


DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: str
    # field of the instance index, or "" for a value computed over the level's instances
    index_field: str
    # uid, text (case-sensitive), pn (case-insensitive), date, time, int, computed
    kind: str
    unique: bool = False


_ATTRS = [
    Attribute("PatientID", "PATIENT", "patient_id", "text", unique=True),
    Attribute("PatientName", "PATIENT", "patient_name.keyword", "pn"),
    Attribute("PatientBirthDate", "PATIENT", "patient_birth_date", "date"),
    Attribute("PatientSex", "PATIENT", "patient_sex", "text"),
    Attribute("NumberOfPatientRelatedStudies", "PATIENT", "", "computed"),
    Attribute("NumberOfPatientRelatedSeries", "PATIENT", "", "computed"),
    Attribute("NumberOfPatientRelatedInstances", "PATIENT", "", "computed"),
    Attribute("StudyInstanceUID", "STUDY", "study_instance_uid", "uid", unique=True),
    Attribute("StudyDate", "STUDY", "study_date", "date"),
    Attribute("StudyTime", "STUDY", "study_time", "time"),
    Attribute("AccessionNumber", "STUDY", "accession_number", "text"),
    Attribute("StudyID", "STUDY", "study_id", "text"),
    Attribute("StudyDescription", "STUDY", "study_description.keyword", "text"),
    Attribute("ReferringPhysicianName", "STUDY", "referring_physician_name.keyword", "pn"),
    # matched against the modality of any instance of the study; returned over all of them
    Attribute("ModalitiesInStudy", "STUDY", "modality", "text"),
    Attribute("SOPClassesInStudy", "STUDY", "sop_class_uid", "uid"),
    Attribute("NumberOfStudyRelatedSeries", "STUDY", "", "computed"),
    Attribute("NumberOfStudyRelatedInstances", "STUDY", "", "computed"),
    Attribute("SeriesInstanceUID", "SERIES", "series_instance_uid", "uid", unique=True),
    Attribute("Modality", "SERIES", "modality", "text"),
    Attribute("SeriesNumber", "SERIES", "series_number", "int"),
    Attribute("SeriesDescription", "SERIES", "series_description.keyword", "text"),
    Attribute("SeriesDate", "SERIES", "series_date", "date"),
    Attribute("BodyPartExamined", "SERIES", "body_part_examined", "text"),
    Attribute("StationName", "SERIES", "station_name", "text"),
    Attribute("Manufacturer", "SERIES", "manufacturer", "text"),
    Attribute("NumberOfSeriesRelatedInstances", "SERIES", "", "computed"),
    Attribute("SOPInstanceUID", "IMAGE", "sop_instance_uid", "uid", unique=True),
    Attribute("SOPClassUID", "IMAGE", "sop_class_uid", "uid"),
    Attribute("InstanceNumber", "IMAGE", "instance_number", "int"),
    Attribute("NumberOfFrames", "IMAGE", "number_of_frames", "int"),
]
ATTRIBUTES = {a.keyword: a for a in _ATTRS}
UNIQUE_KEY = {a.level: a.keyword for a in _ATTRS if a.unique}
# Elements of the identifier that are not keys.
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_UID = re.compile(r"^[0-9.]{1,64}$")
# An IS value (PS3.5: at most 12 characters, one sign): checked before int(), which takes "+-5" or "²" apart.
_INTEGER = re.compile(r"^[+-]?[0-9]{1,11}$")


@dataclass(frozen=True)
class Matcher:
    """One key's matching (C.2.2.2): ``values`` is any-of; a range has ``low``/``high`` (either may be None)."""

    attribute: Attribute
    # single (exact), wildcard, range, or list (any-of exact/wildcard values)
    how: str
    values: tuple[str, ...] = ()
    low: str | None = None
    high: str | None = None


@dataclass
class Query:
    model: str  # PATIENT or STUDY (root)
    level: str
    matchers: list[Matcher] = field(default_factory=list)
    # every element the requester asked for, in order (tag numbers), to be returned
    return_tags: list[int] = field(default_factory=list)
    identifier: Dataset | None = None

    def unique_values(self, level: str) -> tuple[str, ...]:
        for m in self.matchers:
            if m.attribute.keyword == UNIQUE_KEY[level] and m.how in ("single", "list"):
                return m.values
        return ()


def attribute_name(tag: int) -> str:
    """An attribute by name: its keyword, or its tag in hex (private and unknown attributes have none)."""
    return keyword_for_tag(tag) or f"{int(tag):08X}"


def _fail_value(keyword: str, why: str) -> IdentifierError:
    return IdentifierError(UNABLE_TO_PROCESS, f"{keyword}: {why}", Tag(keyword))


def _raw_values(ds: Dataset, keyword: str) -> list[str]:
    value = ds[keyword].value
    if value is None:
        return []
    if isinstance(value, MultiValue | list):
        return [str(v) for v in value]
    text = str(value)
    return text.split("\\") if text.strip() else []


def _iso_date(keyword: str, text: str) -> str:
    if not _DATE.match(text):
        raise _fail_value(keyword, f"{text!r} is not a date YYYYMMDD or a range DATE-DATE")
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:])).isoformat()
    except ValueError:
        raise _fail_value(keyword, f"{text!r} is not a calendar date") from None


def _iso_time(keyword: str, text: str, upper: bool) -> str:
    """HH[MM[SS[.F]]] in the index's form HH:MM:SS(.F); an upper bound covers the whole last unit given."""
    m = _TIME.match(text)
    if not m:
        raise _fail_value(keyword, f"{text!r} is not a time HHMMSS or a range TIME-TIME")
    hh, mm, ss, frac = m.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        raise _fail_value(keyword, f"{text!r} is not a time of day")
    fill = "59" if upper else "00"
    out = f"{hh}:{mm or fill}:{ss or fill}"
    if frac:
        return out + frac
    return out + (".999999" if upper else "")


def _matcher(attr: Attribute, raw: list[str]) -> Matcher | None:
    """The matcher for one key's value(s), or None for universal matching (a return key)."""
    kw = attr.keyword
    values = [v.strip() if attr.kind != "pn" else v.rstrip() for v in raw]
    values = [v for v in values if v]
    if not values or values == ["*"]:
        return None
    if attr.kind == "computed":
        raise IdentifierError(DOES_NOT_MATCH_SOP_CLASS, f"{kw} is a return key only: send it empty", Tag(kw))
    if attr.kind == "uid":
        bad = [v for v in values if not _UID.match(v)]
        if bad:
            raise _fail_value(kw, f"{bad[0]!r} is not a UID (no wildcards in UIDs; a list is UID\\UID)")
        return Matcher(attr, "single" if len(values) == 1 else "list", tuple(values))
    if attr.kind in ("date", "time"):
        if len(values) > 1:
            raise _fail_value(kw, "one value or one range, not a list")
        text = values[0]
        convert = (lambda t, up: _iso_date(kw, t)) if attr.kind == "date" else (lambda t, up: _iso_time(kw, t, up))
        if "-" in text:
            low, _, high = text.partition("-")
            if not low and not high:
                raise _fail_value(kw, "'-' alone is not a range")
            lo = convert(low, False) if low else None
            hi = convert(high, True) if high else None
            if lo and hi and lo > hi:
                raise _fail_value(kw, f"range {text!r} ends before it starts")
            return Matcher(attr, "range", low=lo, high=hi)
        if attr.kind == "time":  # a single time matches the whole unit it names
            return Matcher(attr, "range", low=convert(text, False), high=convert(text, True))
        return Matcher(attr, "single", (convert(text, False),))
    if attr.kind == "int":
        if any(not _INTEGER.match(v) for v in values):
            raise _fail_value(kw, f"{values[0]!r} is not an integer (no wildcards in numbers)")
        return Matcher(attr, "single" if len(values) == 1 else "list", tuple(str(int(v)) for v in values))
    # text and person names: exact or wildcard, any of a list
    if len(values) == 1:
        how = "wildcard" if any(c in values[0] for c in "*?") else "single"
        return Matcher(attr, how, tuple(values))
    return Matcher(attr, "list", tuple(values))


def parse_identifier(ds: Dataset, model: str, retrieve: bool = False, hierarchical: bool = True) -> Query:
    """Check ``ds`` against ``model`` (PATIENT or STUDY root) and build the query; raise IdentifierError.

    ``hierarchical=False`` is relational queries (QIDO-RS ``/series``: any series, across studies).
    """
    try:
        level = str(ds.get("QueryRetrieveLevel", "") or "").strip().upper()
    except Exception:
        raise IdentifierError(DOES_NOT_MATCH_SOP_CLASS, "QueryRetrieveLevel cannot be decoded") from None
    levels = MODELS[model]
    if not level:
        raise IdentifierError(DOES_NOT_MATCH_SOP_CLASS, "QueryRetrieveLevel (0008,0052) is missing", 0x00080052)
    if level not in levels:
        raise IdentifierError(
            DOES_NOT_MATCH_SOP_CLASS,
            f"QueryRetrieveLevel {level!r} is not a level of the {model.title()} Root model (use {', '.join(levels)})",
            0x00080052,
        )
    depth = LEVELS.index(level)
    query = Query(model=model, level=level, identifier=ds)
    for tag in sorted(ds.keys()):  # in tag order, as iterating the data set gives them
        try:
            elem = ds[tag]  # read from its raw bytes here: a value its VR cannot hold fails now
        except Exception:
            raise IdentifierError(
                UNABLE_TO_PROCESS, f"{attribute_name(tag)}: the value cannot be decoded", int(tag)
            ) from None
        keyword = elem.keyword
        if keyword in _NOT_KEYS or elem.tag.group in (0x0000, 0x0002):
            continue
        query.return_tags.append(int(elem.tag))
        attr = ATTRIBUTES.get(keyword)
        if attr is None:
            continue  # optional key the index cannot match: a return key (C.2.2.1.3)
        # Study Root has no patient level: patient attributes are study attributes there.
        attr_depth = LEVELS.index(attr.level)
        try:
            raw = _raw_values(ds, keyword)
        except Exception:
            raise _fail_value(keyword, "the value cannot be decoded") from None
        if attr_depth > depth:
            if raw and any(v.strip() for v in raw):
                raise IdentifierError(
                    DOES_NOT_MATCH_SOP_CLASS,
                    f"{keyword} is a {attr.level} key: it cannot be matched in a {level} level query",
                    int(elem.tag),
                )
            query.return_tags.pop()
            continue
        matcher = _matcher(attr, raw)
        if matcher is not None:
            query.matchers.append(matcher)
    if hierarchical:
        _check_unique_keys(query, levels, depth, retrieve)
    return query


def _check_unique_keys(query: Query, levels: tuple[str, ...], depth: int, retrieve: bool) -> None:
    """Hierarchical model (C.4.1.2.1): the unique key of every level above is a single value; C-MOVE/C-GET
    also need the unique key(s) of their own level (C.4.2.2.1). Study Root's STUDY level needs none above."""
    above = [lv for lv in levels if LEVELS.index(lv) < depth]
    for lv in above:
        values = query.unique_values(lv)
        if len(values) != 1:
            keyword = UNIQUE_KEY[lv]
            raise IdentifierError(
                DOES_NOT_MATCH_SOP_CLASS,
                f"a {query.level} level query in the {query.model.title()} Root model needs {keyword} "
                f"as a single value",
                int(Tag(keyword)),
            )
    if retrieve and not query.unique_values(query.level):
        keyword = UNIQUE_KEY[query.level]
        raise IdentifierError(
            DOES_NOT_MATCH_SOP_CLASS,
            f"a {query.level} level retrieve needs {keyword} (one UID or a list)",
            int(Tag(keyword)),
        )
