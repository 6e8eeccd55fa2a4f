"""`diana route`: forward arriving instances and studies to other systems by rules (docs/ROUTING.md)."""

from __future__ import annotations

import argparse

from diana.cli._common import fail, start_metrics, stop_on_signals
from diana.config import Config


def cmd_route(cfg: Config, args: argparse.Namespace) -> int:
    """Forward instances matching the routing rules to their destinations (C-STORE or STOW-RS), each
    destination with its own consumer group, retries and dead letters."""
    from diana.access.keyfiles import KeyFileError
    from diana.access.routing.rules import RulesError
    from diana.access.routing.service import group_id, load_configured_rules, run_routing

    try:
        rules = load_configured_rules(cfg, args.rules)
    except RulesError as exc:
        return fail("route", str(exc))
    if args.check:
        for name, dest in rules.destinations.items():
            print(f"destination {name}: {dest.describe()}  (consumer group {group_id(cfg, name)})")
        for rule in rules.rules:
            conditions = [f"{k} in {sorted(v)}" for k, v in rule.values.items()]
            conditions += [f"study_description ~ /{rule.description.pattern}/"] if rule.description else []
            conditions += ["a dose alert was raised"] if rule.dose_alert else []
            what = "whole studies" if rule.trigger != "instance" else "instances"
            print(
                f"rule {rule.name}: {what} where {' and '.join(conditions) or 'anything'} -> {', '.join(rule.destinations)}"
            )
        return 0
    stop = stop_on_signals()
    try:
        start_metrics(cfg, cfg.routing.metrics_port)
        run_routing(cfg, rules, stop)
    except (RulesError, KeyFileError) as exc:
        return fail("route", str(exc))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route", help="forward arriving DICOM to other systems by rules", description=cmd_route.__doc__)
    p.add_argument("--rules", metavar="FILE", help="the rules YAML (default: [routing] rules)")
    p.add_argument("--check", action="store_true", help="read and check the rules, print them, and exit")
    p.set_defaults(func=cmd_route)
