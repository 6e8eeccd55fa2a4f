"""Standard protocol names: a user-edited YAML file maps free text to a standard name and body region.

Free-text protocol names differ by scanner, software version and site ("ABD/PEL PORTAL",
"Abdomen^01_Routine", ...); dose audits and reference levels compare by a standard name, as
OpenREM's standard names do. The file ([dose] standard_names):

    standard_names:
      - name: CT Abdomen-Pelvis        # the standard name
        body_region: Abdomen-Pelvis
        kind: CT                       # optional: CT, DX, RF, MG, NM
        protocols: ["ABD/PEL PORTAL", "Abdomen^01_Routine"]   # exact, case and spacing ignored
        study_descriptions: ["CT ABDOMEN PELVIS WITH CONTRAST"]
        match: {protocol: "(?i)abd.*pel"}                    # optional regular expressions, searched (re.search)
        stations: ["CT1"]              # optional: only these stations

An event takes the first entry whose kind and stations allow it and that names its protocol (or
matches it); a study takes the first entry naming its study description, else the name most of its
events took. A name is applied when the record is made: after editing the file, replay the dose
worker (`diana replay diana-dose --to-beginning`) to rename what was already recorded.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from diana.yaml_files import read_yaml_mapping

__all__ = ["StandardName", "StandardNames", "NamesError", "load_standard_names", "normalized"]

_MATCH_FIELDS = ("protocol", "study_description", "station_name", "target_region")
_KINDS = ("CT", "DX", "RF", "MG", "NM")
_KEYS = {"name", "body_region", "kind", "protocols", "study_descriptions", "stations", "match"}


class NamesError(ValueError):
    """The standard names file is not valid; the message names the entry and the fix."""


def normalized(text: str | None) -> str:
    """Case and runs of spacing ignored: 'Abdomen  routine' == 'ABDOMEN ROUTINE'."""
    return " ".join((text or "").split()).casefold()


@dataclass(frozen=True)
class StandardName:
    name: str
    body_region: str | None = None
    kind: str | None = None
    protocols: frozenset[str] = frozenset()
    study_descriptions: frozenset[str] = frozenset()
    stations: frozenset[str] = frozenset()
    match: dict[str, re.Pattern] = field(default_factory=dict)

    def _allowed(self, kind: str | None, station: str | None) -> bool:
        if self.kind and kind and self.kind != kind:
            return False
        return not self.stations or normalized(station) in self.stations

    def _matches(self, record: dict) -> bool:
        return bool(self.match) and all(
            record.get(k) is not None and pattern.search(str(record[k])) for k, pattern in self.match.items()
        )

    def names_event(self, event: dict, study: dict) -> bool:
        if not self._allowed(event.get("kind") or study.get("kind"), study.get("station_name")):
            return False
        record = {
            **{k: study.get(k) for k in _MATCH_FIELDS},
            **{k: event.get(k) for k in _MATCH_FIELDS if event.get(k)},
        }
        return normalized(event.get("protocol")) in self.protocols or self._matches(record)

    def names_study(self, study: dict) -> bool:
        if not self._allowed(study.get("kind"), study.get("station_name")):
            return False
        return normalized(study.get("study_description")) in self.study_descriptions


@dataclass(frozen=True)
class StandardNames:
    entries: tuple[StandardName, ...] = ()

    def for_event(self, event: dict, study: dict) -> StandardName | None:
        return next((e for e in self.entries if e.names_event(event, study)), None)

    def apply(self, study: dict, events: list[dict]) -> None:
        """Set standard_name and body_region on each event it can name, and on the study."""
        named = []
        for event in events:
            entry = self.for_event(event, study)
            if entry is not None:
                event["standard_name"], event["body_region"] = entry.name, entry.body_region
                named.append(entry)
        entry = next((e for e in self.entries if e.names_study(study)), None)
        if entry is None and named:
            # The name most events took; ties go to the one seen first.
            counts = Counter(e.name for e in named)
            entry = next(e for e in named if counts[e.name] == max(counts.values()))
        if entry is not None:
            study["standard_name"], study["body_region"] = entry.name, entry.body_region


def _texts(name: str, key: str, value) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NamesError(f"standard name {name!r}: {key} must be a list of texts, not {value!r}")
    return frozenset(normalized(v) for v in value)


def _entry(raw) -> StandardName:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise NamesError(f"a standard name entry needs a name: {raw!r}")
    name = str(raw["name"])
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise NamesError(f"standard name {name!r}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(_KEYS))}")
    kind = raw.get("kind")
    if kind is not None and kind not in _KINDS:
        raise NamesError(f"standard name {name!r}: kind must be one of {', '.join(_KINDS)}, not {kind!r}")
    match = {}
    for key, pattern in (raw.get("match") or {}).items():
        if key not in _MATCH_FIELDS:
            raise NamesError(f"standard name {name!r}: cannot match on {key!r}; fields: {', '.join(_MATCH_FIELDS)}")
        try:
            match[key] = re.compile(str(pattern))
        except re.error as exc:
            raise NamesError(f"standard name {name!r}: match.{key} is not a regular expression: {exc}") from None
    entry = StandardName(
        name,
        raw.get("body_region"),
        kind,
        _texts(name, "protocols", raw.get("protocols")),
        _texts(name, "study_descriptions", raw.get("study_descriptions")),
        _texts(name, "stations", raw.get("stations")),
        match,
    )
    if not (entry.protocols or entry.study_descriptions or entry.match):
        raise NamesError(f"standard name {name!r} names nothing: give protocols, study_descriptions or match")
    return entry


def load_standard_names(path: Path | None) -> StandardNames:
    """The mapping in ``path``; without a file, nothing is named."""
    if path is None:
        return StandardNames()
    raw = read_yaml_mapping(path, "standard names", ("standard_names",), NamesError)
    return StandardNames(tuple(_entry(r) for r in raw.get("standard_names") or []))
