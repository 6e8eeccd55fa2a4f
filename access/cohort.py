"""Cohort discovery: the studies whose instances match filters people use, from the OpenSearch index.

Filters run on the instance index (every header field a study's objects carry), so "CT of the
chest from station X" finds studies with at least one such instance; a dose filter runs on
`diana-dose-studies` and keeps the studies above the value. The result is one row per study.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from typing import Any, TextIO

from opensearchpy import OpenSearch

from diana.schemas.layout import IndexLayout
from diana.spreadsheet_csv import COHORT_FIND_COLUMNS, quote_cell

__all__ = [
    "CohortError",
    "CohortFilter",
    "find_studies",
    "FoundStudies",
    "study_instance_batches",
    "count_instances",
    "write_rows",
    "FILTER_FIELDS",
    "DOSE_METRICS",
    "parse_dose_above",
]

# filter option -> field of the instance index it reads
FILTER_FIELDS = {
    "modality": "modality",
    "body_part": "body_part_examined",
    "station": "station_name",
    "manufacturer": "manufacturer",
    "calling_ae": "calling_ae",
    "sex": "patient_sex",
    "description": "study_description, series_description, protocol_name (words)",
    "date_from": "study_date",
    "date_to": "study_date",
    "age_min": "patient_age_years",
    "age_max": "patient_age_years",
    "dose_above": "diana-dose-studies: METRIC=VALUE",
}
DOSE_METRICS = (
    "total_dlp_mGycm",
    "max_ctdivol_mGy",
    "total_dap_Gym2",
    "dose_rp_total_mGy",
    "agd_left_mGy",
    "agd_right_mGy",
    "administered_activity_MBq",
    "fluoro_time_s",
)
COLUMNS = COHORT_FIND_COLUMNS


class CohortError(ValueError):
    """A filter that cannot be used; the message names the valid fields or forms."""


@dataclass
class CohortFilter:
    modality: list[str] = field(default_factory=list)
    body_part: list[str] = field(default_factory=list)
    station: list[str] = field(default_factory=list)
    manufacturer: list[str] = field(default_factory=list)
    calling_ae: list[str] = field(default_factory=list)
    sex: list[str] = field(default_factory=list)
    description: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    age_min: float | None = None
    age_max: float | None = None
    dose_above: list[tuple[str, float]] = field(default_factory=list)

    def validate(self) -> None:
        """Refuse what cannot be used; the dates are rewritten as ISO dates (2024-03-15), the form the
        index holds: date.fromisoformat also reads 20240315 (DICOM's DA), which sent as it is was not
        compared as the same day. A comma list of codes (`--modality CT,MR`) becomes its values."""
        for name in COMMA_LISTS:
            values = []
            for value in getattr(self, name):
                pieces = [v.strip() for v in value.split(",") if v.strip()]
                if not pieces:  # dropped, it left the option without a value: every study matched
                    raise CohortError(
                        f"--{name.replace('_', '-')} {value!r}: no value; leave the option out to match any"
                    )
                values += pieces
            setattr(self, name, values)
        days: dict[str, date] = {}
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None:
                try:
                    days[name] = date.fromisoformat(value)
                except ValueError:
                    raise CohortError(f"--{name.replace('_', '-')} {value!r} is not a date like 2024-03-15") from None
                setattr(self, name, days[name].isoformat())
        if len(days) == 2 and days["date_from"] > days["date_to"]:
            raise CohortError(f"--date-from {self.date_from} is after --date-to {self.date_to}")
        if self.age_min is not None and self.age_max is not None and self.age_min > self.age_max:
            raise CohortError(f"--age-min {self.age_min:g} is above --age-max {self.age_max:g}")
        bad_sex = [s for s in self.sex if s.upper() not in ("M", "F", "O")]
        if bad_sex:
            raise CohortError(f"--sex {bad_sex[0]!r}: use M, F or O")


def parse_dose_above(text: str) -> tuple[str, float]:
    metric, _, value = text.partition("=")
    if metric not in DOSE_METRICS:
        raise CohortError(
            f"--dose-above {text!r}: the metric must be one of {', '.join(DOSE_METRICS)} "
            f"(e.g. --dose-above total_dlp_mGycm=500)"
        )
    try:
        return metric, float(value)
    except ValueError:
        raise CohortError(f"--dose-above {text!r}: {value!r} is not a number (e.g. total_dlp_mGycm=500)") from None


# Filters of DICOM code strings (CS: letters, digits, space, underscore; never a comma): `--modality CT,MR`
# is two values. A station, manufacturer or AE title may hold a comma ("Hologic, Inc."): repeat those.
COMMA_LISTS = ("modality", "body_part", "sex")
WILDCARDS = ("*", "?")


def _value_clause(field_name: str, value: str) -> dict:
    """One value of a term filter: exact, or with `*` (any characters) or `?` (one) a wildcard pattern,
    as a C-FIND's; both case-insensitive."""
    kind = "wildcard" if any(w in value for w in WILDCARDS) else "term"
    return {kind: {field_name: {"value": value, "case_insensitive": True}}}


def _any_of(field_name: str, values: list[str]) -> dict:
    return {"bool": {"should": [_value_clause(field_name, v) for v in values], "minimum_should_match": 1}}


def _scan(client: OpenSearch, index: str, query: dict, sort_field: str, source: list[str]):
    """Every matching document's _source, a page of 1000 at a time (search_after on a unique field)."""
    after = None
    while True:
        body: dict[str, Any] = {"size": 1000, "query": query, "sort": [{sort_field: "asc"}], "_source": source}
        if after:
            body["search_after"] = after
        hits = client.search(index=index, body=body)["hits"]["hits"]
        if not hits:
            return
        yield from (h["_source"] for h in hits)
        after = hits[-1]["sort"]


# Study UIDs per `terms` query: OpenSearch refuses more than index.max_terms_count (65,536 by default),
# and a smaller query is answered sooner.
TERMS_BATCH = 10_000


def _study_date_range(f: CohortFilter) -> dict | None:
    if not (f.date_from or f.date_to):
        return None
    return {"range": {"study_date": {k: v for k, v in (("gte", f.date_from), ("lte", f.date_to)) if v}}}


def _dose_studies(client: OpenSearch, prefix: str, f: CohortFilter) -> list[str]:
    """The UIDs of the dose studies over every --dose-above value within the date range. Not filtered by
    modality: a dose study's modality is its dose report's kind, not necessarily its images'."""
    filters: list[dict] = [{"range": {metric: {"gt": value}}} for metric, value in f.dose_above]
    dated = _study_date_range(f)
    if dated:
        # A dose study without a study date may still belong: its instances' date is checked afterwards.
        filters.append({"bool": {"should": [dated, {"bool": {"must_not": {"exists": {"field": "study_date"}}}}]}})
    scanned = _scan(
        client,
        IndexLayout(prefix).alias("dose-studies"),
        {"bool": {"filter": filters}},
        "study_instance_uid",
        ["study_instance_uid"],
    )
    return list(dict.fromkeys(d["study_instance_uid"] for d in scanned))


def _instance_queries(client: OpenSearch, prefix: str, f: CohortFilter) -> list[dict]:
    """The instance index queries whose studies together are the cohort: one, or one per batch of
    the dose studies' UIDs (none when no dose study qualifies)."""
    filters: list[dict] = []
    for name, field_name in (
        ("modality", "modality"),
        ("body_part", "body_part_examined"),
        ("station", "station_name"),
        ("manufacturer", "manufacturer"),
        ("calling_ae", "calling_ae"),
        ("sex", "patient_sex"),
    ):
        values = getattr(f, name)
        if values:
            filters.append(_any_of(field_name, values))
    if f.description:
        filters.append(
            {
                "multi_match": {
                    "query": f.description,
                    "operator": "and",
                    # every word, each in any of the fields ("low" in the study's description, "dose"
                    # in the protocol); the default (best_fields) wanted all the words in one field
                    "type": "cross_fields",
                    "fields": ["study_description", "series_description", "protocol_name"],
                }
            }
        )
    dated = _study_date_range(f)
    if dated:
        filters.append(dated)
    if f.age_min is not None or f.age_max is not None:
        filters.append(
            {
                "range": {
                    "patient_age_years": {k: v for k, v in (("gte", f.age_min), ("lte", f.age_max)) if v is not None}
                }
            }
        )
    if not f.dose_above:
        return [{"bool": {"filter": filters}} if filters else {"match_all": {}}]
    uids = _dose_studies(client, prefix, f)
    return [
        {"bool": {"filter": [*filters, {"terms": {"study_instance_uid": uids[start : start + TERMS_BATCH]}}]}}
        for start in range(0, len(uids), TERMS_BATCH)
    ]


@dataclass
class FoundStudies:
    """The studies found, earliest study date first, and whether more matched than the limit allowed."""

    rows: list[dict]
    more_match: bool


# Composite keys: study date first (a study without one first of all), then UID, so that a result cut
# at the limit keeps the earliest studies, the same ones each time. These buckets only pick the studies:
# a study whose instances carry several dates is in several, so the kept ones are counted afterwards.
_DATE_STUDY_KEYS = [
    {"date": {"terms": {"field": "study_date", "missing_bucket": True, "order": "asc"}}},
    {"study": {"terms": {"field": "study_instance_uid", "order": "asc"}}},
]
_STUDY_KEYS = [{"study": {"terms": {"field": "study_instance_uid", "order": "asc"}}}]
_STUDY_AGGS = {
    "modalities": {"terms": {"field": "modality", "size": 20}},
    "stations": {"terms": {"field": "station_name", "size": 20}},
    "series": {"cardinality": {"field": "series_instance_uid"}},
    "first": {
        "top_hits": {
            "size": 1,
            # The earliest dated instance: its date is the study's, and an instance indexed without its
            # header (no date, no accession) is the study's row only when it has nothing else.
            "sort": [{"study_date": {"order": "asc", "missing": "_last"}}],
            "_source": [
                "study_date",
                "accession_number",
                "patient_id",
                "patient_sex",
                "patient_age_years",
                "study_description",
            ],
        }
    },
}


def _study_row(bucket: dict) -> dict:
    first = bucket["first"]["hits"]["hits"][0]["_source"]
    return {
        "study_instance_uid": bucket["key"]["study"],
        **{k: first.get(k) for k in COLUMNS if k in first},
        "modalities": "/".join(b["key"] for b in bucket["modalities"]["buckets"]),
        "stations": "/".join(b["key"] for b in bucket["stations"]["buckets"]),
        "series": bucket["series"]["value"],
        "instances": bucket["doc_count"],
    }


def _composite_pages(
    client: OpenSearch, prefix: str, query: dict, sources: list, size: int, aggs: dict | None = None
) -> Iterator[list[dict]]:
    """Every page of buckets of a composite aggregation over the instances matching ``query``."""
    after = None
    while True:
        composite: dict[str, Any] = {"size": size, "sources": sources}
        if after:
            composite["after"] = after
        studies: dict[str, Any] = {"composite": composite}
        if aggs:
            studies["aggs"] = aggs
        body = {"size": 0, "query": query, "aggs": {"studies": studies}}
        result = client.search(index=IndexLayout(prefix).alias("instances"), body=body)["aggregations"]["studies"]
        if not result["buckets"]:
            return
        yield result["buckets"]
        after = result.get("after_key")
        if not after:
            return


def _study_rows(client: OpenSearch, prefix: str, query: dict, uids: list[str]) -> dict[str, dict]:
    """The rows of these studies, keyed by UID: each aggregated over all its instances matching ``query``."""
    rows: dict[str, dict] = {}
    for start in range(0, len(uids), TERMS_BATCH):
        batch = {"bool": {"filter": [query, {"terms": {"study_instance_uid": uids[start : start + TERMS_BATCH]}}]}}
        for buckets in _composite_pages(client, prefix, batch, _STUDY_KEYS, 500, _STUDY_AGGS):
            rows.update((b["key"]["study"], _study_row(b)) for b in buckets)
    return rows


def _earliest_studies(client: OpenSearch, prefix: str, query: dict, wanted: int) -> dict[str, dict]:
    """Up to ``wanted`` studies matching ``query``, earliest study date first, keyed by UID. A study's
    date is the earliest its matching instances carry; one none of them dates comes first."""
    undated: dict[str, dict] = {}  # studies without any date, complete rows, in UID order
    dated: dict[str, None] = {}  # the others, in the order of their earliest date (then UID)
    for buckets in _composite_pages(client, prefix, query, _DATE_STUDY_KEYS, min(1000, wanted)):
        # The undated buckets come first. Some of their studies have dated instances too: those come
        # again later, at their earliest date, and are not undated.
        missing = [b["key"]["study"] for b in buckets if b["key"]["date"] is None]
        if missing:
            rows = _study_rows(client, prefix, query, missing)
            undated.update((uid, row) for uid, row in rows.items() if not row.get("study_date"))
        for bucket in buckets:
            if len(undated) + len(dated) >= wanted:
                break
            if bucket["key"]["date"] is not None:
                dated.setdefault(bucket["key"]["study"])
        if len(undated) + len(dated) >= wanted:
            break
    kept = dict(list(undated.items())[:wanted])
    kept.update(_study_rows(client, prefix, query, list(dated)[: wanted - len(kept)]))
    return kept


def _by_date(row: dict) -> tuple[str, str]:
    return row.get("study_date") or "", row["study_instance_uid"]


def find_studies(client: OpenSearch, prefix: str, f: CohortFilter, limit: int = 10_000) -> FoundStudies:
    """One row per matching study (columns: COLUMNS), ordered by study date then UID: the earliest
    ``limit`` of them, and whether more matched (one more is fetched to know)."""
    f.validate()
    rows: dict[str, dict] = {}
    for query in _instance_queries(client, prefix, f):
        # Each batch's earliest limit + 1: together they hold the cohort's earliest limit + 1.
        rows.update(_earliest_studies(client, prefix, query, limit + 1))
    ordered = sorted(rows.values(), key=_by_date)
    return FoundStudies(ordered[:limit], more_match=len(ordered) > limit)


# Studies per instance search of an export: one batch of their instances is in memory at a time
# (10,000 CT studies of ~500 instances each were 5 million documents in one list before the first copy).
STUDIES_PER_BATCH = 100
_INSTANCE_FIELDS = [
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "sha256",
    "size_bytes",
    "patient_id",
]


def study_instance_batches(client: OpenSearch, prefix: str, study_uids: list[str]) -> Iterator[list[dict]]:
    """Every indexed instance of these studies (not only the ones that matched the filters), in lists
    of every instance of up to STUDIES_PER_BATCH studies: a study is never split between two. Each list
    is searched when the one before has been used."""
    studies_per_batch = STUDIES_PER_BATCH
    for start in range(0, len(study_uids), studies_per_batch):
        yield list(
            _scan(
                client,
                IndexLayout(prefix).alias("instances"),
                {"terms": {"study_instance_uid": study_uids[start : start + studies_per_batch]}},
                "sop_instance_uid",
                _INSTANCE_FIELDS,
            )
        )


def count_instances(client: OpenSearch, prefix: str, study_uids: list[str]) -> int:
    """How many instances the index holds of these studies (the export's progress total)."""
    return sum(
        client.count(
            index=IndexLayout(prefix).alias("instances"),
            body={"query": {"terms": {"study_instance_uid": study_uids[start : start + TERMS_BATCH]}}},
        )["count"]
        for start in range(0, len(study_uids), TERMS_BATCH)
    )


def write_rows(rows: list[dict], out: TextIO, fmt: str) -> None:
    if fmt == "json":
        json.dump(rows, out, indent=1, default=str)
        out.write("\n")
    elif fmt == "csv":
        # cells a spreadsheet would run as formulas get a leading quote (diana.spreadsheet_csv); collect
        # takes it off again from a file with this header (producers/pacs_pull/requests.py)
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: quote_cell(v) for k, v in row.items()} for row in rows)
    else:
        widths = {
            c: max([len(c)] + [len(str(r.get(c) if r.get(c) is not None else "")) for r in rows])
            for c in COLUMNS
            if c != "study_instance_uid"
        }
        out.write("  ".join(c.ljust(widths[c]) for c in widths) + "  study_instance_uid\n")
        for r in rows:
            out.write(
                "  ".join(str(r.get(c) if r.get(c) is not None else "").ljust(widths[c]) for c in widths)
                + f"  {r['study_instance_uid']}\n"
            )
        out.write(f"{len(rows)} studies\n")
