"""Who receives which dose alert: a YAML file of recipients, routed by station (room) and rule type.

    recipients:
      - name: CT physicist
        email: ct-physics@hospital.example
        webhook: https://chat.hospital.example/hooks/ct      # POSTed the alert as JSON
        stations: [CT1, CT2]          # optional: alerts of these stations only (case ignored)
        rule_types: [drl, reference_level, cumulative, dose_check]   # optional: these only

A recipient without ``stations`` receives alerts of every station; each recipient gets each alert
once per channel it has (email, webhook).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diana.yaml_files import read_yaml_mapping

__all__ = ["Recipient", "Routing", "RoutingError", "load_routing", "RULE_TYPES"]

RULE_TYPES = ("drl", "reference_level", "cumulative", "dose_check", "repeat")
_KEYS = {"name", "email", "webhook", "stations", "rule_types"}


class RoutingError(ValueError):
    """The routing file is not valid; the message names the recipient and the fix."""


@dataclass(frozen=True)
class Recipient:
    name: str
    email: str | None = None
    webhook: str | None = None
    stations: frozenset[str] = frozenset()
    rule_types: frozenset[str] = frozenset()

    def wants(self, alert: dict) -> bool:
        station = (alert.get("station_name") or "").casefold()
        if self.stations and station not in self.stations:
            return False
        return not self.rule_types or alert.get("rule_type") in self.rule_types

    def channels(self) -> list[tuple[str, str]]:
        """(channel, address) pairs: email and/or webhook."""
        return [(c, a) for c, a in (("email", self.email), ("webhook", self.webhook)) if a]


@dataclass(frozen=True)
class Routing:
    recipients: tuple[Recipient, ...] = ()

    def route(self, alert: dict) -> list[Recipient]:
        return [r for r in self.recipients if r.wants(alert)]


def _recipient(raw) -> Recipient:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise RoutingError(f"a recipient needs a name: {raw!r}")
    name = str(raw["name"])
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise RoutingError(f"recipient {name!r}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(_KEYS))}")
    if not raw.get("email") and not raw.get("webhook"):
        raise RoutingError(f"recipient {name!r} has neither email nor webhook")
    if raw.get("email") and "@" not in str(raw["email"]):
        raise RoutingError(f"recipient {name!r}: email {raw['email']!r} is not an address")
    if raw.get("webhook") and not str(raw["webhook"]).startswith(("http://", "https://")):
        raise RoutingError(f"recipient {name!r}: webhook must be an http:// or https:// URL")
    types = frozenset(raw.get("rule_types") or [])
    if types - set(RULE_TYPES):
        raise RoutingError(f"recipient {name!r}: rule_types are {', '.join(RULE_TYPES)}")
    stations = frozenset(str(s).casefold() for s in raw.get("stations") or [])
    return Recipient(name, raw.get("email"), raw.get("webhook"), stations, types)


def load_routing(path: Path | None) -> Routing:
    if path is None:
        return Routing()
    raw = read_yaml_mapping(path, "alert routing", ("recipients",), RoutingError)
    recipients = tuple(_recipient(r) for r in raw.get("recipients") or [])
    names = [r.name for r in recipients]
    if len(set(names)) != len(names):
        raise RoutingError(f"{path}: recipient names must be unique (they key the delivery ledger)")
    return Routing(recipients)
