"""The header of an object in the DICOM JSON model, bounded in size and tolerant of bad elements.

Devices send elements that cannot be decoded (a value whose length does not fit its VR, an
unknown character set...), and objects whose header alone is tens of megabytes (RT Structure
Sets, enhanced multi-frame functional groups, long SRs). Neither may refuse the object: the
archived object keeps every byte as it came in. The event's header is the part that can be
decoded and that fits its budget; every element left out is listed with its path and the reason,
so a consumer knows to read it from the archived object. Reasons never carry a value (patient data).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.errors import BytesLengthException

from diana.producers.raw_element_json import element_json, text_is_ascii_compatible

__all__ = ["Omitted", "HeaderModel", "build_header_model", "element_size"]

# Binary values over this many bytes are BulkDataURI references into the stored object.
BULK_DATA_THRESHOLD = 1024
# Binary VRs whose value a BulkDataURI stands for without reading it (PS3.18 F.2.7; UN is not here:
# pydicom may give it a known VR, so it takes pydicom's path).
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})


@dataclass(frozen=True)
class Omitted:
    """An element left out of the event's header. ``path``: tags and item indexes, e.g. ``0040A730/3/0040A30A``."""

    path: str
    reason: str

    def as_record(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class HeaderModel:
    json: str | None
    omitted: tuple[Omitted, ...]
    # The top-level elements of ``json`` by tag (``"00100020"``), as Python values.
    elements: dict[str, Any]


def element_size(raw: object) -> int:
    """Encoded size of an element's value, without decoding it."""
    if isinstance(raw, RawDataElement):
        if raw.value is not None:
            return len(raw.value)
        return 0 if raw.length == 0xFFFFFFFF else raw.length
    value = getattr(raw, "value", None)
    return len(value) if isinstance(value, bytes | str) else 0


def unread_bulk_vr(raw: object) -> str | None:
    """The VR of a top-level binary value pydicom deferred (its value still in the file), which a
    BulkDataURI references unread; None for any other element. Only a VR the element states (explicit
    VR) or the dictionary gives alone: "OB or OW" takes pydicom's path."""
    if not isinstance(raw, RawDataElement) or raw.value is not None or raw.length == 0xFFFFFFFF:
        return None
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    return str(vr) if vr in _BULK_VRS else None


def _reason(exc: Exception, raw: object) -> str:
    vr = getattr(raw, "VR", None) or "?"
    size = element_size(raw)
    if isinstance(exc, BytesLengthException):
        return f"undecodable: a value of {size} bytes does not fit VR {vr}"
    # The exception's text may quote the value: only its kind is kept.
    return f"undecodable: {type(exc).__name__} while decoding VR {vr} ({size} bytes)"


_SPECIFIC_CHARACTER_SET = 0x00080005


def _text_ok(ds: pydicom.Dataset, inherited: bool) -> bool:
    """Whether this data set's text values may be read as ASCII (raw_element_json.py); an item
    without a SpecificCharacterSet of its own has its parent's."""
    if _SPECIFIC_CHARACTER_SET not in ds:
        return inherited
    try:
        return text_is_ascii_compatible(ds[_SPECIFIC_CHARACTER_SET].value)
    except Exception:  # an undecodable character set: every text value takes pydicom's path
        return False


class _Builder:
    def __init__(self, bulk_base: str):
        self.bulk_base = bulk_base
        self.omitted: list[Omitted] = []

    def tag_uri(self, prefix: str) -> Callable[[int], str]:
        """The BulkDataURI of an element of the data set at ``prefix`` (``""`` at the top level, else
        ``TAG/ITEM/``): its full path, the form the bulk data route takes (access/dicomweb/wado.py
        bulk_steps). A nested value named by its tag alone would name the top-level element of that tag
        (an icon's pixel data would be answered with the image's)."""
        return lambda tag: f"{self.bulk_base}/{prefix}{tag:08X}"

    def dataset(self, ds: pydicom.Dataset, prefix: str, skip: set[int], text_ok: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        text_ok = _text_ok(ds, text_ok)
        uri = self.tag_uri(prefix)
        for tag in list(ds.keys()):  # keys: iterating a Dataset yields elements, not tags
            if tag in skip:
                continue
            raw = ds.get_item(tag, keep_deferred=True)
            if vr := unread_bulk_vr(raw):
                out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": uri(int(tag))}  # deferred: left in the file
                continue
            if isinstance(raw, RawDataElement) and raw.value is None:
                raw = ds.get_item(tag)  # another deferred value (a long text): read now, as before
            # Most elements: their JSON straight from the bytes, as pydicom would render it.
            fast = element_json(raw, text_ok, uri, BULK_DATA_THRESHOLD)
            if fast is not None:
                out[f"{tag:08X}"] = fast
                continue
            path = f"{prefix}{tag:08X}"
            try:
                elem = ds[tag]
                if elem.VR == "SQ":
                    items = [self.dataset(item, f"{path}/{i}/", set(), text_ok) for i, item in enumerate(elem.value)]
                    out[f"{tag:08X}"] = {"vr": "SQ", "Value": items}
                else:
                    model = elem.to_json_dict(lambda e: uri(int(e.tag)), BULK_DATA_THRESHOLD)
                    json.dumps(model, allow_nan=False)  # NaN or an unserialisable value fails here, alone
                    out[f"{tag:08X}"] = model
            except Exception as exc:  # pydicom raises many kinds on odd values; one element never sinks the rest
                self.omitted.append(Omitted(path, _reason(exc, raw)))
        return out


def build_header_model(
    ds: pydicom.Dataset,
    bulk_base: str,
    budget_bytes: int,
    pixel_data_vr: str | None,
) -> HeaderModel:
    """The header (no pixel data) as DICOM JSON of at most about ``budget_bytes``.

    Elements too large for the budget are never decoded (a 25 MB contour sequence is skipped
    by its encoded length); if what remains is still over budget, the largest top-level
    elements are left out until it fits. ``pixel_data_vr``: the object has pixel data, referenced.
    """
    builder = _Builder(bulk_base)
    skip: set[int] = set()
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        size = element_size(raw)
        if size > budget_bytes and not unread_bulk_vr(raw):
            skip.add(int(tag))
            builder.omitted.append(
                Omitted(f"{tag:08X}", f"too large: {size} encoded bytes, over the event's header budget")
            )
    model = builder.dataset(ds, "", skip)
    if pixel_data_vr is not None:
        model["7FE00010"] = {"vr": pixel_data_vr, "BulkDataURI": f"{bulk_base}/7FE00010"}
    text = json.dumps(model, separators=(",", ":"), sort_keys=True, allow_nan=False)
    # The sum of the per-element sizes below is len(text) - 1: most headers fit, and need no more.
    if len(text) - 1 > budget_bytes:
        sizes = {key: len(json.dumps(value, separators=(",", ":"))) + len(key) + 4 for key, value in model.items()}
        total = sum(sizes.values())
        for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
            if total <= budget_bytes:
                break
            del model[key]
            total -= sizes[key]
            builder.omitted.append(
                Omitted(key, f"too large: {sizes[key]} bytes of JSON, over the event's header budget")
            )
        text = json.dumps(model, separators=(",", ":"), sort_keys=True, allow_nan=False)
    return HeaderModel(text, tuple(sorted(set(builder.omitted), key=lambda o: o.path)), model)
