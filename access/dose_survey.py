"""What the dose indices say about standard names and reference levels (`diana dose names|drl`, the report).

- ``unmapped_protocols``: protocols of dose events that no standard name maps, with counts (by kind
  and station), and study descriptions of dose studies without a standard name; what to add to
  the [dose] standard_names file next.
- ``reference_level_survey``: the studies of the survey window, grouped by standard name, their
  median against the local and national levels (stream_apps/dose/reference_levels.py, ``survey``);
  a study of several standard names (a head and a body scan) counts each part under its own name.

Both take the window's last day (``today``) from the caller: the command's --as-of, else today in the
site's zone (access/site_zone.py), not this host's clock read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from opensearchpy.helpers import scan

from diana.schemas.layout import IndexLayout
from diana.stream_apps.dose.reference_levels import ReferenceLevels, survey

__all__ = [
    "Unmapped",
    "UnmappedSurvey",
    "unmapped_protocols",
    "reference_level_survey",
    "render_unmapped",
    "render_survey",
]

_MAX_BUCKETS = 500  # texts listed per index
_MAX_KINDS = 10  # kinds per text
_MAX_STATIONS = 50  # stations per text and kind
_PAGE = 5_000


@dataclass(frozen=True)
class Unmapped:
    field: str  # protocol or study_description
    text: str
    kind: str
    station: str
    count: int


@dataclass(frozen=True)
class UnmappedSurvey:
    rows: list[Unmapped]
    # what the terms aggregations left out (their sum_other_doc_count), one line each: before, unsaid
    not_listed: list[str]


def _window(days: int, last: date, *, bounded: bool = True) -> dict:
    """Studies dated in the ``days`` days ending on ``last``, both ends included (study_date is a day:
    yyyy-MM-dd): ``days`` dates, from ``last`` - (``days`` - 1). Without ``bounded``, later dates too."""
    bounds = {"gte": (last - timedelta(days=days - 1)).isoformat()}
    if bounded:
        bounds["lte"] = last.isoformat()
    return {"range": {"study_date": bounds}}


def _buckets(client, index: str, text_field: str, label: str, what: str, dated: list[dict]) -> UnmappedSurvey:
    if not client.indices.exists_alias(name=index):
        return UnmappedSurvey([], [])
    body = {
        "size": 0,
        "query": {"bool": {"must_not": [{"exists": {"field": "standard_name"}}], "filter": dated}},
        "aggs": {
            "text": {
                "terms": {"field": text_field, "size": _MAX_BUCKETS, "missing": "(none)"},
                "aggs": {
                    "kind": {
                        "terms": {"field": "kind", "size": _MAX_KINDS, "missing": "?"},
                        "aggs": {
                            "station": {"terms": {"field": "station_name", "size": _MAX_STATIONS, "missing": "?"}}
                        },
                    }
                },
            }
        },
    }
    texts = client.search(index=index, body=body)["aggregations"]["text"]
    rows = []
    other_kinds = other_stations = 0
    for text in texts["buckets"]:
        other_kinds += text["kind"].get("sum_other_doc_count", 0)
        for kind in text["kind"]["buckets"]:
            other_stations += kind["station"].get("sum_other_doc_count", 0)
            for station in kind["station"]["buckets"]:
                rows.append(Unmapped(label, text["key"], kind["key"], station["key"], station["doc_count"]))
    not_listed = [
        f"{count} {what} {beyond}"
        for count, beyond in (
            (texts.get("sum_other_doc_count", 0), f"of {label}s beyond the {_MAX_BUCKETS} most frequent"),
            (other_kinds, f"of kinds beyond the {_MAX_KINDS} most frequent of their {label}"),
            (other_stations, f"of stations beyond the {_MAX_STATIONS} most frequent of their {label} and kind"),
        )
        if count
    ]
    return UnmappedSurvey(sorted(rows, key=lambda r: (-r.count, r.field, r.text)), not_listed)


def unmapped_protocols(client, prefix: str, days: int | None, today: date, *, bounded: bool = False) -> UnmappedSurvey:
    """Event protocols and study descriptions without a standard name, most frequent first; with ``days``,
    only of the studies dated in the ``days`` days ending on ``today`` or later: dated after ``today``
    (a modality whose clock is wrong) they are listed too, as bad data should be, unless ``bounded``
    (the command's --as-of)."""
    layout = IndexLayout(prefix)
    dated = [_window(days, today, bounded=bounded)] if days else []
    events = _buckets(client, layout.alias("dose-events"), "protocol.keyword", "protocol", "dose events", dated)
    studies = _buckets(
        client, layout.alias("dose-studies"), "study_description.keyword", "study_description", "dose studies", dated
    )
    return UnmappedSurvey(events.rows + studies.rows, events.not_listed + studies.not_listed)


def reference_level_survey(client, prefix: str, levels: ReferenceLevels, today: date) -> list[dict]:
    """The survey rows for the studies dated in the levels' ``window_days`` days ending on ``today``."""
    index = IndexLayout(prefix).alias("dose-studies")
    if not levels.study or not client.indices.exists_alias(name=index):
        return survey(levels, [])
    names = sorted(levels.study)
    # A study of several standard names counts under its parts' names (drl_parts), not its own.
    of_names = [{"terms": {"standard_name": names}}, {"terms": {"drl_parts.standard_name": names}}]
    query = {
        "bool": {
            "filter": [
                {"bool": {"should": of_names, "minimum_should_match": 1}},
                _window(levels.window_days, today),
            ]
        }
    }
    fields = ["standard_name", "drl_parts", "drl_not_compared", *sorted({lv.metric for lv in levels.study.values()})]
    # Every study of the window (a median needs them all; one search stopped at 10,000, silently),
    # two or three small fields each, a page of _PAGE at a time.
    hits = scan(client, index=index, query={"query": query, "_source": fields}, size=_PAGE, preserve_order=False)
    return survey(levels, [h["_source"] for h in hits])


def render_unmapped(survey: UnmappedSurvey) -> str:
    rows = survey.rows
    if not rows:
        return "Every protocol and study description of the dose indices has a standard name."
    out = [f"{'count':>7}  {'field':<18}{'kind':<6}{'station':<18}text"]
    out += [f"{r.count:>7}  {r.field:<18}{r.kind:<6}{r.station:<18}{r.text}" for r in rows]
    out += [f"Not listed: {line}." for line in survey.not_listed]
    if survey.not_listed:
        out.append("Map the ones listed first, or narrow the window with --days, to see the rest.")
    out.append("Add them to the [dose] standard_names file (docs/DOSE.md), then replay the dose worker.")
    return "\n".join(out)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render_survey(rows: list[dict], window_days: int, today: date) -> str:
    if not rows:
        return "No study reference level is configured ([dose] reference_levels)."
    out = [
        f"Median per standard name over the {window_days} days to {today}, against the applied level "
        "(local, else national)",
        f"{'standard name':<28}{'metric':<20}{'studies':>8}{'median':>10}{'local':>10}{'national':>10}"
        f"{'ratio':>8}  verdict",
    ]
    for r in rows:
        verdict = (
            "no studies"
            if r["median"] is None
            else ("OVER" if r["median_over_level"] else "within") + (" (too few studies)" if r["too_few"] else "")
        )
        out.append(
            f"{r['standard_name']:<28}{r['metric']:<20}{r['studies']:>8}{_fmt(r['median']):>10}"
            f"{_fmt(r['local']):>10}{_fmt(r['national']):>10}{_fmt(r['ratio']):>8}  {verdict}"
        )
    return "\n".join(out)
