"""The prepared WADO-RS metadata of one series: the file format its writer and its readers share.

Written by the metadata sink (sinks/metadata.py) when a series completes or is amended; read by
WADO-RS (access/dicomweb) for ``/studies/{s}/metadata`` and ``/studies/{s}/series/{se}/metadata``.

One text file (path: ``layout.series_metadata_path``):

- line 1: a JSON header: the study and series, the aggregate revision it was prepared for, and the
  *index state* it was prepared from: how many instance documents the index held for the series
  and the greatest ``received_at`` among them (epoch milliseconds, as an OpenSearch ``max`` returns it);
- then one line per instance with a DICOM JSON header, in SOP Instance UID order:
  ``<SOPInstanceUID> <DICOM JSON>``, the JSON compact exactly as WADO-RS answers it, its BulkDataURIs
  under ``BASE_MARKER`` instead of the service's URL (which only a request knows).

Lines rather than one JSON array so that a study's answer is its series' lines merged by SOP
Instance UID (the order WADO-RS answers in) without parsing any DICOM JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any

__all__ = [
    "BASE_MARKER",
    "PreparedHeader",
    "encode_entry",
    "read_header",
    "read_entries",
    "with_base",
    "FORMAT",
    "absolute_bulk_uris",
    "index_state_request",
    "index_state",
]

FORMAT = 1
# Stands for the service's base URL in stored BulkDataURIs. It is only ever replaced right after
# '"BulkDataURI":"', a sequence no DICOM value can produce (its quotes would be escaped).
BASE_MARKER = "@@DICOMWEB-BASE@@"
_MARKED = b'"BulkDataURI":"' + BASE_MARKER.encode()


@dataclass(frozen=True)
class PreparedHeader:
    study_instance_uid: str
    series_instance_uid: str
    revision: int
    indexed_instances: int
    last_received_at_ms: float | None
    format: int = FORMAT

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode() + b"\n"

    def same_index_state(self, indexed_instances: int, last_received_at_ms: float | None) -> bool:
        return self.indexed_instances == indexed_instances and self.last_received_at_ms == last_received_at_ms


def index_state_request(study_instance_uid: str) -> dict[str, Any]:
    """The OpenSearch search body (on the instance index) whose answer ``index_state`` reads: per series
    of the study, how many instance documents the index holds and their greatest ``received_at``.

    Instance documents are never deleted, so a series whose count is unchanged holds the same instances;
    a replaced instance (conflict policy REPLACE) is re-indexed with a later ``received_at``.
    """
    return {
        "size": 0,
        "query": {"term": {"study_instance_uid": study_instance_uid}},
        "aggs": {
            "series": {
                "terms": {"field": "series_instance_uid", "size": 10000},
                "aggs": {"last": {"max": {"field": "received_at"}}},
            }
        },
    }


def index_state(response: dict[str, Any]) -> dict[str, tuple[int, float | None]]:
    """Series Instance UID -> (instance documents, latest received_at in epoch ms) from the answer."""
    buckets = response["aggregations"]["series"]["buckets"]
    return {b["key"]: (b["doc_count"], b["last"]["value"]) for b in buckets}


def absolute_bulk_uris(model: Any, base: str, _path: str = "") -> Any:
    """A DICOM JSON data set (tag -> element) with its BulkDataURIs stored relative (``studies/.../bulk/TAG``)
    made absolute under ``base``, those inside sequences too.

    Headers stored before BulkDataURIs carried paths name a value inside a sequence by its tag alone
    (``.../bulk/7FE00010`` for an icon's pixel data), a URI the bulk data route reads as the top-level
    element. Such a flat URI of a nested element is written here as its path (``.../bulk/00880200/0/7FE00010``,
    items from 0): the walk knows where each value is. A URI already a path, a top-level one and an
    absolute one are left as they are."""
    if isinstance(model, list):
        return [absolute_bulk_uris(v, base) for v in model]
    if not isinstance(model, dict):
        return model
    return {tag: _element_uris(element, base, f"{_path}{tag}") for tag, element in model.items()}


# The end of a BulkDataURI naming an element by its tag alone.
_FLAT = re.compile(r"/bulk/([0-9A-Fa-f]{8})$")


def _element_uris(element: Any, base: str, path: str) -> Any:
    if not isinstance(element, dict):
        return element
    out: dict[str, Any] = {}
    for key, value in element.items():
        if key == "BulkDataURI" and isinstance(value, str) and not value.startswith("http"):
            flat = _FLAT.search(value)
            if "/" in path and flat and flat.group(1).upper() == path.rpartition("/")[2].upper():
                value = value[: flat.start(1)] + path.upper()  # a nested value named by its tag alone
            out[key] = f"{base}/{value}"
        elif key == "Value" and isinstance(value, list):
            out[key] = [
                absolute_bulk_uris(item, base, f"{path}/{index}/") if isinstance(item, dict) else item
                for index, item in enumerate(value)
            ]
        else:
            out[key] = value
    return out


def encode_entry(sop_instance_uid: str, model: dict[str, Any]) -> bytes:
    """One instance's line; ``model`` has its BulkDataURIs already under BASE_MARKER."""
    return sop_instance_uid.encode() + b" " + json.dumps(model, separators=(",", ":")).encode() + b"\n"


def read_header(fh: IO[bytes]) -> PreparedHeader:
    """The header of an open prepared file (positioned at its start); ValueError if it is not one."""
    try:
        fields = json.loads(fh.readline())
        header = PreparedHeader(**fields)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a prepared metadata file: {exc}") from None
    if header.format != FORMAT:
        raise ValueError(f"prepared metadata format {header.format}, this version reads {FORMAT}")
    return header


def read_entries(fh: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(SOPInstanceUID, DICOM JSON bytes)`` of each instance line after the header, in file order."""
    for line in fh:
        sop, _, model = line.rstrip(b"\n").partition(b" ")
        yield sop.decode(), model


def with_base(models: Iterable[bytes], base: str) -> Iterator[bytes]:
    """The instance JSON with its BulkDataURIs under ``base`` (as WADO-RS makes the stored relative ones absolute)."""
    replacement = b'"BulkDataURI":"' + json.dumps(base)[1:-1].encode()
    # the marker and the "/" after it came from absolute_bulk_uris(model, BASE_MARKER)
    for model in models:
        yield model.replace(_MARKED, replacement)
