"""The one ``diana`` command: every service and the local stack, each a subcommand with --help."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC
from pathlib import Path

import structlog

from diana.config import Config, ConfigError, load_config
from diana.logs import configure_logging

log = structlog.get_logger("diana")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _metrics(cfg: Config, port: int) -> None:
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=cfg.metrics.host)


# ------------------------------------------------------------------ services
def cmd_receive(cfg: Config, _args: argparse.Namespace) -> int:
    from diana.producers.scp import Receiver

    _metrics(cfg, cfg.receiver.metrics_port)
    contexts, handlers = [], []
    if cfg.query_retrieve.on_receiver:  # one AE title and port for storage and query/retrieve
        from diana.access.qr.server import build_query_retrieve

        qr = build_query_retrieve(cfg)
        contexts, handlers = qr.contexts(), qr.handlers()
    Receiver(cfg, extra_contexts=contexts, extra_handlers=handlers).serve_forever()
    return 0


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    """Serve what diana-star holds: the Query/Retrieve SCP (C-FIND, C-MOVE, C-GET) on [query_retrieve]
    port and DICOMweb (QIDO-RS, WADO-RS) on [dicomweb] host:port; both by default."""
    from diana.access.dicomweb.server import base_url, dicomweb_app, run_dicomweb
    from diana.access.qr.server import QueryRetrieveServer

    _metrics(cfg, cfg.dicomweb.metrics_port)
    if args.only == "dicom":
        QueryRetrieveServer(cfg).serve_forever()
        return 0
    try:
        app, authenticated = dicomweb_app(cfg)
    except ConfigError as exc:
        print(f"diana serve: {exc}", file=sys.stderr)
        return 2
    qr = None
    if args.only != "web":
        qr = QueryRetrieveServer(cfg)
        qr.start()
    print(
        f"  DICOMweb:        {base_url(cfg)}  "
        + ("(authentication required)" if authenticated else "(no authentication: loopback only)"),
        flush=True,
    )
    try:
        run_dicomweb(cfg, app, authenticated)
    finally:
        if qr is not None:
            qr.stop()
    return 0


def cmd_import(cfg: Config, args: argparse.Namespace) -> int:
    """Publish existing files (folders, zips, DICOMDIRs) as if they had been received."""
    from tqdm import tqdm

    from diana.producers.bulk_import import Importer, find_sources
    from diana.producers.ingest import Ingest
    from diana.producers.landing import LandingStore
    from diana.producers.publisher import EventPublisher
    from diana.schemas.codec import default_codec

    try:
        sources = list(find_sources([Path(p) for p in args.paths]))
    except FileNotFoundError as exc:
        print(f"diana import: {exc}", file=sys.stderr)
        return 2
    publisher = EventPublisher(cfg.kafka.bootstrap, cfg.kafka.publish_timeout_s, client_id="diana-import")
    ingest = Ingest(LandingStore(cfg.path(cfg.storage.landing_dir)), publisher, default_codec())
    try:
        with tqdm(total=len(sources), unit="file", desc="import", disable=args.no_progress) as bar:
            summary = Importer(ingest, workers=args.workers).run(sources, progress=bar.update)
    finally:
        publisher.close()
    print("\n".join(summary.lines()))
    if summary.failed:
        print(
            "Some files could not be imported for a passing reason (broker or disk); run the same "
            "command again: what was imported is not duplicated downstream.",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_aggregate(cfg: Config, _args: argparse.Namespace) -> int:
    from diana.stream_apps.aggregates import aggregates_loop, changelog_topic, default_worker_name
    from diana.stream_apps.completeness import QuietTimes
    from diana.stream_apps.state_topics import ensure_state_topics

    ensure_state_topics(cfg, [changelog_topic(cfg.stream.app_id)])
    _metrics(cfg, cfg.stream.web_port)
    loop = aggregates_loop(
        cfg.kafka.bootstrap,
        cfg.stream.app_id,
        default_worker_name(cfg.stream.web_port),
        cfg.kafka.partitions,
        QuietTimes.parse(cfg.stream.quiet_seconds),
    )
    loop.run()
    return 0


def cmd_dose(cfg: Config, _args: argparse.Namespace) -> int:
    import faust

    from diana.stream_apps.app import create_app
    from diana.stream_apps.dose.agent import register_dose
    from diana.stream_apps.dose.alerts import RulesError, load_rules

    try:
        rules = load_rules(cfg.path(Path(cfg.dose.alert_rules)) if cfg.dose.alert_rules else None)
    except RulesError as exc:
        print(f"diana dose: {exc}", file=sys.stderr)
        return 2
    from diana.stream_apps.dose.agent import TABLES
    from diana.stream_apps.state_topics import ensure_state_topics

    ensure_state_topics(cfg, [f"{cfg.dose.app_id}-{table}-changelog" for table in TABLES])
    app = create_app(cfg, app_id=cfg.dose.app_id, web_port=cfg.dose.web_port)
    register_dose(app, rules)
    worker = faust.Worker(app, loglevel=cfg.log.level.upper(), quiet=True)
    worker.execute_from_commandline()
    return 0


def cmd_acceptance(cfg: Config, args: argparse.Namespace) -> int:
    """Run the real vendor dose reports of ../shared/acceptance/dose through the dose extraction."""
    from diana.operations.dose_acceptance import DISPUTED, run_acceptance

    folder = Path(args.folder)
    if not (folder / "expected.json").is_file():
        print(
            f"diana acceptance: no expected.json in {folder}; pass the folder of the dose acceptance files "
            f"(e.g. diana acceptance ../shared/acceptance/dose)",
            file=sys.stderr,
        )
        return 2
    import warnings

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


def _cohort_filter(args: argparse.Namespace):
    from diana.access.cohort import CohortFilter, parse_dose_above

    return CohortFilter(
        modality=args.modality or [],
        body_part=args.body_part or [],
        station=args.station or [],
        manufacturer=args.manufacturer or [],
        calling_ae=args.calling_ae or [],
        sex=args.sex or [],
        description=args.description,
        date_from=args.date_from,
        date_to=args.date_to,
        age_min=args.age_min,
        age_max=args.age_max,
        dose_above=[parse_dose_above(d) for d in args.dose_above or []],
    )


def cmd_cohort(cfg: Config, args: argparse.Namespace) -> int:
    """Find the studies matching filters; print them, write CSV/JSON, or export their objects."""
    from opensearchpy import OpenSearch
    from opensearchpy.exceptions import ConnectionError as OSConnectionError
    from opensearchpy.exceptions import NotFoundError

    from diana.access.cohort import CohortError, find_studies, write_rows

    client = OpenSearch(hosts=[cfg.opensearch.url], timeout=60)
    prefix = cfg.opensearch.index_prefix
    try:
        rows = find_studies(client, prefix, _cohort_filter(args), limit=args.limit)
    except CohortError as exc:
        print(f"diana cohort: {exc}", file=sys.stderr)
        return 2
    except OSConnectionError:
        print(
            f"diana cohort: OpenSearch does not answer at {cfg.opensearch.url}; start the stack "
            f"(diana stack start) or set [opensearch] url",
            file=sys.stderr,
        )
        return 1
    except NotFoundError as exc:
        print(
            f"diana cohort: index missing ({exc.info if hasattr(exc, 'info') else exc}); nothing indexed yet?",
            file=sys.stderr,
        )
        return 1
    if args.action == "find":
        if args.output:
            with open(args.output, "w", newline="", encoding="utf-8") as fh:
                write_rows(rows, fh, args.format or Path(args.output).suffix.lstrip(".") or "csv")
            print(f"{len(rows)} studies written to {args.output}")
        else:
            write_rows(rows, sys.stdout, args.format or "table")
        return 0
    return _cohort_export(cfg, args, client, prefix, [r["study_instance_uid"] for r in rows])


def _cohort_export(cfg: Config, args, client, prefix: str, study_uids: list[str]) -> int:
    from tqdm import tqdm

    from diana.access.cohort import study_instances
    from diana.access.deid import Deidentifier
    from diana.access.export import ExportError, export_instances

    deidentify = args.deidentify if args.deidentify is not None else args.research
    deidentifier = None
    if deidentify:
        secret_file = args.secret_file or cfg.export.site_secret_file
        if not secret_file:
            print(
                "diana cohort export: de-identification needs a site secret: create one with "
                "'head -c 32 /dev/urandom > site.secret; chmod 600 site.secret' and pass --secret-file "
                "site.secret (or set [export] site_secret_file)",
                file=sys.stderr,
            )
            return 2
        try:
            deidentifier = Deidentifier(
                cfg.path(Path(secret_file)).read_bytes(), retain_descriptions=args.retain_descriptions
            )
        except (OSError, ValueError) as exc:
            print(f"diana cohort export: site secret {secret_file}: {exc}", file=sys.stderr)
            return 2
    if args.key_file and not deidentify:
        print("diana cohort export: --key-file only makes sense with de-identification (--research)", file=sys.stderr)
        return 2
    instances = study_instances(client, prefix, study_uids)
    try:
        with tqdm(total=len(instances), unit="obj", desc="export", disable=args.no_progress) as bar:
            summary = export_instances(
                instances,
                cfg.path(cfg.storage.archive_dir),
                Path(args.out),
                deidentifier=deidentifier,
                key_file=Path(args.key_file) if args.key_file else None,
                progress=bar.update,
            )
    except ExportError as exc:
        print(f"diana cohort export: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 1 if summary.missing or summary.hash_mismatch else 0


def cmd_dashboards(cfg: Config, args: argparse.Namespace) -> int:
    """Import the Operations, Cohort discovery and Dose monitoring dashboards into OpenSearch Dashboards."""
    from diana.access.dashboards import NDJSON_PATH, install, render_ndjson

    ndjson = render_ndjson()
    if args.action == "export":
        (open(args.output, "w", encoding="utf-8") if args.output else sys.stdout).write(ndjson)
        return 0
    import requests

    try:
        result = install(args.url, ndjson)
    except requests.RequestException as exc:
        print(
            f"diana dashboards: import into {args.url} failed: {exc}. Is OpenSearch Dashboards running there? "
            f"The file can also be imported by hand: {NDJSON_PATH}",
            file=sys.stderr,
        )
        return 1
    print(
        f"imported {result.get('successCount', 0)} saved objects into {args.url}"
        + ("" if result.get("success", False) else f"; errors: {result.get('errors')}")
    )
    return 0 if result.get("success", False) else 1


def cmd_report(cfg: Config, args: argparse.Namespace) -> int:
    """Write a self-contained HTML report of ingest and dose for a date range (no network needed to view it)."""
    from datetime import date, timedelta

    from opensearchpy import OpenSearch
    from opensearchpy.exceptions import ConnectionError as OSConnectionError

    from diana.access.report import build_report
    from diana.durable import write_atomic

    try:
        end = date.fromisoformat(args.to_date) if args.to_date else date.today()
        start = date.fromisoformat(args.from_date) if args.from_date else end - timedelta(days=30)
    except ValueError as exc:
        print(f"diana report: {exc}; dates look like 2024-03-15", file=sys.stderr)
        return 2
    if start > end:
        print(f"diana report: --from {start} is after --to {end}", file=sys.stderr)
        return 2
    try:
        page = build_report(OpenSearch(hosts=[cfg.opensearch.url], timeout=60), cfg.opensearch.index_prefix, start, end)
    except OSConnectionError:
        print(f"diana report: OpenSearch does not answer at {cfg.opensearch.url}", file=sys.stderr)
        return 1
    write_atomic(Path(args.out), page.encode("utf-8"))
    print(f"report {start} to {end} written to {args.out}")
    return 0


def cmd_sink(cfg: Config, args: argparse.Namespace) -> int:
    from diana.sinks.consumer import run_sink

    stop = _stop_on_signals()
    if args.sink == "archive":
        from diana.schemas.topics import ARCHIVE_CONFLICTS
        from diana.sinks.archive import ArchiveSink
        from diana.sinks.consumer import Reporter

        report = Reporter(cfg.kafka.bootstrap, ARCHIVE_CONFLICTS.name, ARCHIVE_CONFLICTS.schema, "sop_instance_uid")
        sink = ArchiveSink(
            cfg.path(cfg.storage.landing_dir),
            cfg.path(cfg.storage.archive_dir),
            policy=cfg.sinks.archive_conflict_policy,
            report=report,
        )
        group, port = cfg.sinks.archive_group, cfg.sinks.archive_metrics_port
    else:
        from opensearchpy import OpenSearch

        from diana.sinks.opensearch import IndexLayout, OpenSearchSink

        client = OpenSearch(hosts=[cfg.opensearch.url], timeout=30)
        sink = OpenSearchSink(client, IndexLayout(cfg.opensearch.index_prefix), max_bytes=cfg.sinks.bulk_max_bytes)
        group, port = cfg.sinks.opensearch_group, cfg.sinks.opensearch_metrics_port
    _metrics(cfg, port)
    run_sink(sink, cfg.kafka.bootstrap, group, stop, batch_size=cfg.opensearch.bulk_max_docs)
    return 0


# ------------------------------------------------------------------ operations
def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    """Topics and offsets, consumer lag, index document counts, archive and landing counts."""
    from diana.operations.status import collect_status, render_status

    status = collect_status(cfg)
    print(render_status(status))
    return 1 if status.errors else 0


def cmd_replay(cfg: Config, args: argparse.Namespace) -> int:
    """Move a stopped consumer group to the beginning, the end, a time or an offset."""
    from datetime import datetime

    from diana.operations.replay import ReplayError, apply_replay, plan_replay

    when = None
    if args.to_datetime:
        try:
            when = datetime.fromisoformat(args.to_datetime)
        except ValueError:
            print(
                f"diana replay: --to-datetime {args.to_datetime!r} is not ISO 8601 (e.g. 2024-03-15T08:00:00+00:00)",
                file=sys.stderr,
            )
            return 2
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    to = "beginning" if args.to_beginning else "end" if args.to_end else "datetime" if when else "offset"
    try:
        moves = plan_replay(cfg, args.group, args.topic, to=to, when=when, offset=args.to_offset)
        print(f"{'topic':<24}{'partition':>10}{'current':>12}{'new':>12}{'to reprocess':>14}")
        for m in moves:
            current = "-" if m.current is None else str(m.current)
            print(f"{m.topic:<24}{m.partition:>10}{current:>12}{m.target:>12}{m.to_reprocess:>14}")
        total = sum(m.to_reprocess for m in moves)
        if args.dry_run:
            print(f"dry run: {total} messages would be processed again by {args.group}; nothing moved")
            return 0
        apply_replay(cfg, args.group, moves)
        print(f"moved {args.group}: {total} messages will be processed again when its consumers start")
    except ReplayError as exc:
        print(f"diana replay: {exc}", file=sys.stderr)
        return 1
    if args.watch:
        _watch_lag(cfg, args.group, [m.topic for m in moves])
    return 0


def _watch_lag(cfg: Config, group: str, topics: list[str]) -> None:
    """A progress bar of the group's remaining lag, with events/s, until it reaches zero."""
    from tqdm import tqdm

    from diana.operations.status import group_lag, watermarks

    def lag() -> int:
        return sum(group_lag(cfg, group, watermarks(cfg, sorted(set(topics)))).values())

    start = lag()
    with tqdm(total=start, unit="event", desc=f"{group} catching up") as bar:
        remaining = start
        while remaining > 0:
            time.sleep(1)
            now = lag()
            bar.total = max(bar.total, bar.n + now)
            bar.update(max(remaining - now, 0))
            remaining = now


def cmd_reindex(cfg: Config, args: argparse.Namespace) -> int:
    """Build new index versions from the topics while the live sink keeps writing; swap aliases."""
    from opensearchpy import OpenSearch
    from tqdm import tqdm

    from diana.operations.reindex import Reindexer
    from diana.sinks.consumer import DeadLetters
    from diana.sinks.opensearch import IndexLayout

    kinds = args.kinds.split(",")
    layout = IndexLayout(cfg.opensearch.index_prefix)
    unknown = sorted(set(kinds) - set(layout.id_fields))
    if unknown:
        print(
            f"diana reindex: unknown kind(s) {', '.join(unknown)}; valid: {', '.join(layout.id_fields)}",
            file=sys.stderr,
        )
        return 2
    client = OpenSearch(hosts=[cfg.opensearch.url], timeout=60)
    reindexer = Reindexer(
        client,
        layout,
        cfg.kafka.bootstrap,
        DeadLetters(cfg.kafka.bootstrap, "reindex"),
        max_bytes=cfg.sinks.bulk_max_bytes,
    )
    with tqdm(unit="event", desc="reindex", disable=args.no_progress) as bar:

        def set_total(total: int) -> None:
            bar.total = total
            bar.refresh()

        result = reindexer.run(kinds, progress=bar.update, set_total=set_total, delete_old=args.delete_old)
    for kind, (old, new) in result.items():
        alias = layout.alias(kind)
        kept = "" if args.delete_old or not old else f" ({layout.index(kind, old)} kept; --delete-old removes it)"
        print(f"{alias} -> {layout.index(kind, new)}{kept}")
    return 0


# ------------------------------------------------------------------ stack
def _stack(cfg: Config):
    from diana.compose.local.stack import LocalStack

    return LocalStack(cfg)


def cmd_stack(cfg: Config, args: argparse.Namespace) -> int:
    stack = _stack(cfg)
    if args.action == "install":
        stack.install()
    elif args.action == "start":
        stack.start()
        cmd_topics(cfg, args)
    elif args.action == "stop":
        stack.stop()
    elif args.action == "reset":
        stack.reset()
    else:
        for name, state in stack.status().items():
            print(f"{name:<11} {'running' if state['running'] else 'stopped':<8} {state['address']:<24} {state['log']}")
    return 0


def cmd_topics(cfg: Config, _args: argparse.Namespace) -> int:
    from diana.schemas.topics import ensure_topics

    created = ensure_topics(cfg.kafka.bootstrap, cfg.kafka.partitions)
    log.info("topics.ready", created=created)
    return 0


# ------------------------------------------------------------------ run (the main job)
def _wait_for_receiver(cfg: Config, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Announce the receiver only once it answers a C-ECHO."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="DIANA-RUN")
    ae.add_requested_context(Verification)
    quiet = logging.getLogger("pynetdicom")
    level, quiet.level = quiet.level, logging.CRITICAL  # refused connections while it starts are expected
    host = "127.0.0.1" if cfg.receiver.host in ("0.0.0.0", "") else cfg.receiver.host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        assoc = ae.associate(host, cfg.receiver.port, ae_title=cfg.receiver.ae_title)
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            quiet.setLevel(level)
            return
        time.sleep(0.5)
    quiet.setLevel(level)
    raise RuntimeError("the receiver did not answer a C-ECHO; see its log above")


_PIPELINE = (
    ("receiver", ["receive"]),
    ("aggregates", ["aggregate"]),
    ("dose", ["dose"]),
    ("archive-sink", ["sink", "archive"]),
    ("opensearch-sink", ["sink", "opensearch"]),
    # DICOMweb (and, when the receiver does not answer it, the Q/R SCP on its own port)
    ("serve", ["serve", "--only", "web"]),
)


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    """Start the local stack and every pipeline process; Ctrl-C stops everything."""
    stack = _stack(cfg)
    if not args.no_stack:
        stack.start()
    cmd_topics(cfg, args)
    base = [sys.executable, "-m", "diana.cli"] + (["--config", args.config] if args.config else [])
    procs: dict[str, subprocess.Popen] = {}
    stop = _stop_on_signals()
    try:
        for name, sub in _PIPELINE:
            if name == "serve" and not cfg.query_retrieve.on_receiver:
                sub = ["serve"]  # the Q/R SCP on its own port, beside DICOMweb
            procs[name] = subprocess.Popen(base + sub, start_new_session=True)
            log.info("pipeline.started", process=name, pid=procs[name].pid)
        r = cfg.receiver
        _wait_for_receiver(cfg, procs["receiver"])
        print(
            "\n"
            f"  diana-star is running.\n"
            f"  Send DICOM to:   AE title {r.ae_title}, port {r.port} (host {r.host})\n"
            f"                   e.g. storescu -aec {r.ae_title} 127.0.0.1 {r.port} FILE...\n"
            + (
                "  Query/retrieve:  the same AE title and port (C-FIND, C-MOVE, C-GET)\n"
                if cfg.query_retrieve.on_receiver
                else ""
            )
            + f"  DICOMweb:        http://{cfg.dicomweb.host}:{cfg.dicomweb.port}  "
            + (
                "(authentication required)\n"
                if cfg.dicomweb.bearer_token_file or cfg.dicomweb.basic_user
                else "(no authentication: loopback only)\n"
            )
            + f"  OpenSearch:      {cfg.opensearch.url}  (indices {cfg.opensearch.index_prefix}-instances, "
            f"-series, -studies,\n"
            f"                   -dose-events, -dose-studies, -dose-alerts)\n"
            f"  Archive:         {cfg.path(cfg.storage.archive_dir)}\n"
            f"  Metrics:         http://127.0.0.1:{r.metrics_port}/metrics (receiver)\n"
            f"  Press Ctrl-C to stop everything.\n",
            flush=True,
        )
        while not stop.is_set():
            for name, proc in procs.items():
                if proc.poll() is not None:
                    log.error("pipeline.exited", process=name, code=proc.returncode)
                    stop.set()
            stop.wait(1.0)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("pipeline.kill", process=name)
                proc.kill()
                proc.wait()
        if not args.no_stack and not args.keep_stack:
            stack.stop()
        log.info("pipeline.stopped")
    return 0


# ------------------------------------------------------------------ parser
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

    run = sub.add_parser(
        "run", help="start the local stack and the whole pipeline (the main job)", description=cmd_run.__doc__
    )
    run.add_argument("--no-stack", action="store_true", help="use an already running Kafka and OpenSearch")
    run.add_argument("--keep-stack", action="store_true", help="leave Kafka and OpenSearch running on exit")
    run.set_defaults(func=cmd_run)

    sub.add_parser(
        "receive",
        help="run the DICOM C-STORE receiver",
        description="Run the C-STORE/C-ECHO SCP: land each object durably, publish "
        "InstanceArrived, answer success only after the broker acknowledged.",
    ).set_defaults(func=cmd_receive)
    serve = sub.add_parser(
        "serve",
        help="serve query/retrieve (DICOM) and DICOMweb",
        description=cmd_serve.__doc__ + " The Q/R SCP has the receiver's AE title, allow-lists and TLS "
        "settings (the receiver also answers Q/R itself: [query_retrieve] on_receiver).",
    )
    serve.add_argument(
        "--only", choices=["dicom", "web"], help="just the Q/R SCP (dicom) or just DICOMweb (web); default both"
    )
    serve.set_defaults(func=cmd_serve)
    imp = sub.add_parser(
        "import",
        help="publish existing DICOM files (folders, zips, DICOMDIRs)",
        description=cmd_import.__doc__ + " Each object is validated, landed and published "
        "exactly like a C-STORE; non-DICOM files are skipped; a summary lists what was "
        "rejected and why. Exit status 1 if anything failed for a passing reason.",
    )
    imp.add_argument("paths", nargs="+", metavar="PATH", help="a folder, a .zip, or a DICOMDIR file")
    imp.add_argument("--workers", type=int, default=8, help="objects in flight at once (default 8)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in scripts)")
    imp.set_defaults(func=cmd_import)

    sub.add_parser(
        "aggregate",
        help="run the worker for series and study aggregates",
        description="Run the exactly-once worker (Kafka transactions) that folds dicom.instances "
        "into dicom.series and dicom.studies, with completion verdicts. Several "
        "workers share the partitions; give each its own [stream] web_port (its "
        "Prometheus metrics, and its name).",
    ).set_defaults(func=cmd_aggregate)
    sub.add_parser(
        "dose",
        help="run the Faust worker for dose records and dose alerts",
        description="Run the Faust worker that extracts dose events from dose reports and image "
        "headers in dicom.instances, folds them per study into dose.events and "
        "dose.studies, and raises dose.alerts ([dose] alert_rules, docs/DOSE.md).",
    ).set_defaults(func=cmd_dose)
    acc = sub.add_parser(
        "acceptance",
        help="check dose extraction against real vendor dose reports",
        description=cmd_acceptance.__doc__ + " Reports every mismatch with file, field, "
        "expected and got; exit status 1 if any value mismatches.",
    )
    acc.add_argument(
        "folder",
        nargs="?",
        default=str(Path(__file__).resolve().parents[1].parent / "shared" / "acceptance" / "dose"),
        help="folder with expected.json and the .dcm files (default: ../shared/acceptance/dose)",
    )
    acc.set_defaults(func=cmd_acceptance)
    cohort = sub.add_parser(
        "cohort", help="find studies by filters; export them (optionally de-identified)", description=cmd_cohort.__doc__
    )
    cohort_sub = cohort.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("find", "print the matching studies, or write them as CSV/JSON"),
        ("export", "copy the matching studies' objects from the archive into a folder or .zip, verifying hashes"),
    ):
        ap = cohort_sub.add_parser(
            action,
            help=text,
            description=text + ". Filters combine with AND; a repeated filter matches any of its values.",
        )
        f = ap.add_argument_group("filters")
        f.add_argument("--modality", action="append", metavar="M", help="e.g. CT (repeatable)")
        f.add_argument("--date-from", metavar="YYYY-MM-DD", help="study date on or after")
        f.add_argument("--date-to", metavar="YYYY-MM-DD", help="study date on or before")
        f.add_argument("--body-part", action="append", metavar="PART", help="Body Part Examined, e.g. CHEST")
        f.add_argument("--description", metavar="WORDS", help="words in the study or series description or protocol")
        f.add_argument("--station", action="append", metavar="NAME", help="Station Name")
        f.add_argument("--manufacturer", action="append", metavar="NAME")
        f.add_argument("--calling-ae", action="append", metavar="AE", help="the AE title that sent the objects")
        f.add_argument("--age-min", type=float, metavar="YEARS", help="patient age at the study")
        f.add_argument("--age-max", type=float, metavar="YEARS")
        f.add_argument("--sex", action="append", metavar="M|F|O")
        f.add_argument(
            "--dose-above",
            action="append",
            metavar="METRIC=VALUE",
            help="e.g. total_dlp_mGycm=500 (metrics: total_dlp_mGycm, max_ctdivol_mGy, total_dap_Gym2, "
            "dose_rp_total_mGy, agd_left_mGy, agd_right_mGy, administered_activity_MBq, fluoro_time_s)",
        )
        ap.add_argument("--limit", type=int, default=10_000, help="at most this many studies (default 10000)")
        if action == "find":
            ap.add_argument("--output", "-o", metavar="FILE", help="write to FILE (.csv or .json) instead of a table")
            ap.add_argument("--format", choices=["table", "csv", "json"], help="default: table, or FILE's suffix")
        else:
            ap.add_argument("--out", required=True, metavar="PATH", help="a new folder, or a file ending in .zip")
            ap.add_argument("--research", action="store_true", help="research export: de-identified by default")
            ap.add_argument(
                "--deidentify",
                dest="deidentify",
                action="store_true",
                default=None,
                help="de-identify (PS3.15 Annex E basic profile, consistent pseudonyms)",
            )
            ap.add_argument(
                "--no-deidentify",
                dest="deidentify",
                action="store_false",
                help="byte-identical copies, even with --research",
            )
            ap.add_argument(
                "--secret-file",
                metavar="FILE",
                help="site secret keying the pseudonyms (default: [export] site_secret_file)",
            )
            ap.add_argument(
                "--key-file",
                metavar="FILE",
                help="also write pseudonym -> original identity here (CSV, mode 600); written nowhere unless asked",
            )
            ap.add_argument(
                "--retain-descriptions",
                action="store_true",
                help="keep study/series descriptions and protocol names (Annex E retain option)",
            )
            ap.add_argument("--no-progress", action="store_true", help="no progress bar")
        ap.set_defaults(func=cmd_cohort)
    dash = sub.add_parser(
        "dashboards",
        help="install the OpenSearch Dashboards saved objects",
        description=cmd_dashboards.__doc__ + " 'export' writes the saved-objects file instead "
        "(compose/dashboards/diana-star.ndjson holds the same).",
    )
    dash.add_argument("action", choices=["install", "export"])
    dash.add_argument("--url", default="http://127.0.0.1:5601", help="Dashboards URL (default http://127.0.0.1:5601)")
    dash.add_argument("--output", "-o", metavar="FILE", help="export: write here instead of standard output")
    dash.set_defaults(func=cmd_dashboards)
    rep = sub.add_parser(
        "report", help="write a self-contained HTML report of ingest and dose", description=cmd_report.__doc__
    )
    rep.add_argument("--from", dest="from_date", metavar="YYYY-MM-DD", help="first day (default: 30 days before --to)")
    rep.add_argument("--to", dest="to_date", metavar="YYYY-MM-DD", help="last day, by arrival (default: today)")
    rep.add_argument("--out", required=True, metavar="FILE.html")
    rep.set_defaults(func=cmd_report)
    sink = sub.add_parser(
        "sink",
        help="run a sink (archive or opensearch)",
        description="Run a sink: consume, write durably and idempotently, then commit.",
    )
    sink.add_argument("sink", choices=["archive", "opensearch"])
    sink.set_defaults(func=cmd_sink)

    stack = sub.add_parser(
        "stack",
        help="control the no-Docker local stack (Kafka, OpenSearch)",
        description="Install (download once), start (and create topics), stop, reset "
        "(delete all data) or show the status of the local Kafka and OpenSearch.",
    )
    stack.add_argument(
        "action",
        choices=["install", "start", "stop", "status", "reset"],
        help="reset stops both servers and deletes their data",
    )
    stack.set_defaults(func=cmd_stack)

    sub.add_parser(
        "status", help="offsets, consumer lag, index counts, archive size", description=cmd_status.__doc__
    ).set_defaults(func=cmd_status)

    rp = sub.add_parser(
        "replay",
        help="move a stopped consumer group for reprocessing",
        description=cmd_replay.__doc__ + " Stop the group's consumers first; start them "
        "again afterwards and they reprocess from the new position.",
    )
    rp.add_argument("group", help="consumer group, e.g. diana-sink-opensearch, diana-sink-archive, diana-aggregates")
    where = rp.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-beginning", action="store_true", help="reprocess everything still in the topics")
    where.add_argument("--to-end", action="store_true", help="skip everything not yet processed")
    where.add_argument("--to-datetime", metavar="ISO", help="the first message at or after this time")
    where.add_argument("--to-offset", type=int, metavar="N", help="this offset in every partition")
    rp.add_argument("--topic", action="append", help="limit to this topic (repeatable); default: the group's topics")
    rp.add_argument("--dry-run", action="store_true", help="show what would move, move nothing")
    rp.add_argument("--watch", action="store_true", help="then show the group's lag draining, with events/s")
    rp.set_defaults(func=cmd_replay)

    ri = sub.add_parser(
        "reindex",
        help="rebuild OpenSearch indices from the topics, swap aliases",
        description=cmd_reindex.__doc__ + " The old versions stay unless --delete-old.",
    )
    ri.add_argument(
        "--kinds",
        default="instances,series,studies,dose-events,dose-studies,dose-alerts,deadletters",
        help="comma-separated: instances, series, studies, dose-events, dose-studies, dose-alerts, deadletters "
        "(default: all)",
    )
    ri.add_argument("--delete-old", action="store_true", help="delete the previous versions after the swap")
    ri.add_argument("--no-progress", action="store_true", help="no progress bar")
    ri.set_defaults(func=cmd_reindex)

    sub.add_parser(
        "topics", help="create the missing topics", description="Create every diana-star topic that does not exist yet."
    ).set_defaults(func=cmd_topics)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        message = f"unrecognized arguments: {' '.join(unknown)}"
        if args.command == "cohort":
            message += (
                "; valid filters: --modality, --date-from, --date-to, --body-part, --description, "
                "--station, --manufacturer, --calling-ae, --age-min, --age-max, --sex, --dose-above"
            )
        parser.error(message)
    try:
        cfg = load_config(args.config)
        configure_logging(cfg.log.level, cfg.log.format)
    except (ConfigError, ValueError) as exc:
        print(f"diana: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(cfg, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from diana.compose.local.stack import StackError

        if isinstance(exc, StackError):
            print(f"diana: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
