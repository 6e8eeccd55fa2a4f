"""Operating the pipeline: status, replay, reindex, the dose acceptance run, and the local stack."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diana.cli._common import fail, progress_bar, whole_number
from diana.cli.pipeline import cmd_topics
from diana.config import Config
from diana.credentials import redact

# `diana acceptance` is run from the checkout, beside which the shared acceptance data lives.
DEFAULT_ACCEPTANCE_DIR = Path("..") / "shared" / "acceptance" / "dose"
INDEX_KINDS = "instances,series,studies,dose-events,dose-studies,dose-alerts,deadletters"


def cmd_status(cfg: Config, _args: argparse.Namespace) -> int:
    """Topics and offsets, consumer lag, index document counts, the number of objects in the archive
    and waiting in the landing store."""
    from diana.operations.status import collect_status, render_status

    def say(line: str) -> None:
        # Only to a person waiting at a terminal: counting a large archive takes minutes, and looked hung.
        if sys.stderr.isatty():
            print(f"diana status: {line}", file=sys.stderr, flush=True)

    status = collect_status(cfg, say)
    print(redact(render_status(status)))
    return 1 if status.errors else 0


def cmd_replay(cfg: Config, args: argparse.Namespace) -> int:
    """Move a stopped consumer group to the beginning, the end, a time or an offset."""
    from datetime import UTC, datetime

    from diana.operations.replay import ReplayError, apply_replay, plan_replay, render_moves, watch_lag

    when = None
    if args.to_datetime:
        try:
            when = datetime.fromisoformat(args.to_datetime)
        except ValueError:
            return fail(
                "replay", f"--to-datetime {args.to_datetime!r} is not ISO 8601 (e.g. 2024-03-15T08:00:00+01:00)"
            )
        zone = "" if when.tzinfo else " (no UTC offset given: this host's local time)"
        when = when.astimezone()  # a time without an offset is the host's local time, as a person means it
        print(f"--to-datetime {args.to_datetime}{zone} is {when.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC")
    to = "beginning" if args.to_beginning else "end" if args.to_end else "datetime" if when else "offset"
    try:
        moves = plan_replay(cfg, args.group, args.topic, to=to, when=when, offset=args.to_offset)
        print(render_moves(moves))
        total = sum(m.to_reprocess for m in moves)
        skipped = sum(m.to_skip for m in moves)
        if skipped:
            print(f"{skipped} messages will be SKIPPED (never processed by {args.group})")
        if args.dry_run:
            print(f"dry run: {total} messages would be processed again by {args.group}; nothing moved")
            return 0
        # --to-end says it skips; any other move past unprocessed messages must be asked for.
        if skipped and not (args.allow_skip or args.to_end):
            return fail(
                "replay",
                f"nothing moved: the move skips {skipped} messages {args.group} has not processed. Pass "
                "--allow-skip if they are to be skipped, or choose an earlier position",
                code=1,
            )
        apply_replay(cfg, args.group, moves)
        print(f"moved {args.group}: {total} messages will be processed again when its consumers start")
    except ReplayError as exc:
        return fail("replay", str(exc), code=1)
    if args.watch:
        watch_lag(cfg, args.group, [m.topic for m in moves])
    return 0


def cmd_reindex(cfg: Config, args: argparse.Namespace) -> int:
    """Build new index versions from the topics while the live sink keeps writing; swap aliases."""
    # opensearch-py imports its async client, and aiohttp with it, whenever aiohttp is installed
    # (faust-streaming needs it): 0.1 s of this command's start, for a client it never uses. (Not
    # requests, 20 ms more: opensearch-py's request signer imports it unconditionally.)
    sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]  # None: import fails
    from diana.clients import opensearch_client
    from diana.operations.reindex import MIN_EVENTS_PER_PROCESS, Reindexer, ReindexFailed, spare_the_collector
    from diana.schemas.layout import IndexLayout
    from diana.sinks.consumer import DeadLetters

    spare_the_collector()

    kinds = args.kinds.split(",")
    layout = IndexLayout(cfg.opensearch.index_prefix)
    unknown = sorted(set(kinds) - set(layout.id_fields))
    if unknown:
        return fail("reindex", f"unknown kind(s) {', '.join(unknown)}; valid: {', '.join(layout.id_fields)}")
    reindexer = Reindexer(
        opensearch_client(cfg.opensearch, timeout=60),
        layout,
        cfg.kafka,
        DeadLetters(cfg.kafka, "reindex"),
        max_bytes=cfg.sinks.bulk_max_bytes,
        conflict_policy=cfg.sinks.archive_conflict_policy,
        number_of_replicas=cfg.opensearch.number_of_replicas,
        refresh_interval=cfg.opensearch.refresh_interval,
        # --processes N: up to N (one per partition with events at most); by default one per core,
        # if the events are worth it.
        processes=args.processes or min(os.cpu_count() or 1, 4),
        min_events_per_process=1 if args.processes else MIN_EVENTS_PER_PROCESS,
        opensearch=cfg.opensearch,
        log_config=cfg.log,
    )
    with progress_bar(args.no_progress, unit="event", desc="reindex") as bar:

        def set_total(total: int) -> None:
            bar.total = total
            bar.refresh()

        try:
            result = reindexer.run(kinds, progress=bar.update, set_total=set_total, delete_old=args.delete_old)
        except ReindexFailed as exc:
            return fail(
                "reindex",
                f"{exc}. Nothing was swapped: the aliases still name the old versions and the half-built one was "
                "deleted. See the log above for the cause, then run it again (--processes 1 runs it in this process).",
                1,
            )
    for kind, (old, new) in result.items():
        kept = "" if args.delete_old or not old else f" ({layout.index(kind, old)} kept; --delete-old removes it)"
        print(f"{layout.alias(kind)} -> {layout.index(kind, new)}{kept}")
    return 0


def cmd_acceptance(_cfg: Config, args: argparse.Namespace) -> int:
    """Run the real vendor dose reports of ../shared/acceptance/dose through the dose extraction."""
    import logging
    import warnings

    from diana.operations.dose_acceptance import DISPUTED, run_acceptance

    folder = Path(args.folder)
    if not (folder / "expected.json").is_file():
        return fail(
            "acceptance",
            f"no expected.json in {folder}; pass the folder of the dose acceptance files "
            f"(e.g. diana acceptance ../shared/acceptance/dose)",
        )
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # vendor files have odd values we do not read
    warnings.simplefilter("ignore", UserWarning)
    checked, mismatches = run_acceptance(folder)
    disputed = [m for m in mismatches if (m.file, m.field) in DISPUTED]
    failed = [m for m in mismatches if (m.file, m.field) not in DISPUTED]
    for m in failed:
        print(f"MISMATCH  {m}")
    for m in disputed:
        print(f"DISPUTED  {m}\n          why: {DISPUTED[(m.file, m.field)]}")
    print(f"{checked} files checked: {len(failed)} mismatches, {len(disputed)} disputed (docs/DOSE.md)")
    return 1 if failed else 0


def cmd_stack(cfg: Config, args: argparse.Namespace) -> int:
    """Install (download once), start (and create topics), stop, reset (delete all data) or show the
    status of the local Kafka and OpenSearch, and of S3Proxy when [storage] backend = "s3"."""
    import dataclasses

    from diana.compose.local.stack import StackError, local_stack

    if args.secured:
        cfg = dataclasses.replace(cfg, stack=dataclasses.replace(cfg.stack, secured=True))
    if args.cluster:
        cfg = dataclasses.replace(cfg, stack=dataclasses.replace(cfg.stack, cluster=True))
    try:
        stack = local_stack(cfg)
    except StackError as exc:
        return fail("stack", str(exc))
    if args.action == "install":
        stack.install()
    elif args.action == "start":
        stack.start()
        from diana.compose.local.cluster import ClusterStack

        if isinstance(stack, ClusterStack):
            # The topics on the cluster whatever [kafka] bootstrap says (3 replicas: 3 brokers answer).
            cfg = dataclasses.replace(cfg, kafka=dataclasses.replace(cfg.kafka, bootstrap=stack.bootstrap()))
            print(
                "cluster ready; point the clients at every node:\n"
                f'  [kafka]      bootstrap = "{stack.bootstrap()}"\n'
                f'  [opensearch] url = "{stack.opensearch_urls()}"\n'
                "               number_of_replicas = 1"
            )
        cmd_topics(cfg, args)
    elif args.action == "stop":
        stack.stop()
    elif args.action == "reset":
        stack.reset()
    else:
        for name, state in stack.status().items():
            print(f"{name:<13} {'running' if state['running'] else 'stopped':<8} {state['address']:<24} {state['log']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    acc = sub.add_parser(
        "acceptance",
        help="check dose extraction against real vendor dose reports",
        description=f"{cmd_acceptance.__doc__} Reports every mismatch with file, field, "
        "expected and got; exit status 1 if any value mismatches.",
    )
    acc.add_argument(
        "folder",
        nargs="?",
        default=str(DEFAULT_ACCEPTANCE_DIR),
        help="folder with expected.json and the .dcm files (default: ../shared/acceptance/dose, from the "
        "working directory)",
    )
    acc.set_defaults(func=cmd_acceptance)

    stack = sub.add_parser(
        "stack", help="control the no-Docker local stack (Kafka, OpenSearch)", description=cmd_stack.__doc__
    )
    stack.add_argument(
        "action",
        choices=["install", "start", "stop", "status", "reset"],
        help="reset stops both servers and deletes their data",
    )
    stack.add_argument(
        "--secured",
        action="store_true",
        help="the secured variant: Kafka on SASL_SSL (SCRAM), OpenSearch with TLS and basic authentication "
        "(the same as [stack] secured = true; docs/SECURITY.md)",
    )
    stack.add_argument(
        "--cluster",
        action="store_true",
        help="the local cluster mode: three Kafka brokers (KRaft, 3 replicas, min.insync.replicas 2) and two "
        "OpenSearch nodes (the same as [stack] cluster = true; docs/SCALING.md)",
    )
    stack.set_defaults(func=cmd_stack)

    sub.add_parser(
        "status",
        help="offsets, consumer lag, index document counts, archive and landing object counts",
        description=cmd_status.__doc__,
    ).set_defaults(func=cmd_status)

    rp = sub.add_parser(
        "replay",
        help="move a stopped consumer group for reprocessing",
        description=f"{cmd_replay.__doc__} Stop the group's consumers first; start them "
        "again afterwards and they reprocess from the new position.",
    )
    rp.add_argument("group", help="consumer group, e.g. diana-sink-opensearch, diana-sink-archive, diana-aggregates")
    where = rp.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-beginning", action="store_true", help="reprocess everything still in the topics")
    where.add_argument("--to-end", action="store_true", help="skip everything not yet processed")
    where.add_argument(
        "--to-datetime",
        metavar="ISO",
        help="the first message at or after this time (e.g. 2024-03-15T08:00; without a UTC offset, this "
        "host's local time; the UTC instant is printed)",
    )
    where.add_argument("--to-offset", type=whole_number(0), metavar="N", help="this offset in every partition")
    rp.add_argument("--topic", action="append", help="limit to this topic (repeatable); default: the group's topics")
    rp.add_argument(
        "--allow-skip",
        action="store_true",
        help="move forward past messages the group has not processed, skipping them (counted in the plan); "
        "without it such a move is refused (--to-end needs no --allow-skip)",
    )
    rp.add_argument("--dry-run", action="store_true", help="show what would move, move nothing")
    rp.add_argument("--watch", action="store_true", help="then show the group's lag draining, with events/s")
    rp.set_defaults(func=cmd_replay)

    ri = sub.add_parser(
        "reindex",
        help="rebuild OpenSearch indices from the topics, swap aliases",
        description=f"{cmd_reindex.__doc__} The old versions stay unless --delete-old.",
    )
    ri.add_argument(
        "--kinds", default=INDEX_KINDS, help=f"comma-separated: {INDEX_KINDS.replace(',', ', ')} (default: all)"
    )
    ri.add_argument("--delete-old", action="store_true", help="delete the previous versions after the swap")
    ri.add_argument(
        "--processes",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="catch-up processes sharing the partitions (default: one per core, at most 4, and at most one per "
        "20,000 events to read; 1: no extra process)",
    )
    ri.add_argument("--no-progress", action="store_true", help="no progress bar")
    ri.set_defaults(func=cmd_reindex)
