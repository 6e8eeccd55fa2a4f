"""`diana report`: one self-contained HTML page of ingest and dose for a date range.

Built from OpenSearch aggregations; charts are inline SVG drawn here, so the page needs no network
and no script to be viewed, printed or mailed.
"""

from __future__ import annotations

import html
from datetime import UTC, date, datetime, timedelta
from typing import Any

from opensearchpy import OpenSearch

from diana.access.dose_survey import reference_level_survey
from diana.access.site_zone import SiteZone, host_zone, time_zone_info
from diana.schemas.layout import IndexLayout
from diana.stream_apps.dose.reference_levels import ReferenceLevels

__all__ = ["build_report", "host_time_zone", "MissingInstanceIndex"]

_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
    "#393b79",
    "#637939",
)


class MissingInstanceIndex(LookupError):
    """No instance alias under the configured prefix: a page of "No data" would look like a quiet month."""


def host_time_zone() -> str:
    """This host's zone as OpenSearch takes it (access/site_zone.py, ``host_zone``)."""
    return host_zone().name


def _range(field: str, start: date, end: date, time_zone: str) -> dict:
    return {
        "range": {
            field: {"gte": start.isoformat(), "lt": (end + timedelta(days=1)).isoformat(), "time_zone": time_zone}
        }
    }


def _search(client: OpenSearch, index: str, query: dict, aggs: dict) -> dict:
    if not client.indices.exists_alias(name=index):
        return {}
    return client.search(index=index, body={"size": 0, "query": query, "aggs": aggs}).get("aggregations", {})


def _bar_chart(
    chart_id: str, title: str, series: dict[str, dict[str, float]], unit: str = "", *, stacked: bool = True
) -> str:
    """Bars: x categories in order, one colour per series. Stacked for counts, whose sum is a count; side
    by side (``stacked=False``) for means, whose sum is no quantity (a stack of two scanners' mean DLPs
    read as a dose)."""
    categories = sorted({x for values in series.values() for x in values})
    if not categories:
        return f'<section><h2>{html.escape(title)}</h2><p class="empty">No data in this range.</p></section>'
    if stacked:
        top = max(sum(values.get(x, 0) for values in series.values()) for x in categories) or 1
    else:
        top = max(values.get(x, 0) for values in series.values() for x in categories) or 1
    width, height, left, bottom = 760, 260, 100, 40
    bar = (width - left - 10) / len(categories)
    parts = [
        f'<svg data-chart="{chart_id}" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" stroke="#333"/>',
        f'<text x="{left - 5}" y="15" text-anchor="end" font-size="11">{top:g}{html.escape(unit)}</text>',
    ]
    slot = max(bar - 4, 1) / (1 if stacked else len(series))  # the width of one series' bar
    for i, x in enumerate(categories):
        y = float(height - bottom)
        for s_index, (name, values) in enumerate(sorted(series.items())):
            value = float(values.get(x, 0))
            h = (height - bottom - 20) * value / top
            if h > 0:
                x0 = left + i * bar + 2 + (0 if stacked else s_index * slot)
                parts.append(
                    f'<rect class="bar" x="{x0:.1f}" y="{y - h:.1f}" width="{max(slot - (0 if stacked else 1), 1):.1f}" '
                    f'height="{h:.1f}" fill="{_COLOURS[s_index % len(_COLOURS)]}">'
                    f"<title>{html.escape(str(name))} {html.escape(str(x))}: {value:g}</title></rect>"
                )
                if stacked:
                    y -= h
        if len(categories) <= 31:
            parts.append(
                f'<text x="{left + (i + 0.5) * bar:.1f}" y="{height - bottom + 14}" font-size="10" '
                f'text-anchor="middle">{html.escape(_label(str(x), bar))}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i style="background:{_COLOURS[i % len(_COLOURS)]}"></i>{html.escape(str(n))}</span>'
        for i, n in enumerate(sorted(series))
    )
    return f'<section><h2>{html.escape(title)}</h2>{"".join(parts)}<div class="legend">{legend}</div></section>'


def _label(text: str, room: float) -> str:
    """Dates as MM-DD; other labels cut to the bar's width (the full text is in the tooltip)."""
    if len(text) == 10 and text[4] == "-" and text[7] == "-":
        return text[5:]
    fits = max(int(room / 6), 3)
    return text if len(text) <= fits else text[: fits - 1] + "…"


def _table(title: str, headers: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return f'<section><h2>{html.escape(title)}</h2><p class="empty">No data in this range.</p></section>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<section><h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table></section>"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Studies are counted by OpenSearch's cardinality aggregation: up to its precision_threshold (40,000, its
# maximum) within a few of the true count (linear counting over 2^25 hash slots: a standard error of about
# n / 8,192, 1 at 10,000, 5 at 40,000); from it on an estimate within a few percent, shown as "≈N".
EXACT_UP_TO = 40_000
# Modalities drawn as their own bars: the most frequent over the whole range; the rest of each day is one
# "(other)" bar. At most DAY_MODALITIES + 1 series, each its own colour.
DAY_MODALITIES = 20
OTHER = "(other)"
# The bucket of instances indexed without a modality, which a terms aggregation otherwise leaves out.
NO_MODALITY = "(none)"


def _study_count(value: float) -> str:
    return f"≈{int(value)}" if value >= EXACT_UP_TO else str(int(value))


def _split(aggs: dict, outer: str, inner: str) -> dict[str, dict[str, float]]:
    """Per outer bucket (a day) the inner terms' counts, and what the inner terms left out
    (sum_other_doc_count) as "(other)": before, a day of more modalities than asked lost their bars."""
    series: dict[str, dict[str, float]] = {}
    other: dict[str, float] = {}
    for day in aggs.get(outer, {}).get("buckets", []):
        x = day["key_as_string"][:10]
        for b in day[inner]["buckets"]:
            series.setdefault(b["key"], {})[x] = b["doc_count"]
        if day[inner].get("sum_other_doc_count"):
            other[x] = day[inner]["sum_other_doc_count"]
    # Each day's top terms differ: their union could pass the palette. The most frequent over the range
    # keep their bars, the rest of each day joins its "(other)" bar.
    kept = sorted(series, key=lambda k: -sum(series[k].values()))[:DAY_MODALITIES]
    for key in [k for k in series if k not in kept]:
        for x, n in series.pop(key).items():
            other[x] = other.get(x, 0) + n
    if other:
        series[OTHER] = other
    return series


def _local_time(stamp: str, time_zone: str) -> str:
    """An ISO time stamp (UTC when it names no offset) as the wall-clock time of ``time_zone``, to the
    second; one that does not read as a time, as it is."""
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(time_zone_info(time_zone)).strftime("%Y-%m-%d %H:%M:%S")


def _over_level(study: dict) -> list[tuple]:
    """(standard name, metric, value, level, level source) of what a study exceeded: each part over its
    own level for a study of several standard names (drl_parts), else the study."""
    parts = study.get("drl_parts")
    if parts:
        return [(p["standard_name"], p["metric"], p["value"], p["level"], p["source"]) for p in parts if p["over_drl"]]
    fields = ("standard_name", "drl_metric", "drl_value", "drl_level", "drl_source")
    return [tuple(study.get(f) for f in fields)]


def _reference_level_sections(
    client: OpenSearch, prefix: str, levels: ReferenceLevels | None, received: dict, as_of: date, identifiers: bool
) -> list[str]:
    """The DRL survey (median per standard name over the levels' window to ``as_of``) and the range's
    studies over their level (with their accession numbers only when ``identifiers``)."""
    if levels is None or not levels.study:
        return []
    rows = reference_level_survey(client, prefix, levels, as_of)
    over = {}
    if client.indices.exists_alias(name=IndexLayout(prefix).alias("dose-studies")):
        over = client.search(
            index=IndexLayout(prefix).alias("dose-studies"),
            body={
                "size": 50,
                "query": {"bool": {"filter": [received, {"term": {"over_drl": True}}]}},
                "sort": [{"received_at": "desc"}],
            },
        )
    return [
        _table(
            f"Reference levels: median per standard name, the {levels.window_days} days to {as_of}",
            ["standard name", "metric", "studies", "median", "local", "national", "median / level", "verdict"],
            [
                [
                    r["standard_name"],
                    r["metric"],
                    r["studies"],
                    r["median"],
                    r["local"],
                    r["national"],
                    r["ratio"],
                    "no studies"
                    if r["median"] is None
                    else ("OVER" if r["median_over_level"] else "within") + (" (too few)" if r["too_few"] else ""),
                ]
                for r in rows
            ],
        ),
        _table(
            "Studies over their reference level (latest 50; a study of several standard names: each part over its own)",
            [
                "study date",
                "station",
                "standard name",
                "metric",
                "value",
                "level",
                "level source",
                "max SSDE (mGy)",
                *(["accession"] if identifiers else []),
            ],
            [
                [
                    h["_source"].get("study_date"),
                    h["_source"].get("station_name"),
                    name,
                    metric,
                    value,
                    level,
                    source,
                    h["_source"].get("max_ssde_mGy"),
                    *([h["_source"].get("accession_number")] if identifiers else []),
                ]
                for h in over.get("hits", {}).get("hits", [])
                for name, metric, value, level, source in _over_level(h["_source"])
            ],
        ),
    ]


def build_report(
    client: OpenSearch,
    prefix: str,
    start: date,
    end: date,
    levels: ReferenceLevels | None = None,
    *,
    time_zone: str,
    as_of: date | None = None,
    zone_note: str = "",
    identifiers: bool = False,
) -> str:
    """The page for the days ``start`` to ``end`` (by arrival), each from midnight to midnight in
    ``time_zone`` (an IANA name or "+HH:MM"), not UTC's: the site's day. The reference-level survey's
    window ends on ``as_of`` (default: today in ``time_zone``); ``zone_note``, a warning about the zone
    (site_zone.SiteZone.note), is shown under the title. The page is meant to be printed and mailed:
    its studies are named by date, station and standard name or protocol, and by their accession numbers
    (a direct identifier) only with ``identifiers``."""
    instances = IndexLayout(prefix).alias("instances")
    if not client.indices.exists_alias(name=instances):
        raise MissingInstanceIndex(
            f"OpenSearch has no {instances} alias: check [opensearch] index_prefix ({prefix!r}), "
            "or whether the OpenSearch sink has indexed anything yet"
        )
    if as_of is None:
        as_of = SiteZone(time_zone).today()
    received = _range("received_at", start, end, time_zone)
    per_day = {"calendar_interval": "day", "format": "yyyy-MM-dd", "min_doc_count": 1, "time_zone": time_zone}
    ingest = _search(
        client,
        instances,
        received,
        {
            "days": {
                "date_histogram": {"field": "received_at", **per_day},
                # a day's modalities beyond these are one "(other)" bar (sum_other_doc_count)
                "aggs": {"modality": {"terms": {"field": "modality", "size": DAY_MODALITIES, "missing": NO_MODALITY}}},
            },
            "modalities": {
                "terms": {"field": "modality", "size": 30, "missing": NO_MODALITY},
                "aggs": {
                    "studies": {"cardinality": {"field": "study_instance_uid", "precision_threshold": EXACT_UP_TO}},
                    "bytes": {"sum": {"field": "size_bytes"}},
                },
            },
            # the headline's instances counted exactly: the modality buckets' sum left out those beyond 30
            "instances": {"value_count": {"field": "sop_instance_uid"}},
            "studies": {"cardinality": {"field": "study_instance_uid", "precision_threshold": EXACT_UP_TO}},
            "bytes": {"sum": {"field": "size_bytes"}},
        },
    )
    ctdi = _search(
        client,
        IndexLayout(prefix).alias("dose-events"),
        {"bool": {"filter": [received, {"term": {"kind": "CT"}}]}},
        {
            "protocols": {
                "terms": {"field": "protocol.keyword", "size": 15},
                "aggs": {"ctdivol": {"avg": {"field": "ctdivol_mGy"}}, "max": {"max": {"field": "ctdivol_mGy"}}},
            }
        },
    )
    dlp = _search(
        client,
        IndexLayout(prefix).alias("dose-studies"),
        {"bool": {"filter": [received]}},
        {
            "stations": {
                "terms": {"field": "station_name", "size": 20},
                "aggs": {
                    "dlp": {"avg": {"field": "total_dlp_mGycm"}},
                    "dap": {"sum": {"field": "total_dap_Gym2"}},
                    "days": {
                        "date_histogram": {"field": "received_at", **per_day},
                        "aggs": {"dlp": {"avg": {"field": "total_dlp_mGycm"}}},
                    },
                },
            }
        },
    )
    alerts = {}
    if client.indices.exists_alias(name=IndexLayout(prefix).alias("dose-alerts")):
        alerts = client.search(
            index=IndexLayout(prefix).alias("dose-alerts"),
            body={"size": 50, "query": _range("raised_at", start, end, time_zone), "sort": [{"raised_at": "desc"}]},
        )
    modality_rows = [
        [b["key"], _study_count(b["studies"]["value"]), b["doc_count"], b["bytes"]["value"] / 1e6]
        for b in ingest.get("modalities", {}).get("buckets", [])
    ]
    dlp_days: dict[str, dict[str, float]] = {}
    for station in dlp.get("stations", {}).get("buckets", []):
        for day in station["days"]["buckets"]:
            if day["dlp"]["value"] is not None:
                dlp_days.setdefault(station["key"], {})[day["key_as_string"]] = day["dlp"]["value"]
    sections = [
        _bar_chart("instances-per-day", "Instances received per day, by modality", _split(ingest, "days", "modality")),
        _table("Studies by modality", ["modality", "studies", "instances", "MB"], modality_rows),
        _bar_chart(
            "ctdivol-by-protocol",
            "Mean CTDIvol by protocol (mGy)",
            {
                "mean CTDIvol": {
                    b["key"]: b["ctdivol"]["value"] or 0 for b in ctdi.get("protocols", {}).get("buckets", [])
                }
            },
            " mGy",
            stacked=False,
        ),
        _bar_chart(
            "dlp-by-station",
            "Mean study DLP per day, by scanner (mGy·cm)",
            dlp_days,
            " mGy·cm",
            stacked=False,  # a mean per scanner: side by side, never summed
        ),
        _table(
            "Dose by scanner",
            ["station", "studies", "mean DLP (mGy·cm)", "total DAP (Gy·m²)"],
            [
                [b["key"], b["doc_count"], b["dlp"]["value"], b["dap"]["value"]]
                for b in dlp.get("stations", {}).get("buckets", [])
            ],
        ),
        *_reference_level_sections(client, prefix, levels, received, as_of, identifiers),
        _table(
            "Dose alerts (latest 50)",
            [
                f"raised ({time_zone})",  # the page's zone, as its days
                "rule",
                "metric",
                "value",
                "threshold",
                "study date",
                "station",
                "protocol",
                *(["accession"] if identifiers else []),
            ],
            [
                [
                    _local_time(h["_source"].get("raised_at") or "", time_zone),
                    h["_source"].get("rule"),
                    h["_source"].get("metric"),
                    h["_source"].get("value"),
                    h["_source"].get("threshold"),
                    h["_source"].get("study_date"),
                    h["_source"].get("station_name"),
                    h["_source"].get("protocol"),
                    *([h["_source"].get("accession_number")] if identifiers else []),
                ]
                for h in alerts.get("hits", {}).get("hits", [])
            ],
        ),
    ]
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    identified = (
        "This page holds accession numbers (direct identifiers): keep it as patient data."
        if identifiers
        else "Studies are named by date, station and standard name or protocol: no identifier "
        "(diana report --identifiers adds accession numbers)."
    )
    warning = f'<p class="warning">{html.escape(zone_note)}</p>\n' if zone_note else ""
    summary = (
        f"{_study_count(ingest.get('studies', {}).get('value', 0))} studies, "
        f"{int(ingest.get('instances', {}).get('value', 0))} instances, "
        f"{ingest.get('bytes', {}).get('value', 0) / 1e9:.2f} GB"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>diana-star report {start} to {end}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 900px; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.1em; margin-top: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #eee; }} .empty {{ color: #888; }} .warning {{ color: #a00; font-weight: bold; }}
.legend .key {{ margin-right: 1em; font-size: 0.9em; }} .legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; }}
</style></head><body>
<h1>diana-star: ingest and dose, {start} to {end}</h1>
<p>Days run from midnight to midnight in {html.escape(time_zone)}.</p>
{warning}<p>{html.escape(summary)}. Made {made} from the OpenSearch indices <code>{html.escape(prefix)}-*</code>.</p>
<p>{identified}</p>
{"".join(sections)}
</body></html>
"""
