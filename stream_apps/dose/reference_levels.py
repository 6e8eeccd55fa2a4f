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

The survey compares as DRL surveys do: the median of the study metric over the window's studies
of each standard name, against the levels (``survey``; queried by access/dose_survey.py).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from diana.yaml_files import read_yaml_mapping

__all__ = ["Level", "ReferenceLevels", "LevelsError", "load_reference_levels", "survey", "STUDY_METRICS"]

STUDY_METRICS = (
    "total_dlp_mGycm",
    "max_ctdivol_mGy",
    "max_ssde_mGy",
    "total_dap_Gym2",
    "dose_rp_total_mGy",
    "fluoro_time_s",
    "agd_left_mGy",
    "agd_right_mGy",
    "administered_activity_MBq",
)
EVENT_METRICS = (
    "ctdivol_mGy",
    "dlp_mGycm",
    "ssde_mGy",
    "dap_Gym2",
    "dose_rp_mGy",
    "agd_mGy",
    "administered_activity_MBq",
)


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
        """Flag each event and the study against the level of its standard name."""
        for event in events:
            level = self.event.get(event.get("standard_name") or "")
            value = None if level is None else event.get(level.metric)
            if level is not None and value is not None:
                limit, source = level.applied
                event.update(drl_metric=level.metric, drl_level=limit, drl_source=source, over_drl=value > limit)
        level = self.study.get(study.get("standard_name") or "")
        value = None if level is None else study.get(level.metric)
        if level is not None and value is not None:
            limit, source = level.applied
            study.update(
                drl_metric=level.metric, drl_value=value, drl_level=limit, drl_source=source, over_drl=value > limit
            )


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
        values = [
            s[level.metric] for s in studies if s.get("standard_name") == name and s.get(level.metric) is not None
        ]
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
