"""One study's dose record, folded from every dose report and dose-bearing image that arrives.

Deduplication is by (StudyInstanceUID, IrradiationEventUID): the state is keyed by study, and an
event seen in two reports (a re-sent or continued report) counts once, with the content of the
latest report. A report whose events are all in a later report is replaced by it (a report whose
events are a superset of an earlier one replaces it). Image headers count only while no dose
report of their kind (CT, projection X-ray, radiopharmaceutical) has arrived; such a report then
supersedes them, and the events they gave are retracted (``superseded_events``). A CT series whose
acquisition an earlier series gave (another reconstruction of it) does not count either.

Totals: when the remaining reports share no event, each report's own accumulated values are summed
(falling back to the sum of its events); when they overlap, totals are summed over the distinct
events. Everything here is a pure function of the state, so replays give the same record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diana.stream_apps.dose.size import event_ssde

__all__ = ["new_study", "fold_report", "fold_size", "summarize", "superseded_events", "event_key", "family"]

_CT_TYPE_COUNTS = {
    "sequenced": "events_axial",
    "spiral": "events_spiral",
    "stationary": "events_stationary",
    "constant_angle": "events_constant_angle",
}


def new_study(study_instance_uid: str) -> dict:
    return {"study_instance_uid": study_instance_uid, "reports": {}, "arrivals": 0, "context": {}}


def event_key(report: dict, event: dict) -> str:
    return (
        event.get("irradiation_event_uid") or event.get("event_key") or f"{report['sop_instance_uid']}#{event['index']}"
    )


# Event keys that only group events (series of one CT acquisition), added after records were stored
# without them: a replay of such a record is the same object again, not a change (docs/DOSE.md).
_GROUPING_KEYS = ("acquisition",)


def _as_compared(report: dict) -> dict:
    """A report as fold_report compares it: without its arrival, and its events without grouping keys."""
    kept = {k: v for k, v in report.items() if k not in ("received_at", "arrival")}
    if isinstance(kept.get("events"), list):
        kept["events"] = [
            {k: v for k, v in e.items() if k not in _GROUPING_KEYS} if isinstance(e, dict) else e
            for e in kept["events"]
        ]
    return kept


def fold_report(state: dict, report: dict, context: dict, received_at_ms: int) -> bool:
    """Add a report (or image record) to the study; False if it changes nothing (the same object again).
    A record stored without a grouping key the current code adds (_GROUPING_KEYS) is the same object:
    it is kept as stored (its events stay ungrouped), so a replay after the upgrade raises nothing new."""
    sop = report["sop_instance_uid"]
    previous = state["reports"].get(sop)
    stored = {**report, "received_at": received_at_ms}
    if previous is not None:
        if _as_compared(previous) == _as_compared(report):
            return False
        stored["arrival"] = previous["arrival"]
    else:
        state["arrivals"] += 1
        stored["arrival"] = state["arrivals"]
    state["reports"][sop] = stored
    # The context of the latest object wins, value by value: a later report may add a weight.
    state["context"] = {**state["context"], **{k: v for k, v in context.items() if v is not None}}
    return True


def fold_size(
    state: dict, sop_instance_uid: str, series_instance_uid: str, diameter_mm: float, event_uid: str | None = None
) -> bool:
    """Add one axial image's water-equivalent diameter (size.py), with its series and the irradiation
    event it was made by (its (0008,3010), when the image says); False if this image was already counted."""
    sizes = state.setdefault("sizes", {})
    if sop_instance_uid in sizes:
        return False
    sizes[sop_instance_uid] = {"series": series_instance_uid, "dw_mm": diameter_mm, "event": event_uid}
    return True


def _mean_size(sizes: list[dict]) -> tuple[float | None, int]:
    """The arithmetic average of D_w(z) over these sampled axial images, and their number."""
    return (sum(s["dw_mm"] for s in sizes) / len(sizes), len(sizes)) if sizes else (None, 0)


def _study_size(state: dict) -> tuple[float | None, int]:
    return _mean_size(list(state.get("sizes", {}).values()))


def _event_size(state: dict, event: dict) -> tuple[float | None, int, str]:
    """D_w(z) for one CT event: the mean over the images of that irradiation event, else of its series
    (an event read from a series' headers), else of the whole study; (mean, images, which). A head
    scan and a body scan of one study are not given one diameter between the two."""
    sizes = list(state.get("sizes", {}).values())
    uid = event.get("irradiation_event_uid")
    key = str(event.get("event_key") or "")
    series = key.removeprefix("series:") if key.startswith("series:") else None
    for scope, chosen in (
        ("its irradiation event", [s for s in sizes if uid and s.get("event") == uid]),
        ("its series", [s for s in sizes if series and s["series"] == series]),
        ("the study", sizes),
    ):
        if chosen:
            return (*_mean_size(chosen), scope)
    return None, 0, ""


def family(kind: str | None) -> str:
    """The kind of dose a record is about: CT, projection X-ray (DX, RF, MG) or radiopharmaceutical (NM)."""
    return "projection" if kind in ("DX", "RF", "MG") else str(kind)


def _superseding(reports: list[dict]) -> dict[str, str]:
    """Each kind of dose that has a dose report -> that kind's first report (its SOP Instance UID).

    A dose report supersedes the image headers of its own kind only: a PET/CT study's CT report
    does not drop the activity its PET images carry."""
    first: dict[str, str] = {}
    for report in reports:
        if report["source"] == "RDSR":
            first.setdefault(family(report["kind"]), report["sop_instance_uid"])
    return first


def _acquisition_of(report: dict) -> tuple | None:
    """An image record's acquisition and dose values, when its one event names the acquisition (CT)."""
    events = report["events"]
    if report["source"] != "IMAGE" or len(events) != 1 or not events[0].get("acquisition"):
        return None
    event = events[0]
    return (report["kind"], event["acquisition"], event.get("ctdivol_mGy"), event.get("dap_Gym2"))


def _first_of_each_acquisition(images: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The image records (in arrival order) without those of an acquisition an earlier one already
    gave (another reconstructed series of it, with the same dose value); and each dropped record's
    SOP Instance UID -> the kept one's. Before, each series was an event of its own: one alert each."""
    first: dict[tuple, str] = {}
    kept, dropped = [], {}
    for report in images:
        same = _acquisition_of(report)
        if same is not None and same in first:
            dropped[report["sop_instance_uid"]] = first[same]
            continue
        if same is not None:
            first[same] = report["sop_instance_uid"]
        kept.append(report)
    return kept, dropped


def _retained(state: dict) -> list[dict]:
    reports = sorted(state["reports"].values(), key=lambda r: r["arrival"])
    dose_reports = [r for r in reports if r["source"] == "RDSR"]
    if not dose_reports:
        return _first_of_each_acquisition(reports)[0]
    reported = _superseding(reports)
    images = [r for r in reports if r["source"] != "RDSR" and family(r["kind"]) not in reported]
    images = _first_of_each_acquisition(images)[0]
    keys = [{event_key(r, e) for e in r["events"]} for r in dose_reports]
    kept = []
    for i, report in enumerate(dose_reports):
        # Replaced when a later report holds every one of its events (a report of accumulated values
        # only, with no event, is never "held" by another: an empty set is in every set).
        if keys[i] and any(keys[i] <= keys[j] for j in range(i + 1, len(dose_reports))):
            continue
        kept.append(report)
    return sorted([*images, *kept], key=lambda r: r["arrival"])


# A procedure step's running totals, as a C-arm writes them into each image (headers.py): they only grow.
_RUNNING_TOTALS = ("dap_Gym2", "entrance_dose_mGy", "irradiation_duration_s", "exposures")


def _running_totals(earlier: dict, event: dict) -> dict:
    """The largest of each running total of two images of one procedure step: the later image of the
    step, whichever arrived last (a retried association, parallel sends). Before, the last to arrive
    won, and an earlier image arriving late under-counted the step (41 % of its DAP in the audit)."""
    if not str(event.get("event_key", "")).startswith("procedure-step:"):
        return {}
    return {
        name: max(earlier[name], event[name])
        for name in _RUNNING_TOTALS
        if earlier.get(name) is not None and event.get(name) is not None
    }


def _distinct_events(reports: list[dict]) -> list[dict]:
    events: dict[str, dict] = {}
    for report in reports:
        for event in report["events"]:
            key = event_key(report, event)
            # Header events of one exposure (For Presentation and For Processing, a series' images)
            # complete each other; a later dose report's event replaces the earlier one whole.
            earlier = events.get(key, {}) if report["source"] == "IMAGE" else {}
            events[key] = {
                **earlier,
                **event,
                **_running_totals(earlier, event),
                "event_key": key,
                "sop_instance_uid": report["sop_instance_uid"],
                "kind": report["kind"],
                "source": report["source"],
                "received_at": report["received_at"],
            }
    return list(events.values())


def superseded_events(state: dict) -> list[dict]:
    """The image-header events a dose report of their kind superseded, each with ``superseded_by`` (that
    kind's first report), and those of a reconstructed series whose acquisition an earlier series
    already gave (``superseded_by``: that series' image): they may have been published before, and
    must stop being counted (and their alerts withdrawn, agent.py).

    A pure function of the state, so a replay or a redelivery retracts the same events again. An
    event whose key a retained report also has (an image naming its IrradiationEventUID) is not
    retracted: the report's event replaces it under the same id."""
    reports = sorted(state["reports"].values(), key=lambda r: r["arrival"])
    reported = _superseding(reports)
    retained = _retained(state)
    counted = {r["sop_instance_uid"] for r in retained}
    images = [r for r in reports if r["source"] != "RDSR" and r["sop_instance_uid"] not in counted]
    if not images:
        return []
    same_acquisition = _first_of_each_acquisition([r for r in reports if r["source"] != "RDSR"])[1]
    kept = {e["event_key"] for e in _distinct_events(retained)}
    out = []
    for event in _distinct_events(images):
        by = reported.get(family(event["kind"])) or same_acquisition.get(event["sop_instance_uid"])
        if event["event_key"] not in kept and by:
            out.append({**event, "superseded_by": by})
    return out


def _sum(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def _total(
    reports: list[dict],
    disjoint: bool,
    events: list[dict],
    from_report: Callable[[dict], float | None],
    from_event: Callable[[dict], float | None],
) -> float | None:
    if disjoint:
        per_report = []
        for report in reports:
            value = from_report(report)
            per_report.append(value if value is not None else _sum(from_event(e) for e in report["events"]))
        return _sum(per_report)
    return _sum(from_event(e) for e in events)


def summarize(state: dict) -> tuple[dict, list[dict]]:
    """The study record and its distinct events, ordered as they first arrived."""
    reports = _retained(state)
    events = _distinct_events(reports)
    # The study's kind (what standard names, reference levels and dashboards go by) is its dose
    # reports' when it has any: a PET/CT study with a CT report is a CT study that also carries the
    # activity its PET images say. Its modality likewise (a PET image after the report set it to PT).
    dose_reports = [r for r in reports if r["source"] == "RDSR"]
    kinds = sorted({r["kind"] for r in dose_reports or reports})
    study: dict[str, Any] = {
        **state["context"],
        **({"modality": min(r["kind"] for r in dose_reports)} if dose_reports else {}),  # whatever the order
        "study_instance_uid": state["study_instance_uid"],
        "kind": kinds[0] if len(kinds) == 1 else "+".join(kinds) if kinds else None,
        "sources": sorted({r["source"] for r in reports}),
        "report_count": len(reports),
        "sop_instance_uids": [r["sop_instance_uid"] for r in reports],
        "events": len(events),
    }

    # Totals within one kind of dose: whether its reports share events is decided among them only
    # (a PET study's AC and NAC series share one administration; that must not switch the CT total
    # from the CT report's own to the sum of its events, which a report of totals only does not have).
    scopes = {}
    for name in {family(r["kind"]) for r in reports}:
        of_kind = [r for r in reports if family(r["kind"]) == name]
        key_sets = [{event_key(r, e) for e in r["events"]} for r in of_kind]
        disjoint = sum(len(k) for k in key_sets) == len(set().union(*key_sets)) if key_sets else True
        scopes[name] = (of_kind, disjoint, [e for e in events if family(e["kind"]) == name])

    # Callable[..., Any]: the accessors are lambdas binding loop variables through default arguments.
    def total(name: str, acc: Callable[..., Any], ev: Callable[..., Any], kind: str) -> None:
        study[name] = _total(*scopes.get(kind, ([], True, [])), acc, ev)

    study_dw, dw_images = _study_size(state)
    if study_dw is not None:
        study["water_equivalent_diameter_mm"] = round(study_dw, 2)
        study["size_images"] = dw_images
    if any(r["kind"] == "CT" for r in reports):
        for event in events:
            if event["kind"] == "CT":
                event.update(event_ssde(event, *_event_size(state, event)))
        with_ssde = [e for e in events if e.get("ssde_mGy") is not None]
        if with_ssde:
            largest = max(with_ssde, key=lambda e: e["ssde_mGy"])
            study["max_ssde_mGy"], study["ssde_method"] = largest["ssde_mGy"], largest["ssde_method"]
        total("total_dlp_mGycm", lambda r: r["accumulated"].get("total_dlp_mGycm"), lambda e: e.get("dlp_mGycm"), "CT")
        study["max_ctdivol_mGy"] = max((e["ctdivol_mGy"] for e in events if "ctdivol_mGy" in e), default=None)
        for code, name in _CT_TYPE_COUNTS.items():
            study[name] = sum(1 for e in events if e.get("acquisition_type_code") == code)

    projection = [r for r in reports if r["kind"] in ("DX", "RF", "MG")]
    if projection:
        planes = sorted(
            {p for r in projection for p in r["accumulated"].get("planes", {})}
            | {e.get("plane_id") or "A" for e in events if e["kind"] in ("DX", "RF", "MG")}
        )
        study["planes"] = len(planes)
        for metric, event_metric in (("dap_Gym2", "dap_Gym2"), ("dose_rp_mGy", "dose_rp_mGy")):
            for plane in planes:
                total(
                    f"plane_{plane.lower()}_{metric}",
                    lambda r, p=plane, m=metric: r["accumulated"].get("planes", {}).get(p, {}).get(m),
                    lambda e, p=plane, m=event_metric: e.get(m) if (e.get("plane_id") or "A") == p else None,
                    "projection",
                )
            study[f"total_{metric}" if metric == "dap_Gym2" else "dose_rp_total_mGy"] = _sum(
                study.get(f"plane_{p.lower()}_{metric}") for p in planes
            )
        for part, flag in (("fluoro", True), ("acquisition", False)):
            for metric in ("dap_Gym2", "dose_rp_mGy"):
                total(
                    f"{part}_{metric}",
                    lambda r, k=f"{part}_{metric}": _sum(p.get(k) for p in r["accumulated"].get("planes", {}).values()),
                    lambda e, m=metric, f=flag: e.get(m) if e.get("fluoroscopy") is f else None,
                    "projection",
                )
        total(
            "fluoro_time_s",
            lambda r: _sum(p.get("fluoro_time_s") for p in r["accumulated"].get("planes", {}).values()),
            lambda e: e.get("irradiation_duration_s") if e.get("fluoroscopy") else None,
            "projection",
        )
        for side in ("left", "right"):
            total(
                f"agd_{side}_mGy",
                lambda r, s=side: _sum(p.get(f"agd_{s}_mGy") for p in r["accumulated"].get("planes", {}).values()),
                lambda e, s=side: e.get("agd_mGy") if (e.get("laterality") or "").lower() == s else None,
                "projection",
            )

    administrations = [e for e in events if "administered_activity_MBq" in e or "radiopharmaceutical" in e]
    if administrations:
        study["radiopharmaceutical"] = administrations[0].get("radiopharmaceutical")
        study["radionuclide"] = administrations[0].get("radionuclide")
        study["administered_activity_MBq"] = _sum(e.get("administered_activity_MBq") for e in administrations)
    return {k: v for k, v in study.items() if v is not None}, events
