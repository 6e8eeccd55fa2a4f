"""Matchers (identifier.py) as OpenSearch query clauses over the instance index.

DICOM ``*`` and ``?`` are OpenSearch's wildcard characters too; only ``\\`` needs escaping (a DICOM
value cannot contain it: it separates values). Person names match case-insensitively (C.2.2.2.1:
an SCP may; every PACS does), other text exactly. Dates are ``yyyy-MM-dd`` date fields; times are
``HH:MM:SS(.F)`` keywords, so a range of times is a range of strings.
"""

from __future__ import annotations

from typing import Any

from diana.access.qr.identifier import Matcher, Query

__all__ = ["filters_for", "query_for"]


def _one(field: str, value: str, kind: str, wildcard: bool) -> dict[str, Any]:
    insensitive = kind == "pn"
    if wildcard:
        return {"wildcard": {field: {"value": value.replace("\\", "\\\\"), "case_insensitive": insensitive}}}
    if kind == "int":
        return {"term": {field: int(value)}}
    if insensitive:
        return {"term": {field: {"value": value, "case_insensitive": True}}}
    return {"term": {field: value}}


def clause(m: Matcher) -> dict[str, Any]:
    field, kind = m.attribute.index_field, m.attribute.kind
    if m.how == "range":
        bounds = {k: v for k, v in (("gte", m.low), ("lte", m.high)) if v is not None}
        return {"range": {field: bounds}}
    if m.how == "list":
        if kind == "uid":
            return {"terms": {field: list(m.values)}}
        return {
            "bool": {
                "should": [_one(field, v, kind, any(c in v for c in "*?")) for v in m.values],
                "minimum_should_match": 1,
            }
        }
    return _one(field, m.values[0], kind, m.how == "wildcard")


def filters_for(query: Query) -> list[dict[str, Any]]:
    return [clause(m) for m in query.matchers]


def query_for(query: Query) -> dict[str, Any]:
    filters = filters_for(query)
    return {"bool": {"filter": filters}} if filters else {"match_all": {}}
