"""PS3.15 Annex E Table E.1-1, Basic Profile column: the action code of each attribute.

The table is not written here: it is read from the `dicom-anonymizer` package (KitwareMedical,
BSD), which ships the standard's table per edition as Python lists, one list per action code
(`dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py` is DICOM 2026c). The
edition and the package version are recorded in every exported object (DeidentificationMethod)
and in the export report, so a reviewer can check the table against the standard.

No package we could install ships the option columns of the table for Python 3.11 under a
licence compatible with ours (see docs/COHORT.md); the options are applied by the rules of
PS3.15 E.3 in `deid_options.py`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass

from pydicom.tag import BaseTag, Tag

__all__ = ["EDITION", "TABLE_PACKAGE", "TABLE_SOURCE", "ProfileTable", "basic_profile"]

EDITION = "2026c"
_MODULE = f"dicomanonymizer.dicom_anonymization_databases.dicomfields_{EDITION}"
# list name in the package -> action code as the standard writes it
_LISTS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
TABLE_PACKAGE = f"dicom-anonymizer {importlib.metadata.version('dicom-anonymizer')}"
TABLE_SOURCE = f"DICOM PS3.15 {EDITION} Table E.1-1 ({TABLE_PACKAGE})"


@dataclass(frozen=True)
class _Masked:
    """A repeating-group row, e.g. Overlay Data (60xx,3000): tag & mask == value."""

    group: int
    element: int
    group_mask: int
    element_mask: int
    code: str

    def matches(self, tag: BaseTag) -> bool:
        return (tag.group & self.group_mask) == self.group and (tag.element & self.element_mask) == self.element


class ProfileTable:
    """Tag -> Basic Profile action code ("D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*")."""

    def __init__(self, rows: dict[int, str], masked: list[_Masked], source: str):
        self._rows = rows
        self._masked = masked
        self.source = source

    def code(self, tag: int) -> str | None:
        """The Basic Profile action code of ``tag``, or None when the table does not list it (keep)."""
        found = self._rows.get(int(tag))
        if found is not None:
            return found
        t = Tag(tag)
        for row in self._masked:
            if row.matches(t):
                return row.code
        return None

    def __len__(self) -> int:
        return len(self._rows) + len(self._masked)

    def tags(self) -> dict[int, str]:
        """The single-tag rows (repeating groups excluded)."""
        return dict(self._rows)


def basic_profile() -> ProfileTable:
    module = importlib.import_module(_MODULE)
    rows: dict[int, str] = {}
    masked: list[_Masked] = []
    for name, code in _LISTS.items():
        for entry in getattr(module, name):
            if len(entry) == 2:
                rows[int(Tag(entry[0], entry[1]))] = code
            else:
                group, element, group_mask, element_mask = entry
                masked.append(_Masked(group, element, group_mask, element_mask, code))
    if len(rows) < 500:  # the 2026c table has ~650 rows: a truncated import must not pass silently
        raise RuntimeError(f"{_MODULE} holds only {len(rows)} rows: the Annex E table is incomplete")
    return ProfileTable(rows, masked, TABLE_SOURCE)
