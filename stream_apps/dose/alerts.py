"""Dose alert rules (a YAML file) and their evaluation; pure functions of records and rules.

    reference_levels:            # per protocol or body region
      - name: CT abdomen DRL
        match: {kind: CT, protocol: "(?i)abd", target_region: "(?i)abdomen"}   # regular expressions
        ctdivol_mGy: 15          # per irradiation event
        dlp_mGycm: 700           # per study: the DLP of the study's matching events
    dose_check: true             # an event above its scanner's Dose Check notification/alert value
    cumulative:                  # per patient, over a rolling window of study dates
      - {name: 12-week CT DLP, metric: total_dlp_mGycm, window_days: 84, threshold: 3000}
    repeats:                     # per patient: studies of one standard name within a window
      - {name: Repeat CT head, window_days: 7, count: 2, standard_name: "CT Head"}   # standard_name optional

A match pattern is searched (re.search) in the event's field, or the study's when the event has
none, so it matches part of a value: anchor it (``^(abdomen|pelvis)$``) to match the whole. A rule
without ``match`` applies to every record.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from diana.yaml_files import read_yaml_mapping

__all__ = [
    "AlertRules",
    "RulesError",
    "ReferenceLevel",
    "CumulativeRule",
    "study_alerts",
    "event_alerts",
    "withdrawal_action",
    "withdrawal_note",
    "study_sums",
    "rule_basis",
    "report_value",
    "cumulative_alerts",
    "drl_alerts",
    "repeat_alerts",
    "RepeatRule",
    "load_rules",
]

_EVENT_METRICS = ("ctdivol_mGy", "dlp_mGycm", "dap_Gym2", "dose_rp_mGy", "agd_mGy", "administered_activity_MBq")
_STUDY_METRICS = {"dlp_mGycm": "dlp_mGycm", "dap_Gym2": "dap_Gym2", "dose_rp_mGy": "dose_rp_mGy"}
_CUMULATIVE_METRICS = ("total_dlp_mGycm", "total_dap_Gym2", "dose_rp_total_mGy", "administered_activity_MBq")
_MATCH_FIELDS = (
    "kind",
    "protocol",
    "target_region",
    "station_name",
    "manufacturer",
    "manufacturer_model_name",
    "modality",
    "acquisition_type",
    "study_description",
)


class RulesError(ValueError):
    """The rules file is not valid; the message names the rule and the fix."""


@dataclass(frozen=True)
class ReferenceLevel:
    name: str
    match: dict[str, re.Pattern] = field(default_factory=dict)
    event_limits: dict[str, float] = field(default_factory=dict)  # per event: ctdivol_mGy, ...
    study_limits: dict[str, float] = field(default_factory=dict)  # per study: dlp_mGycm, ...

    def matches(self, record: dict, study: dict) -> bool:
        for name, pattern in self.match.items():
            value = record.get(name) if record.get(name) is not None else study.get(name)
            if value is None or not pattern.search(str(value)):
                return False
        return True


@dataclass(frozen=True)
class CumulativeRule:
    name: str
    metric: str
    window_days: float
    threshold: float


@dataclass(frozen=True)
class RepeatRule:
    name: str
    window_days: float
    count: int
    standard_name: str | None = None  # None: any standard name repeated


@dataclass(frozen=True)
class AlertRules:
    reference_levels: tuple[ReferenceLevel, ...] = ()
    dose_check: bool = True
    cumulative: tuple[CumulativeRule, ...] = ()
    repeats: tuple[RepeatRule, ...] = ()


def _number(rule: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise RulesError(f"rule {rule!r}: {key} must be a positive number, not {value!r}")
    return float(value)


def _reference_level(raw: dict) -> ReferenceLevel:
    name = raw.get("name")
    if not name:
        raise RulesError(f"a reference level has no name: {raw!r}")
    match = {}
    for key, pattern in (raw.get("match") or {}).items():
        if key not in _MATCH_FIELDS:
            raise RulesError(f"rule {name!r}: cannot match on {key!r}; fields: {', '.join(_MATCH_FIELDS)}")
        try:
            match[key] = re.compile(str(pattern))
        except re.error as exc:
            raise RulesError(f"rule {name!r}: match.{key} is not a regular expression: {exc}") from None
    limits = {k: v for k, v in raw.items() if k not in ("name", "match")}
    unknown = sorted(set(limits) - set(_EVENT_METRICS))
    if unknown:
        raise RulesError(f"rule {name!r}: unknown limit {unknown[0]!r}; limits: {', '.join(_EVENT_METRICS)}")
    event = {k: _number(name, k, v) for k, v in limits.items() if k not in _STUDY_METRICS}
    study = {k: _number(name, k, v) for k, v in limits.items() if k in _STUDY_METRICS}
    if not event and not study:
        raise RulesError(f"rule {name!r} sets no limit; limits: {', '.join(_EVENT_METRICS)}")
    return ReferenceLevel(name, match, event, study)


def load_rules(path: Path | None) -> AlertRules:
    """The rules in ``path``; without a file, only the scanners' own Dose Check values raise alerts."""
    if path is None:
        return AlertRules()
    raw = read_yaml_mapping(
        path, "dose alert rules", ("reference_levels", "dose_check", "cumulative", "repeats"), RulesError
    )
    repeats = []
    for item in raw.get("repeats") or []:
        name = item.get("name") or "?"
        count = item.get("count", 2)
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise RulesError(f"rule {name!r}: count must be a whole number of at least 2, not {count!r}")
        repeats.append(
            RepeatRule(name, _number(name, "window_days", item.get("window_days")), count, item.get("standard_name"))
        )
    cumulative = []
    for item in raw.get("cumulative") or []:
        name = item.get("name") or "?"
        if item.get("metric") not in _CUMULATIVE_METRICS:
            raise RulesError(f"rule {name!r}: metric must be one of {', '.join(_CUMULATIVE_METRICS)}")
        cumulative.append(
            CumulativeRule(
                name,
                item["metric"],
                _number(name, "window_days", item.get("window_days")),
                _number(name, "threshold", item.get("threshold")),
            )
        )
    return AlertRules(
        tuple(_reference_level(r) for r in raw.get("reference_levels") or []),
        bool(raw.get("dose_check", True)),
        tuple(cumulative),
        tuple(repeats),
    )


def _alert_id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()


def _alert(
    rule: str,
    rule_type: str,
    metric: str,
    value: float,
    threshold: float,
    study: dict,
    event: dict | None = None,
    message: str = "",
) -> dict:
    key = event.get("event_key", "") if event else ""
    return {
        "alert_id": _alert_id(rule, study["study_instance_uid"], key, metric),
        "rule": rule,
        "rule_type": rule_type,
        "metric": metric,
        "value": value,
        "threshold": threshold,
        "study_instance_uid": study["study_instance_uid"],
        "irradiation_event_uid": event.get("irradiation_event_uid") if event else None,
        "protocol": event.get("protocol") if event else None,
        "message": message or f"{rule}: {metric} {value:g} exceeds {threshold:g}",
    }


def _dose_check(event: dict, study: dict) -> list[dict]:
    out = []
    checks = (
        ("ctdivol_mGy", "ctdivol_mGy", "dose_check_ctdivol_notification_mGy", "notification"),
        ("dlp_mGycm", "dlp_mGycm", "dose_check_dlp_notification_mGycm", "notification"),
        ("dose_check_accumulated_ctdivol_forward_estimate_mGy", "ctdivol_mGy", "dose_check_ctdivol_alert_mGy", "alert"),
        ("dose_check_accumulated_dlp_forward_estimate_mGycm", "dlp_mGycm", "dose_check_dlp_alert_mGycm", "alert"),
    )
    for value_field, _metric, limit_field, level in checks:
        value, limit = event.get(value_field), event.get(limit_field)
        if value is not None and limit is not None and value > limit:
            out.append(
                _alert(
                    f"Dose Check {level} value",
                    "dose_check",
                    value_field,
                    value,
                    limit,
                    study,
                    event,
                    f"{value_field} {value:g} exceeds the scanner's Dose Check {level} value {limit:g}",
                )
            )
    return out


def _over_event_limits(level: ReferenceLevel, event: dict, study: dict) -> list[dict]:
    out = []
    for metric, limit in level.event_limits.items():
        value = event.get(metric)
        if value is not None and value > limit:
            out.append(_alert(level.name, "reference_level", metric, value, limit, study, event))
    return out


def event_alerts(rules: AlertRules, study: dict, event: dict) -> list[dict]:
    """The alerts one event raises by itself (per-event reference levels, Dose Check), with the ids
    study_alerts gives them: those of an image-header event a dose report superseded are withdrawn."""
    out = [
        a
        for level in rules.reference_levels
        if level.matches(event, study)
        for a in _over_event_limits(level, event, study)
    ]
    return out + (_dose_check(event, study) if rules.dose_check else [])


def withdrawal_note(superseded_by: str, reason: str | None, replaced_value: float | None) -> str:
    """The note of a withdrawal's CLOSED action; access/alerts/workflow.py builds the same from the
    withdrawn alert (its ``withdrawn_reason`` and ``replaced_value``), so the two writers agree."""
    now = "" if replaced_value is None else f" (now {replaced_value:g})"
    if reason == "under_limit":
        return f"withdrawn: the study's value{now} is no longer over the limit since {superseded_by}"
    return f"withdrawn: the image-header event it was raised from is superseded by {superseded_by}{now}"


def withdrawal_action(
    alert_id: str, superseded_by: str, at: Any, reason: str | None = None, replaced_value: float | None = None
) -> dict:
    """The CLOSED action (dose.alert-actions) of a withdrawn alert: its id is deterministic, so the
    delivery worker, which builds the same from the withdrawn alert (access/alerts/workflow.py
    withdrawal_action), applies it once whichever comes first, and a replay adds nothing. Written by the
    dose worker too, so that a delivery worker that was stopped knows at its start (it reads this topic
    before dose.alerts) not to send it."""
    return {
        "action_id": f"withdrawn:{alert_id}",
        "alert_id": alert_id,
        "action": "CLOSED",
        "at": at,
        "actor": "diana-dose",
        "note": withdrawal_note(superseded_by, reason, replaced_value),
    }


def study_sums(rules: AlertRules, study: dict, events: list[dict]) -> list[tuple[dict, bool]]:
    """Every per-study value a rule compares with a limit (a reference level's ``dlp_mGycm``,
    ``dap_Gym2``, ``dose_rp_mGy`` sum over the study's matching events; the study's or each part's DRL
    value), as the alert it raises when over, over or not, each with whether a comparison was made: a
    level no event of the study matches with that metric (its sum 0), or a DRL part without a value,
    compares nothing, and withdraws nothing (agent.py withdraws an alert raised before whose value is
    now at or under its limit)."""
    out = []
    for level in rules.reference_levels:
        matching = [e for e in events if level.matches(e, study)]
        for metric, limit in level.study_limits.items():
            values = [e[metric] for e in matching if e.get(metric) is not None]
            out.append((_alert(level.name, "reference_level", metric, float(sum(values)), limit, study), bool(values)))
    return out + [(a, a["value"] is not None) for a in drl_alerts(study, over_only=False)]


def rule_basis(rules: AlertRules, alert: dict) -> str:
    """What a per-study alert's comparison rests on besides the study's events: its limit and, for a
    reference level, its match patterns. Recorded when the alert is raised; an alert is withdrawn under
    its limit only while the basis is the same (a rules or levels file changed since withdraws nothing)."""
    level = next((r for r in rules.reference_levels if r.name == alert["rule"]), None)
    match = sorted((k, p.pattern) for k, p in level.match.items()) if level and alert["rule_type"] != "drl" else []
    return repr((alert["rule_type"], alert["metric"], float(alert["threshold"]), match))


def report_value(rules: AlertRules, alert: dict, study: dict, events: list[dict], superseded_by: str) -> float | None:
    """The value the record that superseded an image-header event gives for ``alert``'s metric, when one
    value stands for that exposure: the superseding object's one event of the alert's kind that the
    alert's rule applies to (the same reference level's match; any, for Dose Check). None when it has
    several (which of them is this exposure is not known) or none."""
    level = next((r for r in rules.reference_levels if r.name == alert["rule"]), None)
    if alert["rule_type"] == "reference_level" and level is None:
        return None
    candidates = [
        e
        for e in events
        if e.get("sop_instance_uid") == superseded_by
        and e.get(alert["metric"]) is not None
        and (level is None or level.matches(e, study))
    ]
    return float(candidates[0][alert["metric"]]) if len(candidates) == 1 else None


def study_alerts(rules: AlertRules, study: dict, events: list[dict]) -> list[dict]:
    """Reference-level and Dose Check alerts for a study's current record and distinct events."""
    out = []
    for level in rules.reference_levels:
        matching = [e for e in events if level.matches(e, study)]
        for event in matching:
            out += _over_event_limits(level, event, study)
        for metric, limit in level.study_limits.items():
            values = [e[metric] for e in matching if e.get(metric) is not None]
            if values and sum(values) > limit:
                out.append(
                    _alert(
                        level.name,
                        "reference_level",
                        metric,
                        sum(values),
                        limit,
                        study,
                        None,
                        f"{level.name}: study {metric} {sum(values):g} exceeds {limit:g}",
                    )
                )
    if rules.dose_check:
        for event in events:
            out += _dose_check(event, study)
    return out


def _windows_with(studies: list[dict], latest: dict, days: float, keep) -> list[list[dict]]:
    """The patient's studies (those ``keep`` takes) in each window of ``days`` that holds ``latest``:
    the window ending at ``latest``, and those ending at each later-dated study within ``days`` of it.
    A study that arrives after a later-dated one of the same patient (a late send, a PACS pull) counts
    in the later one's window too, which looking back from ``latest`` alone missed."""
    dated = sorted(
        (
            (date.fromisoformat(s["study_date"]), s["study_instance_uid"], s)
            for s in studies
            if s.get("study_date") and keep(s)
        ),
        key=lambda t: (t[0], t[1]),
    )
    days_of = [d for d, _, _ in dated]
    day, span = date.fromisoformat(latest["study_date"]), timedelta(days=days)
    ends = sorted({day} | {d for d in days_of if day <= d < day + span})
    # Sorted once, each window cut by bisection: (end - span, end].
    return [[s for _, _, s in dated[bisect_right(days_of, end - span) : bisect_right(days_of, end)]] for end in ends]


def cumulative_alerts(rules: AlertRules, studies: list[dict], latest: dict) -> list[dict]:
    """Per-patient alerts for ``latest``: the largest total of any window of the rule that holds it."""
    out: list[dict] = []
    if not latest.get("study_date"):
        return out
    for rule in rules.cumulative:
        if latest.get(rule.metric) is None:
            # A study without the metric (an X-ray study for a DLP rule) changes no window's total; the
            # window ending at its date is only part of one already judged, and would re-raise its alert
            # with a smaller value.
            continue
        windows = _windows_with(studies, latest, rule.window_days, lambda s, m=rule.metric: s.get(m) is not None)
        totals = [(sum(s[rule.metric] for s in w), w) for w in windows if w]
        if not totals:
            continue
        total, window = max(totals, key=lambda t: t[0])
        if total > rule.threshold:
            alert = _alert(
                rule.name,
                "cumulative",
                rule.metric,
                total,
                rule.threshold,
                window[-1],  # one window, one alert, whichever of its studies arrived last
                None,
                f"{rule.name}: {rule.metric} {total:g} over {len(window)} studies in {rule.window_days:g}"
                f" days exceeds {rule.threshold:g}",
            )
            alert.update(window_days=rule.window_days, window_study_uids=[s["study_instance_uid"] for s in window])
            out.append(alert)
    return out


def drl_alerts(study: dict, over_only: bool = True) -> list[dict]:
    """An alert for a study over the reference level of its standard name, or, for a study of several
    standard names (a head and a body scan), one for each part over its own level (reference_levels.py
    compares them); the alert's rule and message name the standard name whose level was exceeded.
    ``over_only=False``: every comparison made, over or not (study_sums)."""
    parts = study.get("drl_parts")
    if parts is None:
        if not (study.get("over_drl") if over_only else study.get("drl_value") is not None):
            return []
        over: list[dict[str, Any]] = [
            {
                "standard_name": study.get("standard_name"),
                "metric": study["drl_metric"],
                "value": study["drl_value"],
                "level": study["drl_level"],
                "source": study.get("drl_source"),
            }
        ]
    else:
        over = [p for p in parts if p["over_drl"] or not over_only]
    out = []
    for c in over:
        what = "study" if parts is None else f"part ({c['events']} events) of a study of several standard names"
        out.append(
            _alert(
                f"DRL {c['standard_name']}",
                "drl",
                c["metric"],
                c["value"],
                c["level"],
                study,
                None,
                f"{c['standard_name']}: {what} {c['metric']} {c['value']:g} exceeds the {c['source']} reference level"
                f" {c['level']:g}",
            )
        )
    return out


def repeat_alerts(rules: AlertRules, studies: list[dict], latest: dict) -> list[dict]:
    """Per patient: the latest study's standard name seen in ``count`` or more studies within the window."""
    name = latest.get("standard_name")
    if not name or not latest.get("study_date"):
        return []
    out = []
    for rule in rules.repeats:
        if rule.standard_name and rule.standard_name != name:
            continue
        windows = _windows_with(studies, latest, rule.window_days, lambda s: s.get("standard_name") == name)
        window = max(windows, key=len, default=[])
        if len(window) >= rule.count:
            alert = _alert(
                rule.name,
                "repeat",
                "studies",
                float(len(window)),
                float(rule.count),
                window[-1],
                None,
                f"{rule.name}: {len(window)} {name} studies of this patient in {rule.window_days:g} days",
            )
            alert.update(window_days=rule.window_days, window_study_uids=[s["study_instance_uid"] for s in window])
            out.append(alert)
    return out
