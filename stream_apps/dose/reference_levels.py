"""Diagnostic reference levels (DRLs) by standard name: per-event and per-study flags, and the survey.

The file ([dose] reference_levels):

    window_days: 365           # the survey: median per standard name over studies of this window
    minimum_studies: 10        # fewer studies than this: the median is shown but marked as too few
    reference_levels:
      CT Head:
        source: "national DRLs of your country (edition)"     # shown in the report
        study: {metric: total_dlp_mGycm, national: 970, local: 850}
        event: {metric: ctdivol_mGy, national: 60, local: 52}

Each study and each event of a standard name (standard_names.py) is compared with its level: the
local one when set (a site's own, usually the tighter), else the national one. The record carries
the metric, the level applied, which one (local/national) and whether it is exceeded. A study over
its level also raises an alert (rule type ``drl``).

DRLs are set per examination. A study whose events took several standard names (a head and a body
scan in one study) is not compared whole with one name's level: each part (the events of one
standard name) is compared with its own level, its metric made from its events (``drl_parts``), and
``drl_not_compared`` says why the study's own totals were not. The study's ``drl_*`` fields then
describe its part furthest over (or nearest to) its level, named by ``drl_standard_name``. A study
whose parts have no study level, none of them (events named by protocol: "CT Chest" and "CT
Abdomen-Pelvis" in a "CT Chest-Abdomen-Pelvis" study), is compared whole with its own name's level.

The survey compares as DRL surveys do: the median of the study metric over the window's studies
of each standard name, against the levels (``survey``; queried by access/dose_survey.py); a study of
several parts counts each part under its own name.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diana.yaml_files import read_yaml_mapping

__all__ = [
    "Level",
    "ReferenceLevels",
    "LevelsError",
    "load_reference_levels",
    "survey",
    "part_value",
    "STUDY_METRICS",
]

EVENT_METRICS = (
    "ctdivol_mGy",
    "dlp_mGycm",
    "ssde_mGy",
    "dap_Gym2",
    "dose_rp_mGy",
    "agd_mGy",
    "administered_activity_MBq",
)


# A study metric made from the events of one part of the study: (event field, how the part's values
# combine, which events count). The events are the study's distinct ones (study.py), as its totals' are.
_PART_METRICS: dict[str, tuple[str, Callable[[list[float]], float], Callable[[dict], bool] | None]] = {
    "total_dlp_mGycm": ("dlp_mGycm", sum, None),
    "max_ctdivol_mGy": ("ctdivol_mGy", max, None),
    "max_ssde_mGy": ("ssde_mGy", max, None),
    "total_dap_Gym2": ("dap_Gym2", sum, None),
    "dose_rp_total_mGy": ("dose_rp_mGy", sum, None),
    "fluoro_time_s": ("irradiation_duration_s", sum, lambda e: e.get("fluoroscopy") is True),
    "agd_left_mGy": ("agd_mGy", sum, lambda e: (e.get("laterality") or "").lower() == "left"),
    "agd_right_mGy": ("agd_mGy", sum, lambda e: (e.get("laterality") or "").lower() == "right"),
    "administered_activity_MBq": ("administered_activity_MBq", sum, None),
}


STUDY_METRICS = tuple(_PART_METRICS)


def part_value(metric: str, events: list[dict]) -> float | None:
    """``metric`` (a study metric) over these events only; None when none of them carries its value."""
    field, combine, counts = _PART_METRICS[metric]
    values = [e[field] for e in events if e.get(field) is not None and (counts is None or counts(e))]
    return combine(values) if values else None


class LevelsError(ValueError):
    """The reference levels file is not valid; the message names the entry and the fix."""


@dataclass(frozen=True)
class Level:
    metric: str
    national: float | None = None
    local: float | None = None

    @property
    def applied(self) -> tuple[float, str]:
        return (self.local, "local") if self.local is not None else (self.national, "national")  # type: ignore[return-value]


@dataclass(frozen=True)
class ReferenceLevels:
    study: dict[str, Level]
    event: dict[str, Level]
    sources: dict[str, str]
    window_days: int = 365
    minimum_studies: int = 10

    def apply(self, study: dict, events: list[dict]) -> None:
        """Flag each event against the level of its standard name, and the study against its own (a study
        of several standard names: each part against its own, ``_apply_parts``)."""
        for event in events:
            level = self.event.get(event.get("standard_name") or "")
            value = None if level is None else event.get(level.metric)
            if level is not None and value is not None:
                limit, source = level.applied
                event.update(drl_metric=level.metric, drl_level=limit, drl_source=source, over_drl=value > limit)
        parts = list(dict.fromkeys(e["standard_name"] for e in events if e.get("standard_name")))
        # Parts none of which has a study level (events named by protocol, the study a combined
        # examination with a level of its own: "CT Chest-Abdomen-Pelvis") leave the study's own level.
        if len(parts) > 1 and any(name in self.study for name in parts):
            self._apply_parts(study, events, parts)
            return
        name = study.get("standard_name") or ""
        level = self.study.get(name)
        comparison = None if level is None else self._compared(name, study.get(level.metric))
        if comparison is not None:
            study.update(_study_fields(comparison))

    def _compared(self, name: str, value: float | None, events: int | None = None) -> dict | None:
        """The comparison of ``value`` with the study level of ``name``; None if there is nothing to compare."""
        level = self.study.get(name)
        if level is None or value is None:
            return None
        limit, source = level.applied
        return {
            "standard_name": name,
            "metric": level.metric,
            "value": value,
            "level": limit,
            "source": source,
            "over_drl": value > limit,
            "events": events,
        }

    def _apply_parts(self, study: dict, events: list[dict], parts: list[str]) -> None:
        """A study of several standard names, one of them at least with a study level: each part against
        its own level, never the whole against one."""
        compared, missing = [], []
        for name in parts:
            if name not in self.study:
                missing.append(f"{name} (no study reference level)")
                continue
            of_part = [e for e in events if e.get("standard_name") == name]
            comparison = self._compared(name, part_value(self.study[name].metric, of_part), len(of_part))
            if comparison is None:
                missing.append(f"{name} (its events carry no value for {self.study[name].metric})")
            else:
                compared.append({**comparison, "body_region": of_part[0].get("body_region")})
        why = (
            f"the study holds {len(parts)} standard names ({', '.join(parts)}): its totals are not compared "
            "with one name's reference level; each part is compared with its own" + (" (drl_parts)" if compared else "")
        )
        study["drl_not_compared"] = why + (f"; not compared: {', '.join(missing)}" if missing else "")
        if compared:
            study["drl_parts"] = compared
            study.update(_study_fields(max(compared, key=lambda c: c["value"] / c["level"])))


def _study_fields(comparison: dict) -> dict:
    """A comparison as the study's drl_* fields (the part furthest over its level, for a study of parts)."""
    return {
        "drl_standard_name": comparison["standard_name"],
        "drl_metric": comparison["metric"],
        "drl_value": comparison["value"],
        "drl_level": comparison["level"],
        "drl_source": comparison["source"],
        "over_drl": comparison["over_drl"],
    }


def _level(name: str, part: str, raw, metrics: tuple[str, ...]) -> Level:
    if not isinstance(raw, dict) or raw.get("metric") not in metrics:
        raise LevelsError(f"reference level {name!r}: {part}.metric must be one of {', '.join(metrics)}")
    values = {}
    for key in ("national", "local"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise LevelsError(f"reference level {name!r}: {part}.{key} must be a positive number, not {value!r}")
        values[key] = None if value is None else float(value)
    if values["national"] is None and values["local"] is None:
        raise LevelsError(f"reference level {name!r}: {part} needs a national or a local level")
    unknown = sorted(set(raw) - {"metric", "national", "local"})
    if unknown:
        raise LevelsError(f"reference level {name!r}: unknown key {part}.{unknown[0]}; keys: metric, national, local")
    return Level(raw["metric"], values["national"], values["local"])


def load_reference_levels(path: Path | None) -> ReferenceLevels:
    """The levels in ``path``; without a file, nothing is compared."""
    if path is None:
        return ReferenceLevels({}, {}, {})
    raw = read_yaml_mapping(
        path, "reference levels", ("window_days", "minimum_studies", "reference_levels"), LevelsError, noun="key"
    )
    study, event, sources = {}, {}, {}
    for name, entry in (raw.get("reference_levels") or {}).items():
        if not isinstance(entry, dict) or not ({"study", "event"} & set(entry)):
            raise LevelsError(f"reference level {name!r}: give a study and/or an event level")
        if "study" in entry:
            study[name] = _level(name, "study", entry["study"], STUDY_METRICS)
        if "event" in entry:
            event[name] = _level(name, "event", entry["event"], EVENT_METRICS)
        sources[name] = str(entry.get("source") or "")
    window, minimum = raw.get("window_days", 365), raw.get("minimum_studies", 10)
    for key, value in (("window_days", window), ("minimum_studies", minimum)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LevelsError(f"{path}: {key} must be a positive whole number, not {value!r}")
    return ReferenceLevels(study, event, sources, window, minimum)


def survey(levels: ReferenceLevels, studies: list[dict]) -> list[dict]:
    """Per standard name with a study level: studies, median of its metric, the levels and the verdicts."""
    rows = []
    for name, level in sorted(levels.study.items()):
        values = [v for s in studies for v in _survey_values(s, name, level.metric)]
        median = statistics.median(values) if values else None
        limit, source = level.applied
        rows.append(
            {
                "standard_name": name,
                "metric": level.metric,
                "studies": len(values),
                "median": median,
                "local": level.local,
                "national": level.national,
                "applied": source,
                "median_over_level": None if median is None else median > limit,
                "ratio": None if median is None else median / limit,
                "over_level_studies": sum(1 for v in values if v > limit),
                "too_few": len(values) < levels.minimum_studies,
                "source": levels.sources.get(name, ""),
            }
        )
    return rows


def _survey_values(study: dict, name: str, metric: str) -> list[float]:
    """What one study contributes to the survey of ``name``, as its alerts compare it: the value of its
    part of that name when it was compared part by part (a head and a body scan; none when no part
    could be: ``drl_not_compared`` without ``drl_parts``), else its own value when it has that name."""
    if study.get("drl_parts") or study.get("drl_not_compared"):
        return [
            p["value"] for p in study.get("drl_parts") or () if p["standard_name"] == name and p["metric"] == metric
        ]
    value = study.get(metric) if study.get("standard_name") == name else None
    return [] if value is None else [value]
