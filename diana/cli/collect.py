"""`diana collect`: pull studies from a PACS into diana-star (producers/pacs_pull, docs/COLLECT.md)."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from diana.cli._common import fail, open_private, stop_on_signals
from diana.config import Config

# The job ended, but a study failed or came partly, or a line's C-FIND failed or could not be used.
EXIT_SHORT = 3
EXIT_STATUSES = """exit status:
  0    the job ended and everything found came (or was already in diana-star); a line that
       found nothing (not_found) is an answer, not a failure
  3    the job ended but something did not come: a study failed or partial, a line find_failed
       or unparsable (see --report, or 'diana collect status JOB --report -')
  1    Kafka or OpenSearch does not answer, or the PACS cannot serve the job as configured
       (move destination unknown, Study Root C-FIND or C-MOVE not accepted); once fixed, run
       the same command again to resume
  2    usage
  130  stopped (Ctrl-C, SIGTERM); run the same command again to resume"""


def _requests(args: argparse.Namespace):
    from diana.producers.pacs_pull.requests import RequestError, criteria_request, parse_csv

    if args.input:
        problem = check_collect_run(args)  # main() refuses it first; here too for any other caller
        if problem:
            raise RequestError(problem)
        return parse_csv(Path(args.input))
    return [criteria_request(args.date_from or "", args.date_to or "", tuple(args.modality or ()))]


def check_collect_run(args: argparse.Namespace) -> str | None:
    """A usage error of `diana collect run` (argparse's, exit status 2), else None."""
    given = [
        f for f, v in (("--date-from", args.date_from), ("--date-to", args.date_to), ("--modality", args.modality)) if v
    ]
    if args.input and given:
        # They were dropped without a word: every study of each line was pulled, of any date and modality.
        return (
            f"{'/'.join(given)} {'apply' if len(given) > 1 else 'applies'} without INPUT only (a job by criteria); with a file, put them on each "
            f"line: a CSV with PatientID (or AccessionNumber, StudyInstanceUID) and DateFrom, DateTo, Modality columns"
        )
    return None


def cmd_collect_run(cfg: Config, args: argparse.Namespace) -> int:
    """Find the input's studies on the PACS and have it send them to diana-star's receiver, throttled;
    running the same command again resumes the job where it stopped."""
    from confluent_kafka import KafkaException
    from opensearchpy.exceptions import ConnectionError as OSConnectionError
    from tqdm import tqdm

    from diana.clients import kafka_admin, opensearch_client
    from diana.producers.pacs_pull.completeness import IndexedCounter
    from diana.producers.pacs_pull.job import CollectJob, JobConflict, job_id_for
    from diana.producers.pacs_pull.ledger import RETRIED_STUDY, JobLedger, JobState, load_events
    from diana.producers.pacs_pull.report import shortfall, summary_line, write_report
    from diana.producers.pacs_pull.requests import RequestError
    from diana.producers.pacs_pull.scu import MoveDestinationUnknown, PacsClient, PacsSetupError, ReceiverProbe
    from diana.producers.pacs_pull.throttle import TimeWindows
    from diana.schemas.topics import ensure_topics, topic_settings

    if not args.input and not (args.date_from or args.date_to):
        return fail("collect run", "give a CSV file (accession numbers, PatientIDs...) or --date-from/--date-to")
    try:
        requests = _requests(args)
        TimeWindows(cfg.collect.windows)
    except (RequestError, ValueError) as exc:
        return fail("collect run", str(exc))
    job_id = args.job or job_id_for(requests)
    settings = cfg.collect
    destination = settings.move_destination or cfg.receiver.ae_title
    try:
        ensure_topics(kafka_admin(cfg.kafka), cfg.kafka.partitions, **topic_settings(cfg.kafka))
        job = JobState.fold(job_id, load_events(cfg.kafka, job_id))
    except (KafkaException, TimeoutError) as exc:
        return fail("collect run", f"Kafka at {cfg.kafka.bootstrap} does not answer ({exc}); start the stack", code=1)
    print(
        f"job {job_id}: {len(requests)} lines; PACS {settings.pacs_ae_title} at {settings.pacs_host}:"
        f"{settings.pacs_port}, sending to {destination}",
        file=sys.stderr,
    )
    stop = stop_on_signals()
    done_before = sum(
        1 for s in job.studies.values() if s.done and not (args.retry_failed and s.state in RETRIED_STUDY)
    )
    bar = tqdm(
        total=max(len(job.studies), 1), initial=done_before, unit="study", desc="collect", disable=args.no_progress
    )
    counter = IndexedCounter(opensearch_client(cfg.opensearch), cfg.opensearch.index_prefix)

    def study_done(_study) -> None:
        bar.total = max(bar.total or 0, len(job.studies))
        bar.update(1)

    runner = CollectJob(
        settings,
        job,
        requests,
        JobLedger(cfg.kafka, job_id),
        PacsClient(settings, destination),
        counter,
        notify=lambda text: tqdm.write(text, file=sys.stderr),
        on_study_done=study_done,
        stop=stop,
        # Sent to our receiver: C-ECHOed before retrieves. Sent to another AE: its business. A receiver
        # on DICOM over TLS is not probed (a plain C-ECHO cannot reach it, and this host may hold no
        # client certificate): a job would pause for ever on a receiver that runs.
        receiver=ReceiverProbe(cfg.receiver, settings.ae_title, settings.pause_s)
        if destination == cfg.receiver.ae_title and not cfg.receiver.tls_cert_file
        else None,
        retry_failed=args.retry_failed,
    )
    try:
        runner.start()
        runner.resolve_lines()
        bar.total = max(len(job.studies), 1)
        bar.refresh()
        if not stop.is_set():
            runner.retrieve_all()
    except JobConflict as exc:
        return fail("collect run", str(exc))
    except MoveDestinationUnknown as exc:
        named_by = "[collect] move_destination" if settings.move_destination else "[receiver] ae_title"
        host = "this host's address" if cfg.receiver.host in ("", "0.0.0.0", "::") else cfg.receiver.host
        return fail(
            "collect run",
            f"{exc}: the move destination is {destination!r} ({named_by}); configure {destination!r} on the "
            f"PACS as a move destination with our receiver's host and port ({host}, port {cfg.receiver.port}), "
            f"and check that the receiver runs; no study was marked failed: then run the same command again "
            f"to resume job {job_id}",
            code=1,
        )
    except PacsSetupError as exc:
        return fail(
            "collect run",
            f"{exc}; no study was marked failed: once fixed, run the same command again to resume job {job_id}",
            code=1,
        )
    except OSConnectionError:
        return fail(
            "collect run",
            f"OpenSearch does not answer at {cfg.opensearch.url}; start the stack, then run the same command "
            f"again to resume job {job_id}",
            code=1,
        )
    except KafkaException as exc:
        return fail(
            "collect run",
            f"Kafka at {cfg.kafka.bootstrap} did not record a step ({exc}); start the stack, then run the same "
            f"command again to resume job {job_id}",
            code=1,
        )
    finally:
        bar.close()
    if args.report:
        with open_private(args.report) as fh:  # accession numbers: readable by the owner only
            rows = write_report(job, fh)
        print(f"{rows} report lines written to {args.report}")
    print(summary_line(job))
    if stop.is_set():
        print(f"stopped; run the same command again (or with --job {job_id}) to resume", file=sys.stderr)
        return 130
    if args.export:
        from diana.cli.access import _cohort_export

        uids = [s.study_instance_uid for s in job.studies.values() if s.state in ("STUDY_COMPLETE", "STUDY_SKIPPED")]
        args.out = args.export
        code = _cohort_export(cfg, args, counter.client, cfg.opensearch.index_prefix, uids)
        if code:
            return code
    short = shortfall(job)
    if short:
        # A script or scheduler must be able to tell that not everything asked for came.
        where = f"--report FILE.csv, or 'diana collect status {job_id} --report -'"
        again = (
            "; once the cause is fixed, the same command with --retry-failed tries them again"
            if set(short) - {"unparsable"}
            else ""
        )
        print(
            f"not everything came ({', '.join(f'{n} {name}' for name, n in short.items())}): see {where}{again}",
            file=sys.stderr,
        )
        return EXIT_SHORT
    return 0


def cmd_collect_status(cfg: Config, args: argparse.Namespace) -> int:
    """A job's state from its record on collect.jobs (also while it runs): counts, or the full report."""
    from confluent_kafka import KafkaException

    from diana.producers.pacs_pull.ledger import JobState, load_events
    from diana.producers.pacs_pull.report import summary_line, write_report

    try:
        events = load_events(cfg.kafka, args.job)
    except (KafkaException, TimeoutError) as exc:
        return fail("collect status", f"Kafka at {cfg.kafka.bootstrap} does not answer ({exc})", code=1)
    if not events:
        return fail(
            "collect status", f"no job {args.job!r} on collect.jobs (the job id is printed when a job starts)", 1
        )
    job = JobState.fold(args.job, events)
    print(summary_line(job))
    if args.report == "-":
        write_report(job, sys.stdout)
    elif args.report:
        with open_private(args.report) as fh:  # accession numbers: readable by the owner only
            write_report(job, fh)
        print(f"report written to {args.report}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    collect = sub.add_parser(
        "collect",
        help="pull studies from a PACS (C-FIND, C-MOVE to our receiver), throttled and resumable",
        description="Pull studies from the PACS of [collect] into diana-star: docs/COLLECT.md.",
    )
    collect_sub = collect.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = collect_sub.add_parser(
        "run",
        help="run (or resume) a job",
        description=inspect.cleandoc(cmd_collect_run.__doc__ or ""),  # raw below: the epilog's columns
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "input",
        nargs="?",
        help="CSV with a header naming AccessionNumber, or PatientID (with DateFrom/DateTo), or StudyInstanceUID "
        "(what 'diana cohort find --output F.csv' writes), optionally Modality; or one accession number per line",
    )
    run.add_argument("--date-from", metavar="YYYY-MM-DD", help="without INPUT: every study from this date")
    run.add_argument("--date-to", metavar="YYYY-MM-DD", help="without INPUT: every study up to this date")
    run.add_argument(
        "--modality", action="append", metavar="M", help="without INPUT: only these modalities (repeatable)"
    )
    run.add_argument("--job", metavar="ID", help="the job id (default: derived from the input, so a rerun resumes)")
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="try again the studies that ended failed or partial and the lines whose C-FIND failed "
        "(once their cause is fixed; without it a finished job changes nothing)",
    )
    run.add_argument("--report", metavar="FILE.csv", help="write the job's report here at the end")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    exp = run.add_argument_group("export once done (the objects of the studies retrieved or already present)")
    exp.add_argument("--export", metavar="PATH", help="a new folder, or a file ending in .zip")
    exp.add_argument("--research", action="store_true", help="research export: de-identified by default")
    exp.add_argument("--deidentify", dest="deidentify", action="store_true", default=None, help="de-identify")
    exp.add_argument("--no-deidentify", dest="deidentify", action="store_false", help="byte-identical copies")
    exp.add_argument("--secret-file", metavar="FILE", help="site secret (default: [export] site_secret_file)")
    exp.add_argument("--key-file", metavar="FILE", help="also write pseudonym -> original identity here (mode 600)")
    from diana.access import research  # the Annex E option flags live beside their rules

    research.add_arguments(exp)
    run.set_defaults(func=cmd_collect_run, check_args=check_collect_run)

    status = collect_sub.add_parser("status", help="a job's state", description=cmd_collect_status.__doc__)
    status.add_argument("job", metavar="JOB", help="the job id printed when the job started")
    status.add_argument("--report", metavar="FILE.csv", help="also write the report ('-': to standard output)")
    status.set_defaults(func=cmd_collect_status)
