"""Reading an SR content tree by coded concepts (CodeValue + CodingSchemeDesignator), never by text.

A concept may have several codes: SNOMED codes moved from the SRT scheme to SCT (and a few
reports say SNM3), so a ``Concept`` holds every spelling that means the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom import Dataset

from diana.stream_apps.dose.units import UnitError, convert

__all__ = ["Concept", "Item", "DCM"]


@dataclass(frozen=True)
class Concept:
    codes: frozenset[tuple[str, str]]
    name: str  # for messages and docs only; never compared

    def __contains__(self, code: tuple[str, str] | None) -> bool:
        return code is not None and code in self.codes

    def __str__(self) -> str:
        return " / ".join(f"({v}, {s})" for v, s in sorted(self.codes))


def DCM(value: str, name: str) -> Concept:
    return Concept(frozenset({(value, "DCM")}), name)


def SNOMED(srt: str, sct: str, name: str) -> Concept:
    return Concept(frozenset({(srt, "SRT"), (srt, "SNM3"), (sct, "SCT")}), name)


def _code(seq) -> tuple[str, str] | None:
    if not seq:
        return None
    item = seq[0]
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    scheme = item.get("CodingSchemeDesignator")
    return (str(value).strip(), str(scheme).strip()) if value and scheme else None


class Item:
    """One content item and its children."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    @property
    def concept(self) -> tuple[str, str] | None:
        return _code(self.ds.get("ConceptNameCodeSequence"))

    @property
    def value_type(self) -> str:
        return str(self.ds.get("ValueType", ""))

    def children(self) -> list[Item]:
        return [Item(child) for child in self.ds.get("ContentSequence") or []]

    def all(self, concept: Concept) -> list[Item]:
        return [child for child in self.children() if child.concept in concept]

    def first(self, concept: Concept) -> Item | None:
        return next(iter(self.all(concept)), None)

    def descendants(self) -> Iterator[Item]:
        for child in self.children():
            yield child
            yield from child.descendants()

    def deep(self, concept: Concept) -> Item | None:
        """The first descendant with this concept: vendors nest some values one container deeper."""
        return next((item for item in self.descendants() if item.concept in concept), None)

    # ---- values of the first child (or, with deep=True, descendant) with a concept
    def _find(self, concept: Concept, deep: bool) -> Item | None:
        return self.deep(concept) if deep else self.first(concept)

    def num(self, concept: Concept, quantity: str, deep: bool = False) -> float | None:
        item = self._find(concept, deep)
        return None if item is None else item.number(quantity)

    def text(self, concept: Concept, deep: bool = False) -> str | None:
        item = self._find(concept, deep)
        if item is None:
            return None
        value = item.ds.get("TextValue")
        return str(value).strip() or None if value is not None else None

    def uid(self, concept: Concept, deep: bool = False) -> str | None:
        item = self._find(concept, deep)
        value = None if item is None else item.ds.get("UID")
        return str(value).strip() or None if value else None

    def datetime(self, concept: Concept, deep: bool = False) -> str | None:
        item = self._find(concept, deep)
        value = None if item is None else item.ds.get("DateTime")
        return str(value).strip() or None if value else None

    def code(self, concept: Concept, deep: bool = False) -> tuple[str, str] | None:
        item = self._find(concept, deep)
        return None if item is None else item.value_code

    def meaning(self, concept: Concept, deep: bool = False) -> str | None:
        """The CodeMeaning of a CODE item's value, as the report spells it (for display only)."""
        item = self._find(concept, deep)
        return None if item is None else item.value_meaning

    # ---- this item's own value
    @property
    def value_code(self) -> tuple[str, str] | None:
        return _code(self.ds.get("ConceptCodeSequence"))

    @property
    def value_meaning(self) -> str | None:
        seq = self.ds.get("ConceptCodeSequence")
        if not seq:
            return None
        meaning = seq[0].get("CodeMeaning")
        return str(meaning).strip() or None if meaning is not None else None

    def number(self, quantity: str) -> float | None:
        """The NUM value in the canonical unit of ``quantity``; None if absent or in a foreign unit."""
        measured = self.ds.get("MeasuredValueSequence")
        if not measured:
            return None
        raw, units = measured[0].get("NumericValue"), _code(measured[0].get("MeasurementUnitsCodeSequence"))
        if raw is None or raw == "" or units is None:
            return None
        try:
            value = float(raw)
            if value != value or abs(value) == float("inf"):
                return None
            return convert(value, units[0], quantity)
        except (TypeError, ValueError, UnitError):
            return None
