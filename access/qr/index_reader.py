"""Answers a Query from the OpenSearch instance index: the matches of a level, and the instances to retrieve.

Every level is answered from ``<prefix>-instances`` (one document per instance, always current):
PATIENT, STUDY and SERIES matches are the groups of matching instances (a composite aggregation,
paged), and for each page a second request computes the optional keys over *all* the group's
instances (ModalitiesInStudy must list every modality of a study, not only the one that matched).
Return values come from the DICOM JSON header stored unmapped under ``dicom`` in each document;
``header`` (element tags as 8 hex digits) names the ones the caller reads, so that OpenSearch sends
only those, not every match's whole header.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from opensearchpy import OpenSearch

from diana.access.qr.identifier import Query
from diana.access.qr.opensearch_query import query_for
from diana.schemas.layout import IndexLayout

__all__ = ["IndexReader", "Match", "GROUP_FIELD"]

GROUP_FIELD = {"PATIENT": "patient_id", "STUDY": "study_instance_uid", "SERIES": "series_instance_uid"}
PAGE = 500
# Page of a retrieval's instance list (a few UIDs each; under OpenSearch's max_result_window of
# 10,000): a 1,000-instance series in one request, not three.
RETRIEVE_PAGE = 5000
# What is read of OpenSearch's answers (``filter_path``): the rest is not sent.
_AGGREGATIONS = ["aggregations"]
_HITS = ["hits.hits._source", "hits.hits.sort"]
_HIT_FIELDS = ["hits.hits.fields", "hits.hits.sort"]
# Matching keys whose value differs between the instances of one study.
_VARYING = {"ModalitiesInStudy", "SOPClassesInStudy"}
# Typed fields read back when a document has no DICOM JSON header (pydicom could not express one).
FALLBACK_FIELDS = [
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "study_instance_uid",
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "study_description",
    "referring_physician_name",
    "series_instance_uid",
    "modality",
    "series_number",
    "series_description",
    "body_part_examined",
    "sop_instance_uid",
    "sop_class_uid",
    "instance_number",
    "number_of_frames",
]
RETRIEVE_FIELDS = [
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
]
# A scan of these fields only reads them from their doc values rather than from each document's stored
# source, which OpenSearch must decompress and filter hit by hit (a 1,000-instance series' UIDs: about
# a third less time, docs/PERFORMANCE.md): keywords of one value each (sinks/templates/instances.json).
_DOC_VALUE_FIELDS = frozenset(RETRIEVE_FIELDS)


class Match:
    """One match: a representative instance document and the values computed over its group."""

    __slots__ = ("document", "computed")

    def __init__(self, document: dict[str, Any], computed: dict[str, Any]):
        self.document = document
        self.computed = computed


def _source(header: list[str] | None) -> list[str]:
    """The document fields a match is read from: the header's elements ``header`` (all when None)."""
    return ["dicom", *FALLBACK_FIELDS] if header is None else [*(f"dicom.{tag}" for tag in header), *FALLBACK_FIELDS]


def _group_aggs(level: str, header: list[str] | None = None) -> dict[str, Any]:
    exact = {"precision_threshold": 40000}
    aggs: dict[str, Any] = {"first": {"top_hits": {"size": 1, "_source": _source(header)}}}
    if level == "PATIENT":
        aggs["studies"] = {"cardinality": {"field": "study_instance_uid", **exact}}
        aggs["series"] = {"cardinality": {"field": "series_instance_uid", **exact}}
    elif level == "STUDY":
        aggs["series"] = {"cardinality": {"field": "series_instance_uid", **exact}}
        aggs["modalities"] = {"terms": {"field": "modality", "size": 64}}
        aggs["sop_classes"] = {"terms": {"field": "sop_class_uid", "size": 256}}
    return aggs


def _computed(level: str, bucket: dict[str, Any]) -> dict[str, Any]:
    count = bucket["doc_count"]
    if level == "PATIENT":
        return {
            "NumberOfPatientRelatedStudies": bucket["studies"]["value"],
            "NumberOfPatientRelatedSeries": bucket["series"]["value"],
            "NumberOfPatientRelatedInstances": count,
        }
    if level == "STUDY":
        return {
            "NumberOfStudyRelatedSeries": bucket["series"]["value"],
            "NumberOfStudyRelatedInstances": count,
            "ModalitiesInStudy": sorted(b["key"] for b in bucket["modalities"]["buckets"]),
            "SOPClassesInStudy": sorted(b["key"] for b in bucket["sop_classes"]["buckets"]),
        }
    return {"NumberOfSeriesRelatedInstances": count}


class IndexReader:
    def __init__(self, client: OpenSearch, prefix: str):
        self.client = client
        self.index = IndexLayout(prefix).alias("instances")

    def find(
        self,
        query: Query,
        limit: int,
        cancelled: Callable[[], bool] = lambda: False,
        header: list[str] | None = None,
    ) -> Iterator[Match]:
        """The matches of ``query`` at its level, at most ``limit``, in UID (or Patient ID) order; of each
        match's header only the elements ``header`` (8 hex digits each), or all of it when None."""
        if query.level == "IMAGE":
            for doc in self._scan(query_for(query), _source(header), limit):
                yield Match(doc, {})
            return
        field = GROUP_FIELD[query.level]
        # Keys that differ between the instances of one match (ModalitiesInStudy: the study matches if
        # any instance does) need a second request for the values over all instances; otherwise every
        # instance of a matching group matches, and one request answers the page.
        varying = any(m.attribute.keyword in _VARYING for m in query.matchers)
        found = 0
        after = None
        while found < limit and not cancelled():
            composite: dict[str, Any] = {
                "size": min(PAGE, limit - found),
                "sources": [{"key": {"terms": {"field": field}}}],
            }
            if after:
                composite["after"] = after
            groups: dict[str, Any] = {"composite": composite}
            if not varying:
                groups["aggs"] = _group_aggs(query.level, header)
            body = {"size": 0, "query": query_for(query), "aggs": {"groups": groups}}
            page = self.client.search(index=self.index, body=body, filter_path=_AGGREGATIONS)["aggregations"]["groups"]
            keys = [b["key"]["key"] for b in page["buckets"]]
            if not keys:
                return
            if varying:
                yield from self._groups(query.level, field, keys, header)
            else:
                for bucket in page["buckets"]:
                    yield Match(bucket["first"]["hits"]["hits"][0]["_source"], _computed(query.level, bucket))
            found += len(keys)
            after = page.get("after_key")
            if not after:
                return

    def _groups(self, level: str, field: str, keys: list[str], header: list[str] | None) -> Iterator[Match]:
        body = {
            "size": 0,
            "query": {"terms": {field: keys}},
            "aggs": {
                "groups": {
                    "terms": {"field": field, "size": len(keys), "order": {"_key": "asc"}},
                    "aggs": _group_aggs(level, header),
                }
            },
        }
        answer = self.client.search(index=self.index, body=body, filter_path=_AGGREGATIONS)
        buckets = answer["aggregations"]["groups"]["buckets"]
        for bucket in buckets:
            yield Match(bucket["first"]["hits"]["hits"][0]["_source"], _computed(level, bucket))

    def instances(self, query: Query, limit: int) -> list[dict[str, Any]]:
        """The instances a C-MOVE/C-GET of ``query`` sends (at most ``limit``)."""
        return list(self._scan(query_for(query), RETRIEVE_FIELDS, limit, RETRIEVE_PAGE))

    def count(self, query: Query) -> int:
        """How many instance documents match ``query``."""
        return int(self.client.count(index=self.index, body={"query": query_for(query)})["count"])

    def documents(self, query: Query, source: list[str], limit: int, page: int = PAGE) -> Iterator[dict[str, Any]]:
        """The instance documents matching ``query`` (fields ``source``), in SOP Instance UID order,
        asked ``page`` at a time (RETRIEVE_PAGE for a few small fields each)."""
        return self._scan(query_for(query), source, limit, page)

    def _scan(
        self, os_query: dict[str, Any], source: list[str], limit: int, page: int = PAGE
    ) -> Iterator[dict[str, Any]]:
        after = None
        found = 0
        doc_values = bool(source) and _DOC_VALUE_FIELDS.issuperset(source)
        while found < limit:
            body: dict[str, Any] = {
                "size": min(page, limit - found),
                "query": os_query,
                "sort": [{"sop_instance_uid": "asc"}],
            }
            if doc_values:
                body["_source"] = False
                body["docvalue_fields"] = source
            else:
                body["_source"] = source
            if after:
                body["search_after"] = after
            # Without the hits' _index, _id and _score: less JSON to send and decode per page.
            answer = self.client.search(index=self.index, body=body, filter_path=_HIT_FIELDS if doc_values else _HITS)
            hits = answer.get("hits", {}).get("hits", [])
            if not hits:
                return
            if doc_values:  # each field as a list of its values; these keywords have one
                for hit in hits:
                    yield {name: values[0] for name, values in hit.get("fields", {}).items() if values}
            else:
                for hit in hits:
                    yield hit.get("_source", {})
            found += len(hits)
            if len(hits) < body["size"]:
                return  # a short page is the last: no request that would answer nothing
            after = hits[-1]["sort"]
