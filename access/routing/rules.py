"""The routing rules file: destinations, and rules that send matching instances or studies to them.

    destinations:
      - name: workstation            # names the destination's consumer group: diana-route-workstation
        ae_title: WS3D               # a DICOM AE: C-STORE SCU
        host: 10.0.0.5
        port: 11112
        tls: false                   # DICOM over TLS (verified against [receiver] tls_ca_file, else system CAs)
      - name: research
        stow_url: http://10.0.0.9:8042/dicom-web/studies     # a DICOMweb STOW-RS endpoint
        deidentify_project: LUNG     # optional: de-identified first ([export] site_secret_file)
        max_attempts: 3              # optional: failures before an instance is dead-lettered
    rules:
      - name: ct-chest-to-3d
        match:                       # every condition given must hold; lists mean "any of"
          modality: [CT]
          calling_ae: [CT1]
          station: [CTSTATION1]
          sop_class: [1.2.840.10008.5.1.4.1.1.2]
          body_part: [CHEST]
          study_description: "(?i)thorax|chest"     # a regular expression, searched
        whole_study: false           # true: the whole study once it is complete (dicom.studies says when),
                                     # then its late instances once it is complete again (AMENDED)
        destinations: [workstation]
      - name: alerted-to-qa
        match: {dose_alert: true}    # studies that raised a dose alert (dose.alerts), whole; each
                                     # instance once however many alerts ([routing] state_dir, as whole_study);
                                     # late instances once the study is complete again (dicom.studies)
        destinations: [research]

Matching uses the fields of the InstanceArrived event (no file is read) for instance rules; study and
dose-alert rules match the archived headers of the study's instances and forward those that match
(so calling_ae, which only the event knows, is for instance rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diana.credentials import redact_url
from diana.yaml_files import read_yaml_mapping

__all__ = ["Destination", "Rule", "RoutingRules", "RulesError", "load_rules", "parse_rules", "MATCH_FIELDS"]

# rule key -> InstanceArrived field; values compared case-insensitively, surrounding spaces ignored
MATCH_FIELDS = {
    "modality": "modality",
    "calling_ae": "calling_ae",
    "station": "station_name",
    "sop_class": "sop_class_uid",
    "body_part": "body_part_examined",
}
_MATCH_KEYS = (*MATCH_FIELDS, "study_description", "dose_alert")
_RULE_KEYS = ("name", "match", "whole_study", "destinations")
_DEST_KEYS = ("name", "ae_title", "host", "port", "tls", "stow_url", "deidentify_project", "max_attempts")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RulesError(ValueError):
    """The rules file is not valid; the message names the rule or destination and the fix."""


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False
    stow_url: str = ""
    deidentify_project: str = ""
    max_attempts: int = 0  # 0: [routing] max_attempts

    @property
    def kind(self) -> str:
        return "stow" if self.stow_url else "dicom"

    def describe(self) -> str:
        """Where it goes, for people (``diana route --check``): a STOW-RS URL's password replaced by ***."""
        where = (
            redact_url(self.stow_url)
            if self.stow_url
            else f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" * self.tls)
        )
        return where + (f", de-identified for project {self.deidentify_project}" if self.deidentify_project else "")


@dataclass(frozen=True)
class Rule:
    name: str
    destinations: tuple[str, ...]
    values: dict[str, frozenset[str]] = field(default_factory=dict)  # MATCH_FIELDS key -> allowed (casefolded)
    description: re.Pattern[str] | None = None
    dose_alert: bool = False
    whole_study: bool = False

    @property
    def trigger(self) -> str:
        """What starts a forwarding: 'instance' (dicom.instances), 'study' (dicom.studies), 'alert' (dose.alerts)."""
        return "alert" if self.dose_alert else "study" if self.whole_study else "instance"

    def matches(self, header: dict[str, Any]) -> bool:
        """Whether an instance (InstanceArrived fields, or the same names read from its header) matches."""
        for key, allowed in self.values.items():
            value = header.get(MATCH_FIELDS[key])
            if value is None or str(value).strip().casefold() not in allowed:
                return False
        if self.description is not None:
            return self.description.search(str(header.get("study_description") or "")) is not None
        return True


@dataclass(frozen=True)
class RoutingRules:
    destinations: dict[str, Destination]
    rules: tuple[Rule, ...]

    def rules_for(self, destination: str) -> list[Rule]:
        return [r for r in self.rules if destination in r.destinations]


def _strings(rule: str, key: str, raw: Any) -> frozenset[str]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(v, str | int) and str(v).strip() for v in items):
        raise RulesError(f"rule {rule!r}: match {key} is a value or a list of values, e.g. {key}: [CT]")
    return frozenset(str(v).strip().casefold() for v in items)


def _rule(raw: Any, destinations: dict[str, Destination], index: int) -> Rule:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise RulesError(f"rule {index + 1} needs a name (name: ct-to-workstation)")
    name = raw["name"].strip()
    unknown = sorted(set(raw) - set(_RULE_KEYS))
    if unknown:
        raise RulesError(f"rule {name!r}: unknown key {unknown[0]!r}; keys: {', '.join(_RULE_KEYS)}")
    match = raw.get("match") or {}
    if not isinstance(match, dict):
        raise RulesError(f"rule {name!r}: match is a mapping of conditions ({', '.join(_MATCH_KEYS)})")
    unknown = sorted(set(match) - set(_MATCH_KEYS))
    if unknown:
        raise RulesError(f"rule {name!r}: unknown match condition {unknown[0]!r}; conditions: {', '.join(_MATCH_KEYS)}")
    values = {key: _strings(name, key, match[key]) for key in MATCH_FIELDS if key in match}
    description = None
    if "study_description" in match:
        try:
            description = re.compile(str(match["study_description"]))
        except re.error as exc:
            raise RulesError(f"rule {name!r}: study_description is not a regular expression: {exc}") from None
    dose_alert = match.get("dose_alert", False)
    whole_study = raw.get("whole_study", False)
    for key, value in (("match dose_alert", dose_alert), ("whole_study", whole_study)):
        if not isinstance(value, bool):
            raise RulesError(f"rule {name!r}: {key} is true or false")
    if (dose_alert or whole_study) and "calling_ae" in values:
        raise RulesError(
            f"rule {name!r}: calling_ae is known for single instances only (the event carries it, the file does not); "
            "drop it or set whole_study: false without dose_alert"
        )
    targets = raw.get("destinations")
    if not isinstance(targets, list) or not targets:
        raise RulesError(f"rule {name!r}: destinations is a list of destination names, e.g. destinations: [pacs2]")
    for target in targets:
        if target not in destinations:
            known = ", ".join(destinations) or "none defined"
            raise RulesError(f"rule {name!r}: no destination named {target!r} (destinations: {known})")
    return Rule(name, tuple(str(t) for t in targets), values, description, dose_alert, whole_study)


def _destination(raw: Any, index: int) -> Destination:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not _NAME.match(raw["name"]):
        raise RulesError(
            f"destination {index + 1} needs a name of letters, digits, '.', '_' or '-' (it names a consumer group)"
        )
    name = raw["name"]
    unknown = sorted(set(raw) - set(_DEST_KEYS))
    if unknown:
        raise RulesError(f"destination {name!r}: unknown key {unknown[0]!r}; keys: {', '.join(_DEST_KEYS)}")
    attempts = raw.get("max_attempts", 0)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        raise RulesError(f"destination {name!r}: max_attempts is a whole number of failures (1 or more)")
    project = str(raw.get("deidentify_project") or "")
    if raw.get("stow_url"):
        url = str(raw["stow_url"])
        if not url.startswith(("http://", "https://")):
            raise RulesError(f"destination {name!r}: stow_url must be an http:// or https:// URL")
        if any(k in raw for k in ("ae_title", "host", "port", "tls")):
            raise RulesError(f"destination {name!r}: either stow_url or ae_title/host/port, not both")
        return Destination(name, stow_url=url, deidentify_project=project, max_attempts=attempts)
    ae, host, port, tls = raw.get("ae_title"), raw.get("host"), raw.get("port"), raw.get("tls", False)
    if not isinstance(ae, str) or not 0 < len(ae.strip()) <= 16:
        raise RulesError(f"destination {name!r}: needs ae_title (at most 16 characters), host and port, or stow_url")
    if not isinstance(host, str) or not host or not isinstance(port, int) or not 0 < port < 65536:
        raise RulesError(f"destination {name!r}: needs host and a port between 1 and 65535")
    if not isinstance(tls, bool):
        raise RulesError(f"destination {name!r}: tls is true or false")
    return Destination(name, ae.strip(), host, port, tls, "", project, attempts)


def parse_rules(raw: dict[str, Any], source: str = "routing rules") -> RoutingRules:
    dests_raw = raw.get("destinations") or []
    if not isinstance(dests_raw, list):
        raise RulesError(f"{source}: destinations is a list (- name: ...)")
    destinations: dict[str, Destination] = {}
    for i, d in enumerate(dests_raw):
        dest = _destination(d, i)
        if dest.name in destinations:
            raise RulesError(f"{source}: destination {dest.name!r} is defined twice")
        destinations[dest.name] = dest
    rules_raw = raw.get("rules") or []
    if not isinstance(rules_raw, list):
        raise RulesError(f"{source}: rules is a list (- name: ...)")
    rules = tuple(_rule(r, destinations, i) for i, r in enumerate(rules_raw))
    names = [r.name for r in rules]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise RulesError(f"{source}: rule {duplicate!r} is defined twice")
    if not rules:
        raise RulesError(f"{source}: no rules; add at least one under rules:")
    return RoutingRules(destinations, rules)


def load_rules(path: Path) -> RoutingRules:
    raw = read_yaml_mapping(path, "routing rules", ("destinations", "rules"), RulesError)
    return parse_rules(raw, str(path))
