"""The residual-identifier scan: is any identifying value of the source object left in the output?

Independently of the de-identifier's code, `collect` reads the source object with the profile
table and the options and gathers every value the profile says must not survive: person names
(whole and each name part), IDs, accession and other numbers, addresses, telephone numbers,
institution and station names (unless retained), free text, dates (unless Full Dates are
retained), UIDs (unless retained), and the text of an SR content tree that is not cleaned. `scan`
then searches every element of the output, in sequences and SR content items, file meta included:
dates, times, UIDs and numbers are compared whole; text is searched for the value inside it,
ignoring case. A hit names the element path and the kind of value, never the value itself.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field

from pydicom import Dataset, config
from pydicom.charset import convert_encodings
from pydicom.multival import MultiValue
from pydicom.uid import UID

from diana.access.deid_options import Action, DateOption, ProfileOptions, replaced_codes, resolve
from diana.access.deid_table import ProfileTable

__all__ = ["Identifiers", "Hit", "collect", "scan"]

_MIN_TEXT = 4  # shorter values ("CT", "1", "AB") would match everywhere; named in docs/COHORT.md
# A name part of 2+ letters is searched ("Li", "Wu"), in any other alphabet of 1+ (a Cyrillic or Greek
# initial is rare enough); a 1-letter Latin initial would match everywhere. Named in docs/COHORT.md.
_MIN_NAME_PART = 2
# Scripts that do not separate words by spaces (CJK ideographs, kana, Hangul): a name part in them
# ("山田", "김") is matched anywhere in text, since "whole word" would never match inside "山田太郎".
_UNSPACED = re.compile(
    "[\u1100-\u11ff\u2e80-\u2fdf\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]"
)
# An ID of 5+ characters with a digit is searched inside words too ("998877" in "MRN998877"); a
# shorter or all-letter one would be found inside unrelated words.
_ID_KIND = re.compile(r"(ID|IDs|Numbers?|Identifiers?)$")
_MIN_ID = 5
_WHOLE_VRS = frozenset({"UI", "DA", "DT", "TM", "IS", "DS", "AS", "CS"})
_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "AE", "PN", "UC", "CS", "UR"})
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC"})
_IDENTIFYING = re.compile(
    r"(ID$|IDs$|Number|Address|Telephone|Name|Institution|Station|Serial|Location|Comments?$|Text|Label|Identifier)"
)
# What the de-identifier itself writes: a source value equal to one of these words is no leak (an ID
# "ANON"). Compared whole: a name part "Ted" or "Red" is not excused by being inside "[REDACTED]".
_OWN_VOCABULARY = frozenset({"ANONYMIZED", "ANONYMOUS", "[REDACTED]", "REDACTED", "ANON", "ANON^", "NONE", "UNKNOWN"})
_EQUIPMENT = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions")
_CODED = frozenset({"CodeValue", "LongCodeValue", "CodingSchemeDesignator", "CodeMeaning"})
# What identifies in a code the profile replaces (D): the institution's or the person's code and meaning
_REPLACED_CODE = frozenset({"CodeValue", "LongCodeValue", "CodeMeaning"})
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
# Bulk data, not searched (large, and no identifying text expected in it): pixels and their offset
# tables, waveforms, spectroscopy, audio, encapsulated documents (kept only by --allow-risky, flagged
# for a check by hand), a surface's points, overlay and curve data; and tables of numbers, in which a
# short term matches by chance (a 2-letter name part, a 2-byte GB18030 character) and fails the
# export: colour and other lookup tables (palette, segmented palette, blending, modality and VOI LUT
# data, filter and weighting tables), the ICC profile, a detector's dark-current, air-count,
# bad-pixel and calibration images, a threat bitmap, display colours, the retired pixel coefficients,
# the trailing padding. A public OF, OD, OL or OV value (floats or integers by its VR) is bulk too.
_BULK = frozenset(
    {0x7FE00001, 0x7FE00002, 0x7FE00008, 0x7FE00009, 0x7FE00010, 0x54001010, 0x56000020, 0x00420011}
    | {0x00660016, 0x00660021, 0x00660023, 0x00660024, 0x00660025, 0x00660029, 0x00660040, 0x00660041, 0x00660042}
    | {0x00281200, 0x00281201, 0x00281202, 0x00281203, 0x00281204, 0x00281211, 0x00281212, 0x00281213}
    | {0x00281221, 0x00281222, 0x00281223, 0x00281224, 0x00281408, 0x00283006, 0x00282000, 0x003A032E}
    | {0x00701808, 0x00143050, 0x00143070, 0x00143080, 0x4010106C, 0x40101006, 0x00660103}
    | {0x7FE00020, 0x7FE00030, 0x7FE00040, 0xFFFCFFFC}
)
_NUMBER_ARRAY_VRS = frozenset({"OF", "OD", "OL", "OV"})
# A term of fewer bytes than this in an encoding is not searched in binary values in that encoding:
# 2 bytes ("Li", a GB18030 character) occur by chance in any large value. Named in docs/COHORT.md.
_MIN_BINARY = 3
_ESCAPES = re.compile(rb"\x1b[\x20-\x2f]+[\x40-\x7e]")  # ISO 2022 designations around encoded text


def _bulk(tag: int, vr: str) -> bool:
    group, element = tag >> 16, tag & 0xFFFF
    return (
        tag in _BULK
        or (vr in _NUMBER_ARRAY_VRS and not group & 1)
        or (group & 0xFF00 in (0x5000, 0x6000) and element in (0x3000, 0x200C))  # curve, overlay, audio data
        or (group & 0xFF00 == 0x7F00 and element == 0x0010)  # variable pixel data (retired)
    )


@dataclass
class Identifiers:
    whole: dict[str, str] = field(default_factory=dict)  # value -> kind, compared whole (dates, UIDs, IDs)
    text: dict[str, str] = field(default_factory=dict)  # value (upper case) -> kind, searched inside text
    # Identifying values the scan does not look for (a kept value of the object holds them innocently:
    # a name part that is the manufacturer's) but cleaned text still loses: "Anna Philips" in a
    # description is the patient's name, whoever built the scanner.
    redact_only: set[str] = field(default_factory=set)
    anywhere: set[str] = field(default_factory=set)  # (upper case) matched inside words too, not only as words
    # (upper case) -> the value as the source wrote it: "Strauß", which upper case makes "STRAUSS"
    forms: dict[str, set[str]] = field(default_factory=dict)
    encodings: list[str] = field(default_factory=lambda: ["utf-8"])  # the source's, to find values in bytes

    def pattern(self) -> re.Pattern[str]:
        """One expression finding any identifier the scan looks for in upper-case text (built once):
        as a whole word, or anywhere for those in ``anywhere``."""
        if getattr(self, "_pattern", None) is None:
            self._pattern = re.compile(_alternation(self._searched(), lambda t: t in self.anywhere))
        return self._pattern

    def glued(self) -> re.Pattern[str]:
        """The values searched anywhere (IDs, CJK name parts), for codes otherwise compared whole (built once)."""
        if getattr(self, "_glued", None) is None:
            self._glued = re.compile(_alternation([t for t in self._searched() if t in self.anywhere], bool))
        return self._glued

    def binary_kind(self, data: bytes) -> str | None:
        """The kind of an identifier found in the binary value ``data`` (UN, OB...: a vendor's blob), or
        None. Each searched value in the case forms its source had, upper, lower and title case ("Strauß"
        as it is: upper-cased it is "STRAUSS"), in the object's character sets, UTF-8 and Latin-1 (a blob
        need not follow the object's), and UTF-16-LE; ASCII letters in any case (``data`` is compared in
        lower case). A form of fewer than 3 bytes in an encoding is not searched in it: it is in any
        large value by chance."""
        low = data.lower()
        every, anywhere = self._binary_patterns()
        pos = 0
        while found := every.search(low, pos):
            start = found.start()
            kind, word, wide = self._binary_terms[found.group(0)]
            if not word or _starts_word(low, start, wide):
                return kind
            if glued := anywhere.match(low, start):  # another value, found anywhere, at the same place
                return self._binary_terms[glued.group(0)][0]
            pos = start + 1
        return None

    def _binary_patterns(self) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
        """Every form as bytes (whole words ending where they should: their start is checked by
        binary_kind), and those found anywhere (IDs, dates, CJK name parts); built once, as a trie: one
        expression of 1,000 alternatives tried at each byte of 20 MB takes half a minute."""
        if getattr(self, "_binary", None) is None:
            self._binary_terms: dict[bytes, tuple[str, bool, bool]] = {}  # form -> kind, a word, UTF-16
            encodings = list(dict.fromkeys([*self.encodings, "latin_1", "utf-16-le"]))
            for term in self._searched():
                kind = self.kind_of(term)
                word = term not in self.anywhere and kind != "date"
                for form in self._case_forms(term):
                    for encoding in encodings:
                        try:
                            data = _ESCAPES.sub(b"", form.encode(encoding)).lower()  # ISO 2022: bare text
                        except (UnicodeError, LookupError):
                            continue
                        before = self._binary_terms.get(data)
                        if len(data) >= _MIN_BINARY and (before is None or before[1] and not word):
                            self._binary_terms[data] = (kind, word, encoding == "utf-16-le")
            ends = {
                data: (_WIDE_WORD_END if wide else _BYTES_WORD_END) if word else b""
                for data, (_, word, wide) in self._binary_terms.items()
            }
            self._binary = (_trie(ends), _trie({d: e for d, e in ends.items() if not e}))
        return self._binary

    def _case_forms(self, term: str) -> set[str]:
        forms = set()
        for form in self.forms.get(term, set()) | {term}:
            forms |= {form, form.upper(), form.lower(), form.title()}
        return forms

    def kind_of(self, upper: str) -> str:
        return self.text.get(upper) or next(k for w, k in self.whole.items() if w.upper() == upper)

    def _searched(self) -> list[str]:
        return sorted(set(self.text) | {w.upper() for w in self.whole if len(w) >= _MIN_TEXT}, key=len, reverse=True)

    def terms(self) -> list[str]:
        """Every value to redact from cleaned text, longest first, also as the source wrote it ("Strauß":
        ignoring case, "STRAUSS" does not match it)."""
        upper = set(self._searched()) | self.redact_only
        return sorted(upper | {f for t in upper for f in self.forms.get(t, ())}, key=len, reverse=True)

    def add_text(self, value: str, kind: str, *, first: bool = False) -> None:
        """``value`` searched in text (in upper case) as a ``kind``; ``first``: unless found before."""
        upper = value.upper()
        if first:
            self.text.setdefault(upper, kind)
        else:
            self.text[upper] = kind
        self.forms.setdefault(upper, set()).add(value)

    def redaction(self) -> re.Pattern[str]:
        """One expression finding every value to redact, ignoring case: replaced in one pass, so the
        "[REDACTED]" written for one value is never taken for another ("TED", "RED"). Values of 3+
        characters go wherever they are (a name glued to another word too); shorter name parts ("Li")
        only as words, or "Clinic" would lose its "li"."""
        return re.compile(
            _alternation(self.terms(), lambda t: t.upper() in self.anywhere or len(t) >= 3), re.IGNORECASE
        )


# A whole word: not glued to a letter, nor a digit to a digit. "_" and digits separate name parts
# ("Li" in "CT_Li_Wei", "SMITH" in "SMITH2"), while "1234" is still not found in "51234" (before, \w
# glued "_" and digits to a name as to a number).
_WORD_START = r"(?<![^\W\d_])(?!(?<=\d)\d)"
_WORD_END = r"(?![^\W\d_])(?!(?<=\d)\d)"
_BYTES_WORD_END = rb"(?![a-z])(?!(?<=[0-9])[0-9])"  # in bytes compared in lower case
_WIDE_WORD_END = rb"(?![a-z]\x00)(?!(?<=[0-9]\x00)[0-9]\x00)"  # the same in UTF-16-LE


def _starts_word(low: bytes, start: int, wide: bool) -> bool:
    """Whether a word found at ``start`` of ``low`` (bytes in lower case) begins there: not after an
    ASCII letter, nor a digit after a digit (as _WORD_START in text)."""
    step = 2 if wide else 1
    if start < step or (wide and low[start - 1] != 0):
        return True
    before = low[start - step]
    return not (97 <= before <= 122 or (48 <= before <= 57 and 48 <= low[start] <= 57))


def _trie(ends: dict[bytes, bytes]) -> re.Pattern[bytes]:
    """One expression finding each of ``ends`` (bytes -> what must follow them) as a trie of its bytes:
    at a position, one byte is compared with each branch, not each value; the first bytes are one
    set the engine skips to."""
    root: dict = {}
    for data, end in ends.items():
        node = root
        for byte in data:
            node = node.setdefault(byte, {})
        node[None] = end
    if not root:
        return re.compile(b"(?!)")  # matches nothing

    def alternatives(node: dict) -> bytes:
        branches = []
        for byte in sorted(k for k in node if k is not None):
            run, child = bytes([byte]), node[byte]
            while len(child) == 1 and None not in child:  # a run of single children: one literal
                (next_byte,) = child
                run, child = run + bytes([next_byte]), child[next_byte]
            branches.append(re.escape(run) + alternatives(child))
        if None in node:
            branches.append(node[None])  # the value ends here: after the longer ones
        return branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"

    return re.compile(alternatives(root))


def _alternation(terms: list[str], anywhere) -> str:
    """``terms`` (longest first) as one alternation: whole words, except where ``anywhere(term)``."""
    inside = "|".join(re.escape(t) for t in terms if t and anywhere(t))
    words = "|".join(re.escape(t) for t in terms if t and not anywhere(t))
    parts = ([inside] if inside else []) + ([_WORD_START + "(?:" + words + ")" + _WORD_END] if words else [])
    return "|".join(parts) or "(?!)"  # (?!): matches nothing


def _name_parts(name: str) -> list[str]:
    """The parts of a person name worth searching: 2+ letters, any part in another alphabet."""
    parts = []
    for part in re.split(r"[\^=]", name):
        part = part.strip()
        letters = [c for c in part if c.isalnum()]
        if len(letters) >= _MIN_NAME_PART or any(c.isalpha() and not _latin(c) for c in letters):
            parts.append(part)
    return parts


def _latin(c: str) -> bool:
    return c.isascii() or unicodedata.name(c, "").startswith("LATIN")


@dataclass(frozen=True)
class Hit:
    path: str
    kind: str

    def __str__(self) -> str:
        return f"{self.path} holds a {self.kind} of the source object"


def _values(value: object) -> list[str]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip()]


def _standard(uid: str) -> bool:
    """A UID of the standard's registry (a SOP class, a transfer syntax, a coding scheme)."""
    return UID(uid, validation_mode=config.IGNORE).name != uid


@functools.lru_cache(maxsize=65536)
def _word(term: str) -> re.Pattern[str]:
    """``term`` as a whole word (or words), as the scan finds it: "TOSHIBA" in "TOSHIBA_MEC", not in "TOSHIBAMEC"."""
    return re.compile(_WORD_START + re.escape(term) + _WORD_END)


def _kind(keyword: str, vr: str) -> str:
    if vr == "PN":
        return "person name"
    if vr == "UI":
        return "UID"
    if vr in ("DA", "DT"):
        return "date"
    return keyword or "value"


@dataclass
class _Kept:
    """Values the profile keeps that may innocently equal an identifying value of the same object."""

    retained: set[str] = field(default_factory=set)  # the equipment's description, and what an option retains
    coded: set[str] = field(default_factory=set)  # code values, schemes and meanings: a vocabulary's words
    dates: set[str] = field(default_factory=set)  # the dates Full Dates keeps (DA, and the day of a DT)
    birth: set[str] = field(default_factory=set)  # the birth date, collected whatever the dates option


def collect(ds: Dataset, table: ProfileTable, options: ProfileOptions) -> Identifiers:
    found = Identifiers()
    try:
        found.encodings += [e for e in convert_encodings(ds.get("SpecificCharacterSet", "")) if e != "utf-8"]
    except (LookupError, ValueError):  # a character set nobody knows: its text is searched as UTF-8
        pass
    kept = _Kept()
    _collect(ds, table, options, found, kept, tree=None)
    for value in kept.birth & kept.dates:
        # Full Dates: a newborn imaged on its birth day; the kept study date is the date, not a copy of it
        if found.whole.get(value) == "date":
            del found.whole[value]
    # Excused from the scan (still redacted from cleaned text), and nothing else: the vendor dose
    # reports' content trees name their scanner, station and hospital in text values the profile
    # removes, and the same words stay where the profile or an option keeps them; so a value equal
    # to a kept equipment description (Manufacturer, model, software versions) or to a kept
    # attribute that Table E.1-1 lists (kept by a retain option: a station name, a serial number,
    # an institution); without a digit, also a value equal to a kept code, scheme or meaning
    # (a patient "Test" and the scheme "TEST"; a department "Mammography" and a concept), or a word
    # of the equipment's description ("Here" in "Manufacturer name here"; a patient "Patient^Optima"
    # on an "Optima CT660"). A value merely found in other kept text, or equal to another kept code
    # (an institution in a kept protocol name, a PatientID in a kept file ID), is the leak the scan
    # is for: before, any kept value excused it.
    equipment = "\n".join(sorted({v.upper() for k in _EQUIPMENT for v in _values(ds.get(k, ""))}))
    for value, kind in list(found.text.items()):
        if value in kept.retained:
            excused = True
        elif any(c.isdigit() for c in value) or (kind == "person name" and "^" in value):
            excused = False
        else:
            excused = value in kept.coded or bool(_word(value).search(equipment))
        if excused:
            del found.text[value]
            found.redact_only.add(value)
    for value, kind in list(found.whole.items()):
        if kind not in ("date", "UID") and value.upper() not in found.text:  # its text twin was excused
            del found.whole[value]
    for value in [v for v in found.text if v in _OWN_VOCABULARY]:
        del found.text[value]
    for value in [v for v, k in found.whole.items() if v.upper() in _OWN_VOCABULARY or k == "UID" and _standard(v)]:
        del found.whole[value]  # our own words, and the standard's UIDs (SOP classes, transfer syntaxes)
    return found


def _collect(
    ds: Dataset,
    table: ProfileTable,
    options: ProfileOptions,
    found: Identifiers,
    kept: _Kept,
    tree: Action | None,
    exported: bool = True,
    codes_of: str = "",
) -> None:
    """Gather the identifying values of ``ds`` into ``found``, and into ``kept`` the values the profile
    keeps. ``exported``: False inside a sequence whose items do not go out (removed, emptied, its codes
    replaced, a private sequence the safe list does not keep): its values are still identifiers, but
    they excuse nothing. ``codes_of``: the code sequence the profile replaces (D) that holds ``ds``."""
    for elem in ds:
        if elem.tag.is_private and elem.VR == "SQ":  # its items as any; kept values only if safe-listed
            listed = _safe_listed(ds, elem.tag, options)
            for item in elem.value or []:
                _collect(item, table, options, found, kept, tree, exported and listed, codes_of)
            continue
        if (elem.tag.is_private and elem.VR not in ("DA", "DT")) or elem.tag.group == 0x0002:
            continue  # a private date (kept when safe-listed) is the patient's as a public one is
        action = resolve(int(elem.tag), elem.VR, table.code(elem.tag), options)
        if elem.VR == "SQ":
            inner = action if action in (Action.DUMMY, Action.CLEAN) else tree
            replaced = replaced_codes(elem.keyword, action)
            goes_out = exported and action not in (Action.REMOVE, Action.EMPTY) and not replaced
            for item in elem.value or []:
                _collect(item, table, options, found, kept, inner, goes_out, elem.keyword if replaced else codes_of)
            continue
        if elem.VR in _BINARY_VRS:
            continue
        keyword = elem.keyword or ""
        if codes_of and keyword in _REPLACED_CODE:
            _add_code(found, codes_of, _values(elem.value))
            continue
        if tree is not None and action is Action.KEEP and elem.VR in _FREE_TEXT_VRS | {"PN"}:
            action = tree  # free text and names of a content tree go (D) or are redacted (C), as the engine does
        if action is Action.KEEP:
            if not exported:
                continue
            values = {v.upper() for v in _values(elem.value)}
            if elem.VR in ("DA", "DT") and not elem.tag.is_private:  # an event's date, not a vendor's copy
                kept.dates |= {v.strip()[:8] for value in values for v in value.split("-")}
            if keyword in _EQUIPMENT or table.code(elem.tag) is not None:  # listed, kept: by an option
                kept.retained |= values
            elif keyword in _CODED:
                kept.coded |= values
            continue
        kind = _kind(keyword, elem.VR)
        for value in _values(elem.value):
            if elem.VR == "PN":
                found.add_text(value, kind)
                for part in _name_parts(value):
                    found.add_text(part, kind)
                    if _UNSPACED.search(part):
                        found.anywhere.add(part.upper())
            elif elem.VR in ("DA", "DT"):
                # The birth date is removed or emptied under every dates option (Full Dates keeps the
                # dates of events): a copy of it elsewhere (a vendor's private element, "DOB 19650312"
                # in kept text) is a leak under --dates full too (before, no date was collected then).
                birth = keyword == "PatientBirthDate"
                if options.dates is not DateOption.FULL or birth:
                    for part in value.split("-"):
                        if len(part.strip()) >= 6:
                            found.whole[part.strip()] = kind
                            if birth:
                                kept.birth.add(part.strip())
            elif elem.VR == "UI":
                if len(value) >= _MIN_TEXT:  # "0" in a broken reference identifies nobody
                    found.whole[value] = kind
            elif action is Action.CLEAN:
                continue  # kept after redaction: its own text is not an identifier
            elif elem.VR in _TEXT_VRS and (_IDENTIFYING.search(keyword) or elem.VR in _FREE_TEXT_VRS):
                if len(value) >= _MIN_TEXT:
                    found.add_text(value, kind)
                    found.whole[value] = kind
                    if _ID_KIND.search(kind) and len(value) >= _MIN_ID and any(c.isdigit() for c in value):
                        found.anywhere.add(value.upper())  # glued to other text too: "MRN998877" holds "998877"


def _add_code(found: Identifiers, kind: str, values: list[str]) -> None:
    """A code of a sequence the profile replaces (a staff ID "EMP4711", "Mercy General"): an identifier,
    named after its sequence unless the same value was found first in an attribute of its own."""
    for value in values:
        if len(value) >= _MIN_TEXT:
            found.add_text(value, kind, first=True)
            found.whole.setdefault(value, kind)
            if len(value) >= _MIN_ID and any(c.isdigit() for c in value):
                found.anywhere.add(value.upper())  # an ID glued to other text too


def _safe_listed(ds: Dataset, tag, options: ProfileOptions) -> bool:
    """Whether the site's safe list keeps private element ``tag`` of ``ds`` (as deid.py's _private does)."""
    if tag.is_private_creator or tag.element < 0x1000:
        return False
    creator = (tag.group << 16) | (tag.element >> 8)
    owner = str(ds[creator].value).strip() if creator in ds else ""
    return (owner, tag.element & 0xFF) in options.retain_safe_private


def scan(ds: Dataset, identifiers: Identifiers) -> list[Hit]:
    """Every element of ``ds`` (file meta and nested items included) that holds a source identifier."""
    hits: list[Hit] = []
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _scan(meta, identifiers, "file_meta.", hits)
    _scan(ds, identifiers, "", hits)
    return hits


# set by the de-identifier to the standard's fixed words (YES, MODIFIED, REMOVED...): a source
# value equal to one of them (a StudyID "REMOVED" from an earlier anonymizer) is no leak there
_DECLARATIONS = frozenset(
    {
        "PatientIdentityRemoved",
        "LongitudinalTemporalInformationModified",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",  # "Retain Patient Characteristics" is no patient "Patient^X"
    }
)


def _scan(ds: Dataset, ids: Identifiers, prefix: str, hits: list[Hit]) -> None:
    for elem in ds:
        if elem.keyword in _DECLARATIONS:
            continue
        name = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        path = prefix + name
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                _scan(item, ids, f"{path}[{i}].", hits)
            continue
        if elem.VR in _BINARY_VRS or isinstance(elem.value, bytes):  # bytes: also "OB or OW" not yet resolved
            if not _bulk(elem.tag, elem.VR) and isinstance(elem.value, bytes) and (kind := ids.binary_kind(elem.value)):
                hits.append(Hit(path, kind))
            continue
        for value in _values(elem.value):
            if elem.VR in _WHOLE_VRS:
                kind = ids.whole.get(value)
                if kind is None and elem.VR in ("DA", "DT") and "-" in value:
                    kind = next((ids.whole[p] for p in value.split("-") if p in ids.whole), None)
                if kind is None and elem.VR == "CS" and (glued := ids.glued().search(value.upper())):
                    kind = ids.kind_of(glued.group(0))
                if kind:
                    hits.append(Hit(path, kind))
                continue
            found = ids.pattern().search(value.upper())
            kind = ids.kind_of(found.group(0)) if found else None
            if kind:
                hits.append(Hit(path, kind))
