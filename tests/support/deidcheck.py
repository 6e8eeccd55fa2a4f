"""Checks a de-identified object attribute by attribute against its Table E.1-1 action."""

from __future__ import annotations

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from diana.access.dateshift import shift_value
from diana.access.deid import Deidentifier
from diana.access.deid_options import Action, resolve

__all__ = ["check_actions"]

_SET_BY_US = {
    "PatientName",
    "PatientID",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
}


def _empty(value) -> bool:
    return value is None or value == "" or (isinstance(value, (list, MultiValue, Sequence)) and len(value) == 0)


def _as_list(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]


def check_actions(source: Dataset, out: Dataset, d: Deidentifier, days: int) -> int:
    """Assert each top-level attribute of ``source`` got its action; return how many were checked."""
    checked = 0
    for elem in source:
        if elem.tag.is_private or elem.tag.group == 0x0002 or elem.keyword in _SET_BY_US or elem.tag.element == 0:
            # group lengths (gggg,0000) are retired and dropped when pydicom writes the file
            continue
        action = resolve(int(elem.tag), elem.VR, d.table.code(elem.tag), d.options)
        got = out.get(elem.tag)
        name = f"{elem.keyword or elem.tag} ({d.table.code(elem.tag)} -> {action.value})"
        checked += 1
        if action is Action.REMOVE:
            assert got is None, f"{name} should be removed"
        elif action is Action.KEEP:
            if elem.VR == "SQ":
                assert got is not None and len(got.value) == len(elem.value), name
            else:
                assert got is not None and got.value == elem.value, f"{name} should be kept"
        elif action is Action.EMPTY:
            assert got is not None and _empty(got.value), f"{name} should be empty"
        elif action is Action.DUMMY:
            if elem.VR in ("OB", "OW", "UN", "AT") and got is None:
                continue  # binary dummies are removed: nothing identifying can be written in their place
            assert got is not None, f"{name} should be replaced"
            if elem.VR == "SQ":
                assert len(got.value) == len(elem.value), name
            elif not _empty(elem.value):
                assert not _empty(got.value) and got.value != elem.value, f"{name} should be a dummy"
        elif action is Action.UID:
            assert got is not None, name
            if elem.VR == "UI":
                assert _as_list(got.value) == [d.keys.uid(v) for v in _as_list(elem.value)], f"{name} UID mapping"
        elif action is Action.CLEAN and elem.VR in ("OB", "OW", "UN"):
            assert got is None, f"{name}: bytes cannot be cleaned, so they are removed"
        elif action is Action.CLEAN:
            assert got is not None, f"{name} should be kept, cleaned"
            if elem.VR in ("DA", "DT", "TM"):
                assert _as_list(got.value) == [shift_value(v, elem.VR, days) for v in _as_list(elem.value)], name
            elif elem.VR == "PN":
                assert got.value != elem.value, name
    return checked
