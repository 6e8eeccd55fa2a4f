"""The outward commands: cohort find and export, dashboards, report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diana.cli._common import calendar_day, fail, open_private, service_error, whole_number
from diana.config import Config

COHORT_FILTERS = (
    "--modality, --date-from, --date-to, --body-part, --description, --station, --manufacturer, "
    "--calling-ae, --age-min, --age-max, --sex, --dose-above"
)


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


DEFAULT_COHORT_LIMIT = 10_000

# --as-of's default, for the dose commands whose window ends on a day (dose names, dose drl)
AS_OF_DEFAULT = "default: today in [report] time_zone (empty: this host's zone), so that a run can be repeated"


def cmd_cohort(cfg: Config, args: argparse.Namespace) -> int:
    """Find the studies matching filters; print them, write CSV/JSON, or export their objects."""
    from opensearchpy.exceptions import NotFoundError, TransportError

    from diana.access.cohort import CohortError, find_studies, write_rows
    from diana.clients import opensearch_client

    command = f"cohort {args.action}"
    output_format = args.format if args.action == "find" else None
    if args.action == "find" and args.output and not output_format:
        output_format = _format_of(args.output)
        if output_format is None:
            return fail(
                command,
                f"--output {args.output}: the file's suffix says its format: .csv or .json (none: CSV); "
                f"for another name pass --format {'|'.join(OUTPUT_FORMATS)}",
            )
    client = opensearch_client(cfg.opensearch, timeout=60)
    prefix = cfg.opensearch.index_prefix
    limit = args.limit or DEFAULT_COHORT_LIMIT
    try:
        found = find_studies(client, prefix, _cohort_filter(args), limit=limit)
    except CohortError as exc:
        return fail(command, str(exc))
    except NotFoundError as exc:
        return fail(command, f"index missing ({getattr(exc, 'info', exc)}); nothing indexed yet?", code=1)
    except TransportError as exc:
        return _refused(cfg, command, exc, "narrow the filters")
    rows = found.rows
    if args.action == "export" and not rows:  # before anything is created: no empty folder to take for an export
        return fail(command, "no study matches the filters; nothing exported", code=1)
    if found.more_match:
        if args.action == "export" and args.limit is None:
            # An export the researcher takes for the whole cohort must be the whole cohort.
            return fail(
                command,
                f"more than {limit} studies match; nothing exported. Narrow the filters, or pass --limit: "
                f"--limit {limit} exports the {limit} earliest by study date, a larger one more",
                code=1,
            )
        print(
            f"diana {command}: more than {limit} studies match; the {limit} earliest by study date are "
            f"{'returned' if args.action == 'find' else 'exported'} - raise --limit to get them all",
            file=sys.stderr,
        )
    if args.action == "find":
        if args.output:
            with open_private(args.output) as fh:  # patient IDs: readable by the owner only
                write_rows(rows, fh, output_format or "csv")
            print(f"{len(rows)} studies written to {args.output}")
        else:
            write_rows(rows, sys.stdout, args.format or "table")
        return 0
    return _cohort_export(cfg, args, client, prefix, [r["study_instance_uid"] for r in rows])


OUTPUT_FORMATS = ("table", "csv", "json")


def _format_of(output: str) -> str | None:
    """The format `cohort find -o FILE` writes, from FILE's suffix whatever its case (no suffix: CSV);
    None for another suffix (.txt, .xlsx), which before silently got the text table."""
    suffix = Path(output).suffix.lower()
    return {"": "csv", ".csv": "csv", ".json": "json"}.get(suffix)


def _refused(cfg: Config, command: str, exc, fix: str) -> int:
    """A search OpenSearch refused (a TransportError) as one line: its reason and ``fix``. Not answering,
    TLS and credentials are raised on to the command line's own handler, which says which OpenSearch and
    where it is set."""
    if service_error(exc, cfg) is not None:
        raise exc
    return fail(command, f"OpenSearch refused the search ({_refusal(exc)}); {fix}", code=1)


def _refusal(exc) -> str:
    """An OpenSearch refusal in a few words: status, error type and the root cause's reason."""
    info = exc.info if isinstance(exc.info, dict) else {}
    error = info.get("error")
    error = error if isinstance(error, dict) else {}
    causes = error.get("root_cause") or [error]
    reason = (causes[0] or {}).get("reason") or exc.error
    return f"{exc.status_code} {exc.error}: {str(reason)[:300]}"


def _cohort_export(cfg: Config, args: argparse.Namespace, client, prefix: str, study_uids: list[str]) -> int:
    from opensearchpy.exceptions import TransportError
    from tqdm import tqdm

    from diana.access.cohort import count_instances, study_instance_batches
    from diana.access.export import INCOMPLETE_NAME, ExportError, NothingToExport, export_batches
    from diana.access.keyfiles import KeyFileError
    from diana.access.research import deidentifier_from
    from diana.storage import open_store

    deidentify = args.deidentify if args.deidentify is not None else args.research
    deidentifier = None
    if deidentify:
        secret_file = args.secret_file or cfg.export.site_secret_file
        if not secret_file:
            return fail(
                "cohort export",
                "de-identification needs a site secret: create one with "
                "'head -c 32 /dev/urandom > site.secret; chmod 600 site.secret' and pass --secret-file "
                "site.secret (or set [export] site_secret_file)",
            )
        try:
            deidentifier = deidentifier_from(args, cfg.path(Path(secret_file)))
        except (OSError, ValueError) as exc:  # KeyFileError is a ValueError
            return fail("cohort export", str(exc))
    if args.key_file and not deidentify:
        return fail("cohort export", "--key-file only makes sense with de-identification (--research)")
    try:
        total = count_instances(client, prefix, study_uids)
    except TransportError as exc:
        return _refused(cfg, "cohort export", exc, "nothing exported; narrow the filters")
    try:
        # The studies' instances are searched a batch of studies at a time, as the export goes.
        with tqdm(total=total, unit="obj", desc="export", disable=args.no_progress) as bar:
            summary = export_batches(
                study_instance_batches(client, prefix, study_uids),
                open_store(cfg, "archive"),
                Path(args.out),
                deidentifier=deidentifier,
                key_file=Path(args.key_file) if args.key_file else None,
                progress=bar.update,
            )
    except NothingToExport as exc:  # as when no study matches: the world changed, not the command line
        return fail("cohort export", str(exc), code=1)
    except (ExportError, KeyFileError) as exc:
        return fail("cohort export", str(exc))
    except TransportError as exc:
        if Path(args.out).suffix.lower() == ".zip":
            where = "the zip was not written"
        else:
            where = f"{args.out} is marked with {INCOMPLETE_NAME}"
        return _refused(cfg, "cohort export", exc, f"the export stopped ({where}); run it again into a new --out")
    print("\n".join(summary.lines()))
    return 0 if summary.complete else 1


def cmd_dashboards(cfg: Config, args: argparse.Namespace) -> int:
    """Import the Operations, Cohort discovery and Dose monitoring dashboards into OpenSearch Dashboards."""
    from diana.access.dashboards import install, render_ndjson

    ndjson = render_ndjson(cfg.opensearch.index_prefix)
    if args.action == "export":
        if args.output:
            Path(args.output).write_text(ndjson, encoding="utf-8")
        else:
            sys.stdout.write(ndjson)
        return 0
    import requests

    from diana.clients import opensearch_auth

    # Dashboards logs in with the users of its OpenSearch: [opensearch] username and password, sent only
    # over https (as to OpenSearch itself), the certificate checked against [opensearch] ca_file if set.
    secure = args.url.startswith("https://")
    try:
        result = install(
            args.url,
            ndjson,
            auth=opensearch_auth(cfg.opensearch) if secure else None,
            verify=cfg.opensearch.ca_file or True,
        )
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            if not secure:
                why = "credentials are sent only to an https:// --url"
            elif cfg.opensearch.username:
                why = f"check [opensearch] username ({cfg.opensearch.username}) and its password, and the user's rights"
            else:
                why = "set [opensearch] username, and its password through DIANA_OPENSEARCH_PASSWORD or password_file"
            return fail("dashboards", f"{args.url} refused the credentials (HTTP {status}): {why}", code=1)
        return fail("dashboards", f"import into {args.url} failed: {exc}", code=1)
    except requests.RequestException as exc:
        return fail(
            "dashboards",
            f"import into {args.url} failed: {exc}. Is OpenSearch Dashboards running there? "
            f"The file can also be imported by hand: write it with 'diana dashboards export -o diana-star.ndjson'",
            code=1,
        )
    print(
        f"imported {result.get('successCount', 0)} saved objects into {args.url}"
        + ("" if result.get("success", False) else f"; errors: {result.get('errors')}")
    )
    return 0 if result.get("success", False) else 1


def cmd_report(cfg: Config, args: argparse.Namespace) -> int:
    """Write a self-contained HTML report of ingest and dose for a date range (no network needed to view it)."""
    from datetime import date, timedelta

    from opensearchpy.exceptions import NotFoundError, TransportError

    from diana.access.report import MissingInstanceIndex, build_report
    from diana.access.site_zone import site_time_zone
    from diana.clients import opensearch_client
    from diana.durable import write_atomic
    from diana.stream_apps.dose.reference_levels import LevelsError, load_reference_levels

    zone = site_time_zone(cfg.report.time_zone)
    time_zone = zone.name
    today = zone.today()
    out_of_range = "a date of the report falls outside 0001-01-01 to 9999-12-31"
    try:
        end = date.fromisoformat(args.to_date) if args.to_date else today
        start = date.fromisoformat(args.from_date) if args.from_date else end - timedelta(days=30)
    except ValueError as exc:
        return fail("report", f"{exc}; dates look like 2024-03-15")
    except OverflowError:  # --to in the first 30 days of year 1: its default --from is before any date
        return fail("report", f"{out_of_range} (--from defaults to 30 days before --to): give --from")
    if start > end:
        return fail("report", f"--from {start} is after --to {end}")
    try:
        levels = load_reference_levels(cfg.path(Path(cfg.dose.reference_levels))) if cfg.dose.reference_levels else None
    except LevelsError as exc:
        return fail("report", str(exc))
    client = opensearch_client(cfg.opensearch, timeout=60)
    try:
        page = build_report(
            client,
            cfg.opensearch.index_prefix,
            start,
            end,
            levels,
            time_zone=time_zone,
            as_of=args.as_of or end,  # the survey ends with the report unless told otherwise
            zone_note=zone.note,
            identifiers=args.identifiers,
        )
    except MissingInstanceIndex as exc:
        return fail("report", str(exc), code=1)
    except OverflowError:  # the day after --to, or the reference-level survey's window before --as-of
        return fail(
            "report", f"{out_of_range} (the day after --to; the survey's window_days before --as-of): use real dates"
        )
    except NotFoundError as exc:  # before the sinks made the indices: not a zone to fix
        return fail("report", f"index missing ({getattr(exc, 'info', exc)}); nothing indexed yet?", code=1)
    except TransportError as exc:
        # The zone is what a site sets in these searches: OpenSearch (Java) may not know a name Python does.
        fix = (
            f"the days were asked in {time_zone} ([report] time_zone, empty: this host's zone); if the reason "
            'names it, set [report] time_zone to an IANA name such as "Europe/Zurich"'
        )
        return _refused(cfg, "report", exc, fix)
    write_atomic(Path(args.out), page.encode("utf-8"))
    print(f"report {start} to {end} ({time_zone} days) written to {args.out}")
    return 0


def _as_of(cfg: Config, args: argparse.Namespace):
    """The last day of a dose window: --as-of, else today in the site's zone ([report] time_zone, else the host's)."""
    from diana.access.site_zone import site_time_zone

    return args.as_of or site_time_zone(cfg.report.time_zone).today()


def check_dose_names(args: argparse.Namespace) -> str | None:
    """A usage error of `diana dose names` (argparse's, exit status 2), else None."""
    if args.as_of is not None and args.days is None:
        return "--as-of ends the --days window: add --days N (without --days every study is listed, whatever its date)"
    return None


def cmd_dose_names(cfg: Config, args: argparse.Namespace) -> int:
    """List the protocols and study descriptions of the dose indices that no standard name maps, most frequent first."""
    from opensearchpy.exceptions import TransportError

    from diana.access.dose_survey import render_unmapped, unmapped_protocols
    from diana.clients import opensearch_client

    today = _as_of(cfg, args)
    client = opensearch_client(cfg.opensearch, timeout=30)
    # Without --as-of, studies dated after today (a modality's clock wrong) are listed: bad data shows here.
    try:
        survey = unmapped_protocols(
            client, cfg.opensearch.index_prefix, args.days, today, bounded=args.as_of is not None
        )
    except TransportError as exc:
        return _refused(cfg, "dose names", exc, "narrow the window with --days")
    print(render_unmapped(survey))
    return 0


def cmd_dose_drl(cfg: Config, args: argparse.Namespace) -> int:
    """Compare the median of each standard name's studies over the survey window with its local and national DRLs."""
    from diana.access.dose_survey import reference_level_survey, render_survey
    from diana.clients import opensearch_client
    from diana.stream_apps.dose.reference_levels import LevelsError, load_reference_levels

    if not cfg.dose.reference_levels:
        return fail("dose drl", "no reference levels: set [dose] reference_levels to a YAML file (docs/DOSE.md)")
    try:
        levels = load_reference_levels(cfg.path(Path(cfg.dose.reference_levels)))
    except LevelsError as exc:
        return fail("dose drl", str(exc))
    from opensearchpy.exceptions import TransportError
    from opensearchpy.helpers import ScanError

    today = _as_of(cfg, args)
    client = opensearch_client(cfg.opensearch, timeout=30)
    try:
        rows = reference_level_survey(client, cfg.opensearch.index_prefix, levels, today)
    except TransportError as exc:
        return _refused(cfg, "dose drl", exc, "nothing compared")
    except ScanError as exc:  # shards failed mid-scroll: no status of its own (not a TransportError)
        return fail("dose drl", f"OpenSearch did not finish the search ({str(exc)[:300]}); nothing compared", code=1)
    print(render_survey(rows, levels.window_days, today))
    return 0


def cmd_alerts(cfg: Config, args: argparse.Namespace) -> int:
    """Deliver dose alerts to people (e-mail, webhook) once; list, acknowledge and close them."""
    from diana.access.alerts.workflow import REASON_CODES, TransitionError

    if args.action == "deliver":
        from diana.access.alerts.delivery import run_delivery
        from diana.access.alerts.routing import RoutingError, load_routing
        from diana.clients import kafka_admin
        from diana.schemas.topics import ensure_topics, topic_settings

        try:
            routing = load_routing(cfg.path(Path(cfg.alerts.routing)) if cfg.alerts.routing else None)
        except RoutingError as exc:
            return fail("alerts deliver", str(exc))
        if not routing.recipients:
            return fail("alerts deliver", "no recipients: set [alerts] routing to a YAML file (docs/DOSE.md)")
        ensure_topics(kafka_admin(cfg.kafka), cfg.kafka.partitions, **topic_settings(cfg.kafka))
        run_delivery(cfg, routing)
        return 0
    from diana.access.alerts.commands import list_alerts, record_action, render_alerts

    if args.action == "list":
        print(render_alerts(list_alerts(cfg, None if args.status == "all" else args.status)))
        return 0
    if args.action == "ack" and args.reason not in REASON_CODES:
        return fail("alerts ack", f"--reason must be one of {', '.join(REASON_CODES)}")
    try:
        record = record_action(
            cfg, args.alert_id, "ACKNOWLEDGED" if args.action == "ack" else "CLOSED", args.reason, args.note
        )
    except TransitionError as exc:
        return fail(f"alerts {args.action}", str(exc), code=1)
    print(f"{record['action'].lower()} {args.alert_id} (recorded on dose.alert-actions as {record['action_id']})")
    return 0


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    """Serve what diana-star holds: the Query/Retrieve SCP (C-FIND, C-MOVE, C-GET) on [query_retrieve]
    port and DICOMweb (QIDO-RS, WADO-RS, STOW-RS) on [dicomweb] host:port; both by default."""
    from diana.access.dicomweb.server import base_url, dicomweb_app, run_dicomweb
    from diana.access.qr.server import QueryRetrieveServer
    from diana.cli._common import start_metrics
    from diana.config import ConfigError

    start_metrics(cfg, cfg.dicomweb.metrics_port)
    if args.only == "dicom":
        QueryRetrieveServer(cfg).serve_forever()
        return 0
    try:
        app, authenticated = dicomweb_app(cfg)
    except ConfigError as exc:
        return fail("serve", str(exc))
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


def _add_cohort_filters(ap: argparse.ArgumentParser) -> None:
    f = ap.add_argument_group("filters")
    f.add_argument("--modality", action="append", metavar="M", help="e.g. CT, or CT,MR for either (repeatable)")
    f.add_argument("--date-from", metavar="YYYY-MM-DD", help="study date on or after")
    f.add_argument("--date-to", metavar="YYYY-MM-DD", help="study date on or before")
    f.add_argument(
        "--body-part", action="append", metavar="PART", help="Body Part Examined, e.g. CHEST or CHEST,ABDOMEN"
    )
    f.add_argument("--description", metavar="WORDS", help="words in the study or series description or protocol")
    f.add_argument(
        "--station", action="append", metavar="NAME", help="Station Name; * and ? are wildcards, e.g. CT* (repeatable)"
    )
    f.add_argument("--manufacturer", action="append", metavar="NAME", help="Manufacturer, e.g. SIEMENS (repeatable)")
    f.add_argument("--calling-ae", action="append", metavar="AE", help="the AE title that sent the objects")
    f.add_argument("--age-min", type=float, metavar="YEARS", help="patient age at the study")
    f.add_argument("--age-max", type=float, metavar="YEARS", help="patient age at the study, at most")
    f.add_argument("--sex", action="append", metavar="M|F|O", help="Patient's Sex (repeatable)")
    f.add_argument(
        "--dose-above",
        action="append",
        metavar="METRIC=VALUE",
        help="e.g. total_dlp_mGycm=500 (metrics: total_dlp_mGycm, max_ctdivol_mGy, total_dap_Gym2, "
        "dose_rp_total_mGy, agd_left_mGy, agd_right_mGy, administered_activity_MBq, fluoro_time_s)",
    )


def _add_export_options(ap: argparse.ArgumentParser) -> None:
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
        "--no-deidentify", dest="deidentify", action="store_false", help="byte-identical copies, even with --research"
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
    from diana.access import research  # the Annex E option flags live beside their rules

    research.add_arguments(ap)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    cohort = sub.add_parser(
        "cohort",
        help="find studies by filters; export them (optionally de-identified)",
        description=cmd_cohort.__doc__,
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
        _add_cohort_filters(ap)
        ap.add_argument(
            "--limit",
            type=whole_number(1),
            metavar="N",
            help=f"at most N studies, the earliest by study date (default {DEFAULT_COHORT_LIMIT}); when more "
            "match, find says so on stderr and export refuses unless --limit is given",
        )
        if action == "find":
            ap.add_argument("--output", "-o", metavar="FILE", help="write to FILE (.csv or .json) instead of a table")
            ap.add_argument(
                "--format", choices=OUTPUT_FORMATS, help="default: table, or FILE's suffix (.csv, .json; none: csv)"
            )
        else:
            _add_export_options(ap)
        ap.set_defaults(func=cmd_cohort)

    dash = sub.add_parser(
        "dashboards",
        help="install the OpenSearch Dashboards saved objects",
        description=f"{cmd_dashboards.__doc__} 'export' writes the saved-objects file instead "
        "(compose/dashboards/diana-star.ndjson holds the same for the default index prefix).",
    )
    dash.add_argument("action", choices=["install", "export"])
    dash.add_argument("--url", default="http://127.0.0.1:5601", help="Dashboards URL (default http://127.0.0.1:5601)")
    dash.add_argument("--output", "-o", metavar="FILE", help="export: write here instead of standard output")
    dash.set_defaults(func=cmd_dashboards)

    serve = sub.add_parser(
        "serve",
        help="serve query/retrieve (DICOM) and DICOMweb",
        description=f"{cmd_serve.__doc__} The Q/R SCP has the receiver's AE title, allow-lists and TLS "
        "settings (the receiver also answers Q/R itself: [query_retrieve] on_receiver).",
    )
    serve.add_argument(
        "--only", choices=["dicom", "web"], help="just the Q/R SCP (dicom) or just DICOMweb (web); default both"
    )
    serve.set_defaults(func=cmd_serve)

    alerts = sub.add_parser(
        "alerts", help="deliver, list, acknowledge and close dose alerts", description=cmd_alerts.__doc__
    )
    alerts_sub = alerts.add_subparsers(dest="action", required=True, metavar="ACTION")
    alerts_sub.add_parser(
        "deliver",
        help="run the worker that sends each alert to its recipients once ([alerts] routing)",
        description="Send each dose alert to each recipient routed to it ([alerts] routing) by e-mail and "
        "webhook, once: deliveries are recorded on dose.alert-actions and never repeated; keeps the "
        "alert state index in OpenSearch.",
    )
    listing = alerts_sub.add_parser(
        "list",
        help="alerts with their status, newest first",
        description="List dose alerts with their status, newest first (the alert state index in OpenSearch).",
    )
    listing.add_argument("--status", choices=("open", "acknowledged", "closed", "all"), default="open")
    ack = alerts_sub.add_parser(
        "ack",
        help="acknowledge an open alert with a reason code and a note",
        description="Acknowledge an open dose alert: the reason code and the note are recorded on "
        "dose.alert-actions and kept in the alert's history.",
    )
    ack.add_argument("alert_id", help="the alert's id, as `diana alerts list` and the alert's message show it")
    ack.add_argument(
        "--reason", required=True, help="patient_habitus, repeat, protocol, equipment, clinical_need or other"
    )
    ack.add_argument("--note", default=None, help="free text kept in the alert's history")
    close = alerts_sub.add_parser(
        "close",
        help="close an acknowledged alert",
        description="Close an acknowledged dose alert; the action is recorded on dose.alert-actions.",
    )
    close.add_argument("alert_id", help="the alert's id, as `diana alerts list` shows it")
    close.add_argument("--note", default=None, help="free text kept in the alert's history")
    close.set_defaults(reason=None)
    alerts.set_defaults(func=cmd_alerts)

    rep = sub.add_parser(
        "report", help="write a self-contained HTML report of ingest and dose", description=cmd_report.__doc__
    )
    rep.add_argument("--from", dest="from_date", metavar="YYYY-MM-DD", help="first day (default: 30 days before --to)")
    rep.add_argument(
        "--to",
        dest="to_date",
        metavar="YYYY-MM-DD",
        help="last day, by arrival (default: today); days run midnight to midnight in [report] time_zone "
        "(default: this host's zone)",
    )
    rep.add_argument("--out", required=True, metavar="FILE.html", help="the report to write (replaced if it exists)")
    rep.add_argument(
        "--as-of",
        type=calendar_day,
        metavar="YYYY-MM-DD",
        help="the last day of the reference-level survey's window ([dose] reference_levels' window_days "
        "days ending on it; default: the report's last day, --to)",
    )
    rep.add_argument(
        "--identifiers",
        action="store_true",
        help="add the accession numbers of the studies over their reference level and of the dose alerts "
        "(direct identifiers; left out by default, the page being meant to be printed or mailed)",
    )
    rep.set_defaults(func=cmd_report)
