"""The one ``diana`` command. Each area's subcommands live in their own module (``pipeline``,
``access``, ``operations``); a command parses, calls the module that does the work, and prints."""

from __future__ import annotations

import argparse
import sys

# structlog imports rich, when it is installed, for tracebacks that diana's logging never uses
# (logs.py: plain ones, without local variables). Only a test venv has it (import-linter needs
# it); there it was 0.1 s of every command's start, of a reindex's 1.3 s (docs/PERFORMANCE.md).
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]  # None: import fails (Python's own marker)

from diana.cli import access, collect, operations, pipeline, route  # noqa: E402
from diana.cli._common import os_error, service_error  # noqa: E402
from diana.cli.access import COHORT_FILTERS  # noqa: E402
from diana.config import Config, ConfigError, clear_text_endpoints, load_config, warn_clear_text  # noqa: E402
from diana.credentials import redact  # noqa: E402
from diana.logs import configure_logging  # noqa: E402

__all__ = ["build_parser", "clear_text_used_by", "is_service", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diana",
        description="diana-star: DICOM ingress to a durable Kafka event stream, archive and OpenSearch index.",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file (default: $DIANA_CONFIG; settings also via DIANA_<SECTION>_<KEY>)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pipeline.register(sub)
    access.register(sub)
    collect.register(sub)
    operations.register(sub)
    route.register(sub)
    # --config after the command too (`diana status --config FILE`); SUPPRESS: given before it, it stays.
    for command in _commands(p):
        command.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="TOML config file, as in diana --config FILE COMMAND",
        )
    return p


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    """The action holding ``parser``'s commands, if it has any."""
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command's and subcommand's parser below ``parser``."""
    action = _subparsers(parser)
    found = []
    for child in action.choices.values() if action else ():
        found += [child, *_commands(child)]
    return found


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` ran, whose usage an error should show."""
    action = _subparsers(parser)
    chosen = action.choices.get(getattr(args, action.dest, None) or "") if action else None
    return parser if chosen is None else _innermost(chosen, args)


# The long-running services (each its own process under `diana run`). They say once at their start which
# settings send in clear to other hosts (config.clear_text); short commands (status, cohort, replay, a
# check) do not repeat it at every call. `diana run` itself does not: each service it starts does.
_SERVICES = {"receive", "aggregate", "sink", "serve"}
_SERVICE_ACTIONS = {"alerts": "deliver", "collect": "run"}


def is_service(args: argparse.Namespace) -> bool:
    """Whether ``args`` start a long-running service (which warns of clear-text settings at start)."""
    if args.command in _SERVICES:
        return True
    if args.command == "route":
        return not getattr(args, "check", False)
    if args.command == "dose":
        return getattr(args, "dose_action", None) is None
    return args.command in _SERVICE_ACTIONS and getattr(args, "action", None) == _SERVICE_ACTIONS[args.command]


def clear_text_used_by(args: argparse.Namespace, cfg: Config) -> dict[str, list[str]]:
    """The clear-text settings (config.clear_text_endpoints) of the service ``args`` start, without those
    it never uses: the mail relay is the alert delivery's alone, the object store is not the aggregates', the
    dose worker's nor the alert delivery's (each service warned of both)."""
    found = clear_text_endpoints(cfg)
    if args.command != "alerts":
        found = {setting: hosts for setting, hosts in found.items() if not setting.startswith("[alerts]")}
    if args.command in ("aggregate", "dose", "alerts"):
        found = {setting: hosts for setting, hosts in found.items() if not setting.startswith("[storage]")}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        message = f"unrecognized arguments: {' '.join(unknown)}"
        if args.command == "cohort":
            message += f"; valid filters: {COHORT_FILTERS}"
        _innermost(parser, args).error(message)  # with the command's own usage line
    check = getattr(args, "check_args", None)  # a command's rule across its arguments: a usage error too
    problem = check(args) if check else None
    if problem:
        _innermost(parser, args).error(problem)
    try:
        cfg = load_config(args.config)
        configure_logging(cfg.log.level, cfg.log.format)
    except (ConfigError, ValueError) as exc:
        print(f"diana: configuration error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the configuration file is a folder, or cannot be read
        print(f"diana: configuration file: {redact(os_error(exc))}", file=sys.stderr)
        return 2
    if is_service(args):
        warn_clear_text(clear_text_used_by(args, cfg))
    try:
        return args.func(cfg, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from diana.compose.local.stack import StackError

        if isinstance(exc, (StackError, ConfigError)):
            print(f"diana: {redact(str(exc))}", file=sys.stderr)
            return 1
        unreachable = service_error(exc, cfg)
        if unreachable is not None:
            print(f"diana {args.command}: {redact(unreachable)}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError):
            # A path that is a folder, a folder that does not exist, a port in use, a host unknown: the
            # system's own words and what they are about are the message, not a traceback.
            print(f"diana {args.command}: {redact(os_error(exc))}", file=sys.stderr)
            return 1
        # The traceback as Python prints it, but through redact: no password in an error.
        import traceback

        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1
