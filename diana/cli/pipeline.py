"""The pipeline's commands: receive, import, aggregate, dose, sink, topics, and run (all of them)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from diana.cli._common import calendar_day, fail, start_metrics, stop_on_signals, whole_number
from diana.config import Config

if TYPE_CHECKING:
    from diana.producers.bulk_import import ImportSummary

log = structlog.get_logger("diana")


def cmd_receive(cfg: Config, _args: argparse.Namespace) -> int:
    processes = cfg.receiver.processes
    if processes < 1:
        return fail("receive", f"[receiver] processes must be at least 1, not {processes}")
    if processes == 1:
        start_metrics(cfg, cfg.receiver.metrics_port)
        _serve_receiver(cfg, worker=0, started_at=time.time())
        return 0
    from diana.producers.shared_metrics import shared_metrics

    started_at = time.time()  # recovery republishes what landed before this
    # Before anything imports prometheus_client: the workers' metrics go through files.
    with shared_metrics(cfg.receiver.metrics_port, cfg.metrics.host) as serve_metrics:
        from diana.producers.landing import LandingStore
        from diana.producers.workers import run_workers

        # Before any worker listens: debris of a crash goes, nothing of ours exists yet.
        swept = LandingStore(cfg.path(cfg.storage.landing_dir)).sweep(older_than_s=0)
        log.info("landing.swept", removed=swept)
        try:
            run_workers(
                processes,
                lambda worker: _serve_receiver(cfg, worker, started_at),
                address=(cfg.receiver.host, cfg.receiver.port),
                after_start=serve_metrics,
            )
        except OSError as exc:  # the port taken, the address not this host's
            return fail("receive", f"{exc.strerror or exc} ([receiver] host and port)")
    return 0


def _serve_receiver(cfg: Config, worker: int, started_at: float) -> None:
    from diana.producers.scp import Receiver

    contexts: list = []
    handlers: list = []
    if cfg.query_retrieve.on_receiver:  # one AE title and port for storage and query/retrieve
        from diana.access.qr.server import build_query_retrieve

        qr = build_query_retrieve(cfg, warn=worker == 0)
        contexts, handlers = qr.contexts(), qr.handlers()
    Receiver(
        cfg, extra_contexts=contexts, extra_handlers=handlers, worker=worker, started_at=started_at
    ).serve_forever()


def cmd_import(cfg: Config, args: argparse.Namespace) -> int:
    """Publish existing files (folders, zips, DICOMDIRs) as if they had been received."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from diana.producers.bulk_import import Importer, Report, find_sources
    from diana.producers.ingest import Ingest
    from diana.producers.landing import open_landing
    from diana.producers.publisher import EventPublisher
    from diana.schemas.codec import default_codec

    try:  # listed as they are imported: a path that does not exist is found before anything is
        sources = find_sources([Path(p) for p in args.paths], say=lambda text: print(f"import: {text}"))
    except FileNotFoundError as exc:
        return fail("import", str(exc))
    report_path = Path(args.report) if args.report else None
    if report_path is not None and (report_path.is_dir() or not report_path.parent.is_dir()):
        return fail("import", f"--report {report_path}: name a file in a folder that exists")
    # The report is emptied now, so that an earlier run's list never stands for this one, and written as
    # files come; without it, the files not imported are only counted (a list would grow with the run).
    try:
        report = Report(report_path) if report_path is not None else None
    except OSError as exc:  # nothing imported yet
        return fail("import", f"--report {report_path}: {exc.strerror or type(exc).__name__}; {_REPORT_FIX}", code=1)
    publisher = EventPublisher(cfg.kafka, client_id="diana-import")
    ingest = Ingest(open_landing(cfg), publisher, default_codec(), max_inflated_bytes=cfg.receiver.max_inflated_bytes)
    try:
        # The bar has no total: files are counted as they are imported, the tree is not walked first.
        with report or nullcontext(), tqdm(unit="file", desc="import", disable=args.no_progress) as bar:
            summary = Importer(ingest, workers=args.workers).run(
                sources, progress=bar.update, report=report.row if report is not None else _not_kept
            )
    finally:
        publisher.close()
    print("\n".join(summary.lines()))
    return _import_status(summary, report_path, report.failure if report is not None else None)


def _import_status(summary: ImportSummary, report_path: Path | None, report_failure: OSError | None) -> int:
    """Print every reason the import did not end well (each its own line: a Ctrl-C after the report's disk
    filled, or the broker down with it, said only one), and return the exit status: 130 when interrupted
    (Ctrl-C wins: the user stopped it, whatever else went wrong), else 1 when anything is to be run again
    (the report unwritable, the broker down, anything failed), else 0."""
    causes: list[str] = []
    report_error = summary.report_error or report_failure
    if report_error is not None:
        why = report_error.strerror or type(report_error).__name__
        stopped = "stopped (the files in flight finished and counted above, the rest not looked at): " * bool(
            summary.report_error
        )
        causes.append(
            f"{stopped}the report {report_path} could not be written ({why}), it lacks the files not imported "
            f"counted after its last row; {_REPORT_FIX}"
        )
    elif report_path is not None:
        print(f"the files not imported, with their reasons: {report_path}")
    elif summary.not_imported_count:
        print("to list the files not imported, run again with --report FILE (their paths stay out of the log)")
    if summary.broker_down:
        causes.append(
            "stopped: the broker acknowledged none of the last events (is Kafka running? its address is "
            "[kafka] bootstrap; `diana stack start` starts the local one), so the rest was not looked at. Start "
            "it, then run the same command again: what was imported is not duplicated downstream. Objects "
            "landed whose event may have gone out stay in the landing store; the receiver republishes them."
        )
    if summary.interrupted:
        causes.append(
            "interrupted: the files in flight were finished and counted above, the rest was not looked at; "
            "run the same command again to import it: what was imported is not duplicated downstream."
        )
    if summary.failed and (not summary.broker_down or summary.failed_not_broker):  # the broker's: said above
        causes.append(
            "some files or folders could not be read or imported for a reason that may pass (broker, disk, "
            "permissions, a missing file); once it is fixed, run the same command again: what was imported "
            "is not duplicated downstream."
        )
    for cause in causes:
        fail("import", cause)
    if summary.interrupted:
        return 130
    return 1 if causes else 0


_REPORT_FIX = (
    "free space on its disk (or name another file with --report, on a disk with room, in a folder you may "
    "write), then run the same command again: what was imported is not duplicated downstream"
)


def _not_kept(outcome: str, reason: str, file: str) -> None:
    """Where the files not imported go without --report: counted in the summary, not listed."""


def cmd_aggregate(cfg: Config, _args: argparse.Namespace) -> int:
    from diana.stream_apps.aggregates import aggregates_loop, changelog_topic
    from diana.stream_apps.completeness import QuietTimes
    from diana.stream_apps.state_topics import PartitionMismatch, ensure_state_topics
    from diana.stream_apps.transactional import GiveUp
    from diana.stream_apps.worker_id import WorkerIdError, stable_worker_id

    try:
        worker_id = stable_worker_id(
            cfg.stream.worker_id, cfg.path(cfg.stream.data_dir), cfg.stream.app_id, cfg.stream.web_port
        )
    except WorkerIdError as exc:
        return fail("aggregate", str(exc))
    try:
        ensure_state_topics(cfg, [changelog_topic(cfg.stream.app_id)])
    except PartitionMismatch as exc:
        return fail("aggregate", str(exc))
    start_metrics(cfg, cfg.stream.web_port)
    loop = aggregates_loop(
        cfg.kafka,
        cfg.stream.app_id,
        worker_id,
        cfg.kafka.partitions,
        QuietTimes.parse(cfg.stream.quiet_seconds),
        conflict_policy=cfg.sinks.archive_conflict_policy,
        session_timeout_s=cfg.stream.session_timeout_s,
        retention_days=cfg.stream.state_retention_days,
        state_dir=cfg.path(cfg.stream.state_dir),
        transaction_max_events=cfg.stream.transaction_max_events,
        transaction_max_retry_s=cfg.stream.transaction_max_retry_s,
    )
    try:
        loop.run()
    except GiveUp as exc:
        return fail("aggregate", str(exc), code=1)
    return 0


def cmd_dose(cfg: Config, _args: argparse.Namespace) -> int:
    import faust

    from diana.stream_apps.app import create_app, deepen_faust_producer_buffer
    from diana.stream_apps.dose.agent import TABLES, register_dose
    from diana.stream_apps.dose.alerts import RulesError, load_rules
    from diana.stream_apps.dose.image_files import ImageFiles
    from diana.stream_apps.dose.reference_levels import LevelsError, load_reference_levels
    from diana.stream_apps.dose.standard_names import NamesError, load_standard_names
    from diana.stream_apps.faust_resume import seek_stream_partitions_again
    from diana.stream_apps.state_topics import PartitionMismatch, ensure_state_topics

    d = cfg.dose
    try:
        rules = load_rules(cfg.path(Path(d.alert_rules)) if d.alert_rules else None)
        names = load_standard_names(cfg.path(Path(d.standard_names)) if d.standard_names else None)
        levels = load_reference_levels(cfg.path(Path(d.reference_levels)) if d.reference_levels else None)
    except (RulesError, NamesError, LevelsError) as exc:
        return fail("dose", str(exc))
    try:
        replication_factor = ensure_state_topics(cfg, [f"{d.app_id}-{table}-changelog" for table in TABLES])
    except PartitionMismatch as exc:
        return fail("dose", str(exc))
    deepen_faust_producer_buffer()
    seek_stream_partitions_again()
    app = create_app(cfg, app_id=d.app_id, web_port=d.web_port, replication_factor=replication_factor)
    files = ImageFiles(cfg.path(cfg.storage.landing_dir), cfg.path(cfg.storage.archive_dir))
    register_dose(app, rules, image_files=files, size_sample_every=d.size_sample_every, names=names, levels=levels)
    worker = faust.Worker(app, loglevel=cfg.log.level.upper(), quiet=True)
    worker.execute_from_commandline()
    return 0


def cmd_sink(cfg: Config, args: argparse.Namespace) -> int:
    from diana.sinks.consumer import run_sinks

    stop = stop_on_signals()
    sinks: list[Any]
    if args.sink == "archive":
        import threading

        from diana.schemas.topics import ARCHIVE_CONFLICTS
        from diana.sinks.archive import ArchiveSink, sweep_stale_uploads
        from diana.sinks.consumer import Reporter
        from diana.storage import open_store

        report = Reporter(cfg.kafka, ARCHIVE_CONFLICTS.name, ARCHIVE_CONFLICTS.value_schema, "sop_instance_uid")
        stores = {area: open_store(cfg, area) for area in ("landing", "archive", "quarantine")}
        # Incomplete S3 multipart uploads older than a day (a writer that died mid-upload): aborted in the
        # background, never delaying the sink (docs/OPERATIONS.md has the bucket rule that does it for good).
        threading.Thread(
            target=sweep_stale_uploads, args=(list(stores.values()),), name="sweep-uploads", daemon=True
        ).start()
        sinks = [
            ArchiveSink(
                stores["landing"],
                stores["archive"],
                policy=cfg.sinks.archive_conflict_policy,
                report=report,
                quarantine=stores["quarantine"],
                local_landing=cfg.path(cfg.storage.landing_dir),
                max_tries=cfg.sinks.archive_object_max_tries,
                max_retry_s=cfg.sinks.archive_object_max_retry_s,
            )
        ]
        group, port = cfg.sinks.archive_group, cfg.sinks.archive_metrics_port
    elif args.sink == "metadata":
        from diana.clients import opensearch_client
        from diana.schemas.layout import IndexLayout
        from diana.sinks.metadata import MetadataSink
        from diana.storage import open_store

        sinks = [
            MetadataSink(
                opensearch_client(cfg.opensearch, timeout=30),
                IndexLayout(cfg.opensearch.index_prefix),
                open_store(cfg, "archive"),
                index_wait_s=cfg.sinks.metadata_index_wait_s,
                write_retry_s=cfg.sinks.metadata_write_retry_s,
            )
        ]
        group, port = cfg.sinks.metadata_group, cfg.sinks.metadata_metrics_port
    else:
        from diana.clients import opensearch_client
        from diana.schemas.layout import IndexLayout
        from diana.schemas.topics import INSTANCES
        from diana.sinks.opensearch import OpenSearchSink

        # Instances in a consumer of their own: the aggregates' revisions never queue in front of them.
        # A client each: one HTTP connection each, neither waits for the other's request.
        others = tuple(t for t in OpenSearchSink.topics if t != INSTANCES.name)
        sinks = [
            OpenSearchSink(
                opensearch_client(cfg.opensearch, timeout=30),
                IndexLayout(cfg.opensearch.index_prefix),
                max_bytes=cfg.sinks.bulk_max_bytes,
                conflict_policy=cfg.sinks.archive_conflict_policy,
                topics=topics,
                number_of_replicas=cfg.opensearch.number_of_replicas,
                refresh_interval=cfg.opensearch.refresh_interval,
                refresh_on_write=cfg.opensearch.refresh_on_write,
            )
            for topics in ((INSTANCES.name,), others)
        ]
        for each in sinks:
            each.prepare_indices()
        group, port = cfg.sinks.opensearch_group, cfg.sinks.opensearch_metrics_port
    start_metrics(cfg, port)
    batch = 100 if args.sink == "metadata" else cfg.opensearch.bulk_max_docs  # series revisions: few, each heavy
    run_sinks(
        sinks,
        cfg.kafka,
        group,
        stop,
        batch_size=batch,
        max_wait_s=cfg.sinks.max_wait_s,
        session_timeout_s=cfg.sinks.session_timeout_s,
    )
    return 0


def cmd_topics(cfg: Config, _args: argparse.Namespace) -> int:
    """Create every diana-star topic that does not exist yet."""
    from diana.clients import kafka_admin
    from diana.schemas.topics import INSTANCES, ensure_topics, topic_settings

    admin = kafka_admin(cfg.kafka)
    created = ensure_topics(admin, cfg.kafka.partitions, **topic_settings(cfg.kafka))
    log.info("topics.ready", created=created)
    count = len(admin.list_topics(INSTANCES.name, timeout=30).topics[INSTANCES.name].partitions)
    if count != cfg.kafka.partitions:
        # Left as it is: the stream workers refuse to start on it, with the same advice.
        print(
            f"diana topics: {INSTANCES.name} has {count} partitions, [kafka] partitions is {cfg.kafka.partitions}; "
            'existing topics keep their count (docs/OPERATIONS.md, "The partition count")',
            file=sys.stderr,
        )
    return 0


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    """Start the local stack and every pipeline process; Ctrl-C stops everything."""
    from diana.compose.local.stack import local_stack
    from diana.operations.supervisor import run_pipeline

    stack = local_stack(cfg)
    if not args.no_stack:
        stack.start()
    try:
        cmd_topics(cfg, args)
        # DICOMweb, and the Q/R SCP on its own port when the receiver does not answer it.
        extra = [("serve", ["serve", "--only", "web"] if cfg.query_retrieve.on_receiver else ["serve"])]
        # The alert delivery worker runs when recipients are configured ([alerts] routing).
        extra += [("alerts", ["alerts", "deliver"])] if cfg.alerts.routing else []
        extra += [("router", ["route"])] if cfg.routing.rules else []
        run_pipeline(cfg, args.config, stop_on_signals(), on_ready=lambda: print(_banner(cfg), flush=True), extra=extra)
    finally:
        if not args.no_stack and not args.keep_stack:
            stack.stop()
    return 0


def _banner(cfg: Config) -> str:
    r = cfg.receiver
    return (
        "\n"
        f"  diana-star is running.\n"
        f"  Send DICOM to:   AE title {r.ae_title}, port {r.port} (host {r.host})\n"
        f"                   e.g. storescu -aec {r.ae_title} 127.0.0.1 {r.port} FILE...\n"
        + (
            "  Query/retrieve:  the same AE title and port (C-FIND, C-MOVE, C-GET)\n"
            if cfg.query_retrieve.on_receiver
            else f"  Query/retrieve:  AE title {r.ae_title}, port {cfg.query_retrieve.port}\n"
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
        + (
            f"  Archive:         s3://{cfg.storage.s3_bucket}/archive/ at {cfg.storage.s3_endpoint or 'AWS'}\n"
            if cfg.storage.backend == "s3"
            else f"  Archive:         {cfg.path(cfg.storage.archive_dir)}\n"
        )
        + f"  Metrics:         http://127.0.0.1:{r.metrics_port}/metrics (receiver)\n"
        f"  Press Ctrl-C to stop everything.\n"
    )


def register(sub: argparse._SubParsersAction) -> None:
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
    imp = sub.add_parser(
        "import",
        help="publish existing DICOM files (folders, zips, DICOMDIRs)",
        description=f"{cmd_import.__doc__} Each object is validated, landed and published "
        "exactly like a C-STORE; non-DICOM files are skipped (a bare data set in Implicit VR Little Endian, "
        "without preamble, is imported with a file meta added); a summary lists what was "
        "rejected and why. Symlinked folders are followed (each folder once), and each file is imported once "
        "whatever names it (a folder and a DICOMDIR given, symlinks, hard links). Exit status 1 if "
        "anything failed for a reason that may pass (broker, disk, a folder or file that cannot be read, "
        "a file a DICOMDIR names that is missing), or when it stopped after a few publish failures in a row "
        "(the broker down) or because the --report file could not be written (its disk full); 0 when the rest was only skipped or rejected (bad content: running again cannot "
        "help); 130 on Ctrl-C (the summary printed), whatever else went wrong; every cause is said.",
    )
    imp.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="a folder, a zip (by its content: a self-extracting .exe too), a DICOMDIR file, or a DICOM file",
    )
    imp.add_argument("--workers", type=whole_number(1), default=8, help="objects in flight at once (default 8)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in scripts)")
    imp.add_argument(
        "--report",
        metavar="FILE",
        help="write the files not imported (outcome: skipped, rejected or failed; reason; file) to FILE as CSV, "
        "readable by you only, a row as each file's outcome is known; "
        "the log and the summary name no file (paths often hold patients' names). A row that cannot be "
        "written (the disk full) stops the import: the files in flight are finished, the summary printed, "
        "exit status 1",
    )
    imp.set_defaults(func=cmd_import)

    sub.add_parser(
        "aggregate",
        help="run the worker for series and study aggregates",
        description="Run the exactly-once worker (Kafka transactions) that folds dicom.instances "
        "into dicom.series and dicom.studies, with completion verdicts. Several "
        "workers share the partitions; give each its own [stream] web_port (its "
        "Prometheus metrics). A worker keeps its id ([stream] worker_id, or one kept in "
        "[stream] data_dir): restarted within 10 s it gets its partitions back with no rebalance.",
    ).set_defaults(func=cmd_aggregate)
    from diana.cli.access import AS_OF_DEFAULT, check_dose_names, cmd_dose_drl, cmd_dose_names

    dose = sub.add_parser(
        "dose",
        help="run the Faust worker for dose records and dose alerts",
        description="Run the Faust worker that extracts dose events from dose reports and image "
        "headers in dicom.instances, folds them per study into dose.events and "
        "dose.studies, and raises dose.alerts ([dose] alert_rules, docs/DOSE.md). "
        "With ACTION: names or drl, reports from the dose indices.",
    )
    dose.set_defaults(func=cmd_dose)
    dose_sub = dose.add_subparsers(dest="dose_action", metavar="ACTION")
    names = dose_sub.add_parser(
        "names", help="protocols without a standard name, with counts", description=cmd_dose_names.__doc__
    )
    names.add_argument(
        "--days",
        type=whole_number(1),
        default=None,
        help="only studies dated in the DAYS days ending today (today included), or later: a study dated in "
        "the future (a modality's clock wrong) is listed",
    )
    names.add_argument(
        "--as-of",
        type=calendar_day,
        metavar="YYYY-MM-DD",
        help="with --days only: the last of the DAYS days, and no study dated after it is listed "
        "(without --as-of the days end today in [report] time_zone, empty: this host's zone)",
    )
    names.set_defaults(func=cmd_dose_names, check_args=check_dose_names)
    drl = dose_sub.add_parser(
        "drl", help="median per standard name against the reference levels", description=cmd_dose_drl.__doc__
    )
    drl.add_argument(
        "--as-of",
        type=calendar_day,
        metavar="YYYY-MM-DD",
        help=f"the last day of the survey's window ([dose] reference_levels' window_days); {AS_OF_DEFAULT}",
    )
    drl.set_defaults(func=cmd_dose_drl)
    sink = sub.add_parser(
        "sink",
        help="run a sink (archive, opensearch, or metadata: prepared WADO-RS metadata)",
        description="Run a sink: consume, write durably and idempotently, then commit.",
    )
    sink.add_argument("sink", choices=["archive", "opensearch", "metadata"])
    sink.set_defaults(func=cmd_sink)
    sub.add_parser("topics", help="create the missing topics", description=cmd_topics.__doc__).set_defaults(
        func=cmd_topics
    )
