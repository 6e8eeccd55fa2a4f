"""OpenSearch Dashboards saved objects (Operations, Cohort discovery, Dose monitoring) and their install.

The visualizations are declared here once, as data; `render_ndjson` turns them into the saved-objects
file `compose/dashboards/diana-star.ndjson` (kept in the repository for sites that import it by
hand), and `aggregation_for` turns one into the OpenSearch aggregation it encodes, which is how the
tests check each of them against the live index and its mapping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from diana.schemas.layout import IndexLayout

__all__ = [
    "VISUALIZATIONS",
    "DASHBOARDS",
    "INDEX_PATTERNS",
    "Visualization",
    "render_ndjson",
    "aggregation_for",
    "install",
]

# index kind (schemas/layout.py) -> time field; the alias comes from the configured prefix. A chart
# over time bins its pattern's time field, so that its bars are the range picked. Studies: the day they
# began to arrive, which "studies per day" counts; a study amended weeks later is not moved to then.
INDEX_PATTERNS = {
    "instances": "received_at",
    "series": "last_received_at",
    "studies": "first_received_at",
    "dose-events": "received_at",
    "dose-studies": "received_at",
    "dose-alerts": "raised_at",
    "deadletters": "received_at",
}


@dataclass(frozen=True)
class Visualization:
    id: str
    title: str
    index: str  # an index kind: instances, series, dose-events, ...
    chart: str  # histogram (bars), line, table, pie
    metric: tuple[str, str | None]  # (count|sum|avg|max|cardinality, field)
    buckets: tuple[tuple[str, str, Any], ...]  # (terms|date_histogram|histogram, field, size or interval)
    query: str = ""  # a DQL query narrowing the index, e.g. "kind:CT"


V = Visualization
VISUALIZATIONS = (
    # Operations
    V(
        "ops-instances-per-hour",
        "Instances per hour by modality",
        "instances",
        "histogram",
        ("count", None),
        (("date_histogram", "received_at", "h"), ("terms", "modality", 10)),
    ),
    V(
        "ops-instances-per-day-station",
        "Instances per day by station",
        "instances",
        "histogram",
        ("count", None),
        (("date_histogram", "received_at", "d"), ("terms", "station_name", 20)),
    ),
    V(
        "ops-calling-ae",
        "Instances by calling AE",
        "instances",
        "table",
        ("count", None),
        (("terms", "calling_ae", 50),),
    ),
    V(
        "ops-bytes-per-day",
        "Bytes received per day",
        "instances",
        "line",
        ("sum", "size_bytes"),
        (("date_histogram", "received_at", "d"),),
    ),
    V(
        "ops-studies-per-day",
        "Studies per day by modality",
        "studies",
        "histogram",
        ("count", None),
        (("date_histogram", "first_received_at", "d"), ("terms", "modalities", 10)),
    ),
    V(
        "ops-series-verdicts",
        "Series completeness verdicts",
        "series",
        "pie",
        ("count", None),
        (("terms", "verdict", 5),),
    ),
    V(
        "ops-deadletters",
        "Dead letters per day by stage",
        "deadletters",
        "histogram",
        ("count", None),
        (("date_histogram", "received_at", "d"), ("terms", "stage", 10)),
    ),
    # Cohort discovery
    V(
        "cohort-modality",
        "Studies by modality",
        "instances",
        "table",
        ("cardinality", "study_instance_uid"),
        (("terms", "modality", 30),),
    ),
    V(
        "cohort-body-part",
        "Studies by body part",
        "instances",
        "table",
        ("cardinality", "study_instance_uid"),
        (("terms", "body_part_examined", 50),),
    ),
    V(
        "cohort-protocol",
        "Studies by protocol",
        "instances",
        "table",
        ("cardinality", "study_instance_uid"),
        (("terms", "protocol_name.keyword", 100),),
    ),
    V(
        "cohort-description",
        "Series by description",
        "instances",
        "table",
        ("cardinality", "series_instance_uid"),
        (("terms", "series_description.keyword", 100),),
    ),
    V(
        "cohort-age",
        "Patients by age (10-year bins)",
        "instances",
        "histogram",
        ("cardinality", "patient_id"),
        (("histogram", "patient_age_years", 10),),
    ),
    V(
        "cohort-sex",
        "Patients by sex",
        "instances",
        "pie",
        ("cardinality", "patient_id"),
        (("terms", "patient_sex", 5),),
    ),
    V(
        "cohort-equipment",
        "Studies by manufacturer and model",
        "instances",
        "table",
        ("cardinality", "study_instance_uid"),
        (("terms", "manufacturer", 30), ("terms", "manufacturer_model_name", 30)),
    ),
    V(
        "cohort-study-dates",
        "Studies by study month",
        "instances",
        "histogram",
        ("cardinality", "study_instance_uid"),
        (("date_histogram", "study_date", "M"),),
    ),
    # Dose monitoring
    V(
        "dose-ctdivol-protocol",
        "Mean CTDIvol (mGy) by protocol over time",
        "dose-events",
        "line",
        ("avg", "ctdivol_mGy"),
        (("date_histogram", "received_at", "d"), ("terms", "protocol.keyword", 10)),
        "kind:CT",
    ),
    V(
        "dose-dlp-scanner",
        "Mean study DLP (mGy·cm) by scanner over time",
        "dose-studies",
        "line",
        ("avg", "total_dlp_mGycm"),
        (("date_histogram", "received_at", "d"), ("terms", "station_name", 10)),
        "kind:CT",
    ),
    V(
        "dose-dap-projection",
        "Total DAP (Gy·m²) by station, projection X-ray",
        "dose-studies",
        "table",
        ("sum", "total_dap_Gym2"),
        (("terms", "station_name", 30),),
        "kind:DX or kind:RF or kind:MG",
    ),
    V(
        "dose-reference-exceedances",
        "Reference-level exceedances by rule and metric",
        "dose-alerts",
        "table",
        ("count", None),
        (("terms", "rule", 50), ("terms", "metric", 10)),
        "rule_type:reference_level",
    ),
    V(
        "dose-dlp-standard-name",
        "Mean study DLP (mGy·cm) by standard name",
        "dose-studies",
        "histogram",
        ("avg", "total_dlp_mGycm"),
        (("terms", "standard_name", 30),),
        "kind:CT",
    ),
    V(
        "dose-over-reference-level",
        "Studies over their reference level, by standard name and level (local/national)",
        "dose-studies",
        "table",
        ("count", None),
        # drl_standard_name: of a study of several standard names, the part over its level, not the study's name.
        (("terms", "drl_standard_name", 50), ("terms", "drl_source", 2)),
        "over_drl:true",
    ),
    V(
        "dose-alerts-per-day",
        "Dose alerts per day by type",
        "dose-alerts",
        "histogram",
        ("count", None),
        (("date_histogram", "raised_at", "d"), ("terms", "rule_type", 5)),
    ),
)

DASHBOARDS = {
    "diana-operations": ("diana-star Operations", [v.id for v in VISUALIZATIONS if v.id.startswith("ops-")]),
    "diana-cohort": ("diana-star Cohort discovery", [v.id for v in VISUALIZATIONS if v.id.startswith("cohort-")]),
    "diana-dose": ("diana-star Dose monitoring", [v.id for v in VISUALIZATIONS if v.id.startswith("dose-")]),
}

_INTERVAL_NAMES = {"h": "hour", "d": "day", "M": "month"}


def _vis_state(v: Visualization) -> dict:
    metric_type, metric_field = v.metric
    aggs = [
        {
            "id": "1",
            "enabled": True,
            "type": metric_type,
            "schema": "metric",
            "params": {"field": metric_field} if metric_field else {},
        }
    ]
    for i, (kind, field, arg) in enumerate(v.buckets, start=2):
        schema = "bucket" if v.chart == "table" else ("segment" if i == 2 else "group")
        params: dict[str, Any] = {"field": field}
        if kind == "terms":
            params.update(size=arg, order="desc", orderBy="1")
        elif kind == "date_histogram":
            params.update(interval=arg, min_doc_count=1, extended_bounds={})
        else:
            params.update(interval=arg, min_doc_count=True)
        aggs.append({"id": str(i), "enabled": True, "type": kind, "schema": schema, "params": params})
    chart_type = {"histogram": "histogram", "line": "line", "table": "table", "pie": "pie"}[v.chart]
    return {
        "title": v.title,
        "type": chart_type,
        "aggs": aggs,
        "params": {"perPage": 20} if v.chart == "table" else {"addTooltip": True, "addLegend": True},
    }


def _search_source(query: str, with_index: bool) -> str:
    source: dict[str, Any] = {"query": {"query": query, "language": "kuery"}, "filter": []}
    if with_index:
        source["indexRefName"] = "kibanaSavedObjectMeta.searchSourceJSON.index"
    return json.dumps(source)


def saved_objects(prefix: str = "diana") -> list[dict]:
    """Index patterns, visualizations and dashboards for the indices of ``prefix``."""
    layout = IndexLayout(prefix)
    objects: list[dict] = []
    for kind, time_field in INDEX_PATTERNS.items():
        alias = layout.alias(kind)
        objects.append(
            {"type": "index-pattern", "id": alias, "attributes": {"title": alias, "timeFieldName": time_field}}
        )
    for v in VISUALIZATIONS:
        objects.append(
            {
                "type": "visualization",
                "id": f"diana-{v.id}",
                "attributes": {
                    "title": v.title,
                    "visState": json.dumps(_vis_state(v)),
                    "uiStateJSON": "{}",
                    "description": "",
                    "version": 1,
                    "kibanaSavedObjectMeta": {"searchSourceJSON": _search_source(v.query, True)},
                },
                "references": [
                    {
                        "name": "kibanaSavedObjectMeta.searchSourceJSON.index",
                        "type": "index-pattern",
                        "id": layout.alias(v.index),
                    }
                ],
            }
        )
    for dashboard_id, (title, vis_ids) in DASHBOARDS.items():
        panels = [
            {
                "panelIndex": str(i),
                "gridData": {"x": (i % 2) * 24, "y": (i // 2) * 15, "w": 24, "h": 15, "i": str(i)},
                "version": "2.19.4",
                "panelRefName": f"panel_{i}",
            }
            for i in range(len(vis_ids))
        ]
        objects.append(
            {
                "type": "dashboard",
                "id": dashboard_id,
                "attributes": {
                    "title": title,
                    "panelsJSON": json.dumps(panels),
                    "optionsJSON": json.dumps({"useMargins": True}),
                    "timeRestore": False,
                    "description": "",
                    "version": 1,
                    "kibanaSavedObjectMeta": {"searchSourceJSON": _search_source("", False)},
                },
                "references": [
                    {"name": f"panel_{i}", "type": "visualization", "id": f"diana-{vid}"}
                    for i, vid in enumerate(vis_ids)
                ],
            }
        )
    return objects


def render_ndjson(prefix: str = "diana") -> str:
    """The saved-objects file for the indices of ``prefix`` (compose/dashboards/ holds the default's)."""
    return "".join(json.dumps(o, sort_keys=True) + "\n" for o in saved_objects(prefix))


def aggregation_for(vis_state: dict) -> dict:
    """The OpenSearch aggregation a saved visualization's visState encodes (buckets nested in order)."""
    aggs = [a for a in vis_state["aggs"] if a.get("enabled", True)]
    metric = next(a for a in aggs if a["schema"] == "metric")
    leaf = {} if metric["type"] == "count" else {"m": {metric["type"]: {"field": metric["params"]["field"]}}}
    body: dict = leaf
    for agg in reversed([a for a in aggs if a["schema"] != "metric"]):
        p = agg["params"]
        if agg["type"] == "terms":
            spec = {"terms": {"field": p["field"], "size": p["size"]}}
        elif agg["type"] == "date_histogram":
            spec = {
                "date_histogram": {
                    "field": p["field"],
                    "calendar_interval": _INTERVAL_NAMES[p["interval"]],
                    "min_doc_count": 1,
                }
            }
        else:
            spec = {"histogram": {"field": p["field"], "interval": p["interval"], "min_doc_count": 1}}
        if body:
            spec["aggs"] = body
        body = {f"b{agg['id']}": spec}
    return body


def install(
    url: str,
    ndjson: str,
    timeout: float = 60.0,
    *,
    auth: tuple[str, str] | None = None,
    verify: bool | str = True,
) -> dict:
    """Import the saved objects into a running OpenSearch Dashboards (overwriting ours), as the user of
    ``auth`` (HTTP basic), its certificate checked against ``verify`` (a CA file, or the system's CAs)."""
    import requests

    response = requests.post(
        f"{url.rstrip('/')}/api/saved_objects/_import",
        params={"overwrite": "true"},
        headers={"osd-xsrf": "true"},
        files={"file": ("diana-star.ndjson", ndjson.encode(), "application/ndjson")},
        timeout=timeout,
        auth=auth,
        verify=verify,
    )
    response.raise_for_status()
    return response.json()
