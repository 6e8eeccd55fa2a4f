"""The dose worker: dicom.instances -> dose.events, dose.studies, dose.alerts (and dose.by-patient).

Only objects that can carry dose are parsed (SRs, CT and projection images). Each study's state
(its reports and images, see study.py) lives in a changelog-backed table keyed by study, so it is
co-partitioned with dicom.instances. Every output has a deterministic id (event, study, alert)
and a re-sent output is byte for byte the first one (same revision, same times), so a consumer that
sees it twice overwrites it or drops it (the OpenSearch sink by document id and revision, alert
delivery by alert_id). Image-header events a later dose report of their kind superseded (or another
reconstructed series of the same acquisition) are retracted: dose.events gets each again with
``superseded_by`` set, and the sink deletes its document. An alert raised from such an event is
withdrawn the same way on dose.alerts (and closed on dose.alert-actions): one exposure, one alert; so
is a per-study alert whose value fell to or under its limit (study_alert_outputs).

Redelivery: Faust processes at least once, and the table's changelog write and the outputs are
separate sends. After a crash the changelog may hold a study's new state while its outputs never
reached the broker; the redelivered object then folds to no change. So an object already in the
state (the same SOP Instance UID) re-emits the study's current record, its events and its raised
alerts as they were first sent, instead of being dropped as a duplicate (stream_apps/README.md); an
alert the state does not record as raised is never sent then (a replay after an upgrade).

Cumulative rules need all of a patient's studies: each study's totals are re-keyed by PatientID
to dose.by-patient, where a second agent keeps per-patient state.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from datetime import UTC, datetime
from typing import Any

import faust
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydicom import Dataset

from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.topics import (
    ALERT_ACTIONS,
    DEADLETTER,
    DOSE_ALERTS,
    DOSE_BY_PATIENT,
    DOSE_EVENTS,
    DOSE_STUDIES,
    INSTANCES,
)
from diana.stream_apps.dose import concepts as C
from diana.stream_apps.dose.alerts import (
    AlertRules,
    cumulative_alerts,
    drl_alerts,
    event_alerts,
    repeat_alerts,
    report_value,
    rule_basis,
    study_alerts,
    study_sums,
    withdrawal_action,
    withdrawal_note,
)
from diana.stream_apps.dose.content import Item
from diana.stream_apps.dose.extract import DoseExtractionError, dataset_from_header_json, extract_dose
from diana.stream_apps.dose.image_files import ImageFiles
from diana.stream_apps.dose.reference_levels import ReferenceLevels
from diana.stream_apps.dose.size import image_water_equivalent_diameter_mm
from diana.stream_apps.dose.standard_names import StandardNames
from diana.stream_apps.dose.study import family, fold_report, fold_size, new_study, summarize, superseded_events

__all__ = [
    "register_dose",
    "may_carry_dose",
    "TABLES",
    "alerts_to_send",
    "withdrawals_to_send",
    "study_alert_outputs",
    "dose_of",
    "content_omitted",
    "ReportNotInHeader",
    "metrics_page",
]

TABLES = ("dose-studies", "dose-patients")

log = structlog.get_logger("diana.stream.dose")
# A dose report whose content tree was left out of its event's header (over the header budget: a
# long fluoroscopy procedure's report of ~1,000 events is several MB): read from the stored object, or
# not (dead-lettered). Before, nothing was extracted from it, and nothing said so.
REPORTS_FROM_OBJECT = Counter(
    "diana_dose_reports_from_object_total",
    "Dose reports whose content was not (all) in the event's header, by outcome (read from the object,"
    " unread, header: part left out, object unread, the header's content used)",
    ["outcome"],
)

_DOSE_MODALITIES = {"SR", "CT", "CR", "DX", "MG", "RF", "XA", "PX", "IO", "PT", "NM"}
_SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."
_CONTEXT = (
    "accession_number",
    "study_date",
    "study_description",
    "modality",
    "manufacturer",
    "manufacturer_model_name",
    "station_name",
    "institution_name",
    "patient_id",
    "patient_sex",
    "patient_age_years",
    "patient_size_m",
    "patient_weight_kg",
)


# CTDIvol, area dose product, entrance dose (mGy and dGy), organ dose, exposure index,
# radiopharmaceutical information: an image header without any of these has nothing to say about
# dose, and is not parsed. An Exposure Dose Sequence is read in any object (dose screens are
# secondary captures of any modality); kVp counts for the modalities whose technique is an exposure.
_CTDIVOL = '"00189345"'
_HEADER_DOSE_TAGS = (_CTDIVOL, '"0018115E"', '"00408302"', '"00400302"', '"00400316"', '"00181411"', '"00540016"')
_EXPOSURE_DOSE_SEQUENCE = '"0040030E"'
_TECHNIQUE_MODALITIES = {"MG", "PX", "IO"}
_KVP = '"00180060"'
# What the cumulative agent keeps of each study of a patient.
_WINDOW_CONTEXT = ("kind", "accession_number", "study_description", "modality", "station_name", "institution_name")
_PATIENT_FIELDS = (
    "study_instance_uid",
    "study_date",
    "total_dlp_mGycm",
    "total_dap_Gym2",
    "dose_rp_total_mGy",
    "administered_activity_MBq",
    "standard_name",
    # A window's alert names its last study: what recipients are routed by and read (patient fields
    # come from the arriving study, the same patient). Kept few: the patient's state is one record.
    *_WINDOW_CONTEXT,
)
# Images whose every instance in a series repeats the series' dose values: parsed once per series.
_PER_SERIES = {"CT", "PT", "NM"}


class ReportNotInHeader(DoseExtractionError):
    """A dose report's content was left out of the event's header and its object could not be read."""


_CONTENT_SEQUENCE = "0040A730"


def content_omitted(instance: dict) -> bool:
    """True for an SR whose content tree, or part of it, is not in ``header_json`` (over the event's
    header budget, or an element the receiver could not decode: ``header_omitted``)."""
    if not instance["sop_class_uid"].startswith(_SR_CLASSES):
        return False
    return any(str(o.get("path", "")).split("/")[0] == _CONTENT_SEQUENCE for o in instance.get("header_omitted") or [])


def _whole_content_omitted(instance: dict) -> bool:
    """The ContentSequence itself left out (over the header budget), not an element inside it."""
    return any(str(o.get("path", "")) == _CONTENT_SEQUENCE for o in instance.get("header_omitted") or [])


def _is_dose_report(ds: Dataset) -> bool:
    """A dose report by its root concept (X-Ray or Radiopharmaceutical Radiation Dose Report, as
    sr.read_dose_report tells one), which the header keeps when the content tree is left out."""
    concept = Item(ds).concept
    return concept in C.XRAY_DOSE_REPORT or concept in C.RADIOPHARMACEUTICAL_DOSE_REPORT


def _gives_dose(record: dict) -> bool:
    """A record with an event or an accumulated value."""
    return bool(record.get("events")) or any(
        v not in (None, {}, []) for v in (record.get("accumulated") or {}).values()
    )


def dose_of(instance: dict, image_files: ImageFiles | None) -> tuple[dict, dict] | None:
    """(dose record, study context) of an instance, from its event's header; a dose report's from the
    stored object (the landing store's copy, else the archive's: ImageFiles) only when its content tree
    was left out of the header, or part of it was and the header gives no dose; when the object cannot
    be read then, from what the header holds (logged dose.report_from_header). DoseExtractionError when
    it cannot be read (ReportNotInHeader: no content in the header and the object is not to be found)."""
    header = dataset_from_header_json(instance["header_json"])
    if not content_omitted(instance) or not _is_dose_report(header):
        return extract_dose(header)  # a non-dose SR is not read from its object
    whole = _whole_content_omitted(instance)
    from_header: tuple[dict, dict] | None = None
    header_error: DoseExtractionError | None = None
    if not whole:
        try:
            from_header = extract_dose(header)
        except DoseExtractionError as exc:
            header_error = exc
        if from_header is not None and _gives_dose(from_header[0]):
            return from_header  # an element inside the tree left out: the dose values are in the header
    ds = image_files.read(instance) if image_files is not None else None
    if isinstance(ds, Dataset) and ds.get("SOPInstanceUID") == instance["sop_instance_uid"]:
        REPORTS_FROM_OBJECT.labels("read").inc()
        return extract_dose(ds)
    if not whole:
        REPORTS_FROM_OBJECT.labels("header").inc()
        log.warning(
            "dose.report_from_header",
            sop_instance_uid=instance["sop_instance_uid"],
            reason="part of the content tree left out of the header, object not readable: the header's content",
        )
        if header_error is not None:
            raise header_error
        return from_header
    REPORTS_FROM_OBJECT.labels("unread").inc()
    raise ReportNotInHeader(
        "dose report content over the event's header budget, and the object is in neither the landing"
        " store nor the archive readable here: replay it once it can be read (docs/DOSE.md)"
    )


async def metrics_page(web: Any, request: Any) -> Any:
    """Prometheus /metrics/ on the worker's web port ([dose] web_port). Prometheus's content type carries
    a charset, which aiohttp refuses in ``content_type`` (ValueError: every scrape a 500): it is given
    as the Content-Type header instead."""
    return web.bytes(generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def may_carry_dose(instance: dict) -> bool:
    header = instance.get("header_json")
    if not header:
        return False
    if instance["sop_class_uid"].startswith(_SR_CLASSES) or _EXPOSURE_DOSE_SEQUENCE in header:
        return True
    modality = instance.get("modality")
    if modality in _TECHNIQUE_MODALITIES and _KVP in header:
        return True
    return modality in _DOSE_MODALITIES and any(tag in header for tag in _HEADER_DOSE_TAGS)


def _series_done(state: dict | None, instance: dict) -> bool:
    """True when the study already has a dose report of this series' kind (a CT report for CT images,
    a radiopharmaceutical one for PET/NM images), or this series' header values (one per series)."""
    if not state or instance.get("modality") not in _PER_SERIES:
        return False
    if '"0040030E"' in (instance.get("header_json") or ""):
        return False
    reports = state["reports"].values()
    series = instance["series_instance_uid"]
    header = instance.get("header_json") or ""
    if instance.get("modality") == "CT":  # a cone-beam CT's images carry a DAP, not a CTDIvol: projection X-ray
        kind = "CT" if _CTDIVOL in header else "projection"
    else:
        kind = "NM"
    return any(r["source"] == "RDSR" and family(r["kind"]) == kind for r in reports) or any(
        r.get("series_instance_uid") == series or any(e.get("event_key") == f"series:{series}" for e in r["events"])
        for r in reports
    )


def _already_folded(state: dict | None, instance: dict) -> bool:
    """True when this very object (its SOP Instance UID) is already in the study's state: a redelivery."""
    if not state:
        return False
    sop = instance["sop_instance_uid"]
    return sop in state["reports"] or sop in state.get("sizes", {})


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _size_sample(instance: dict, every: int) -> bool:
    """Every ``every``-th CT image (by Instance Number) is measured for the water-equivalent diameter."""
    if every <= 0 or instance.get("modality") != "CT":
        return False
    number = instance.get("instance_number")
    return number is not None and (number - 1) % every == 0


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _fit(codec: Codec, schema: str, record: dict) -> dict:
    """Exactly the schema's fields: absent ones as None (all optional fields default to null)."""
    return {f.name: record.get(f.name, f.default if f.has_default else None) for f in codec.schema(schema).fields}


# DoseAlert's fields added in v3: an alert with both null is written with v2 (alert_bytes).
_V3_FIELDS = ("withdrawn_reason", "replaced_value")


def alert_bytes(codec: Codec, record: dict) -> bytes:
    """A DoseAlert's message: with the v2 schema unless it carries a v3 field (withdrawn_reason,
    replaced_value). A reader of the release before (the delivery worker, the OpenSearch sink) knows
    writers by fingerprint and cannot decode a v3 record at all: it logs it undecodable and commits
    past it, so the alert is never sent. Written so, every plain alert (and a withdrawal recorded
    before v3) still reaches it while the readers are upgraded (readers first, docs/DOSE.md)."""
    fitted = _fit(codec, DOSE_ALERTS.value_schema, record)
    plain = all(fitted[name] is None for name in _V3_FIELDS)
    return codec.encode(DOSE_ALERTS.value_schema, fitted, version=2 if plain else None)


def alerts_to_send(state: dict, alerts: list[dict], at_ms: int, resend: bool) -> tuple[list[tuple[dict, dict]], bool]:
    """The alerts to publish, each with its origin (the revision and raised_at it is sent with), and
    whether the state changed: the alerts not yet raised with their value, recorded in the state
    (``alerts``: the value; ``alert_origins``: the origin).

    With ``resend`` (the same object again: its outputs re-published as last published), only the
    alerts the state records as raised with this value, each with the origin it was first sent with, so
    the same record: those a crash may have lost. Never one the state does not record: in a replay
    (`diana replay diana-dose`) code or rules changed since would raise it about an old study, with the
    study's old raised_at, and recipients and dose_alert routing rules would get it as new.
    """
    raised = state.setdefault("alerts", {})
    origins = state.setdefault("alert_origins", {})
    out, changed = [], False
    for alert in alerts:
        alert_id = alert["alert_id"]
        if raised.get(alert_id) == alert["value"]:
            if not resend:
                continue  # already published with this value
            origin = origins.get(alert_id) or {"revision": state["revision"], "raised_at": at_ms}
        elif resend:
            continue  # not raised before, or with another value: not what was last published
        else:
            origin = {"revision": state["revision"], "raised_at": at_ms}
            raised[alert_id], origins[alert_id], changed = alert["value"], origin, True
        out.append((alert, origin))
    return out, changed


def withdrawals_to_send(
    state: dict, candidates: list[tuple[dict, str, str, float | None]], at_ms: int, resend: bool
) -> tuple[list[tuple[dict, dict]], bool]:
    """The withdrawals to publish, each with its origin, and whether the state changed. ``candidates``:
    alerts that no longer stand, each with what withdrew it (superseded_by), why (``superseded``: the
    image-header event it was raised from was superseded; ``under_limit``: a per-study value now at or
    under its limit) and the value that stands now (or None). One the study raised is withdrawn once:
    sent again with ``superseded_by``, ``withdrawn_reason`` and ``replaced_value`` set and recorded in
    the state (``withdrawn_alerts``: its origin and those three); with ``resend``, the recorded ones as
    first sent, and no new one (a replay of the same objects withdraws nothing it did not withdraw)."""
    raised = state.get("alerts", {})
    withdrawn = state.setdefault("withdrawn_alerts", {})
    out, changed = [], False
    for alert, superseded_by, reason, replaced_value in candidates:
        alert_id = alert["alert_id"]
        if alert_id not in raised:
            continue  # never raised (published), so nothing to withdraw
        origin = withdrawn.get(alert_id)
        if origin is None:
            if resend:
                continue  # as alerts_to_send: a replay sends nothing it did not send before
            origin = {"revision": state["revision"], "raised_at": at_ms, "superseded_by": superseded_by}
            origin.update(reason=reason, replaced_value=replaced_value)
            withdrawn[alert_id], changed = origin, True
        elif not resend:
            continue  # withdrawn already
        # A withdrawal recorded before v3 has no reason: re-sent without one (DoseAlert v2), so a replay
        # does not make it look new to alert delivery, which corrects only withdrawals that carry one.
        reason, replaced_value = origin.get("reason"), origin.get("replaced_value")
        record = {**alert, "value": raised[alert_id], "superseded_by": origin["superseded_by"]}
        record.update(withdrawn_reason=reason, replaced_value=replaced_value)
        if reason == "under_limit":
            record["message"] = withdrawal_note(origin["superseded_by"], reason, replaced_value)
        out.append((record, origin))
    return out, changed


def _ids_of(state: dict, alert_id: str) -> list[str]:
    """The ids an alert had: its own, then a new one after each withdrawal as under its limit (the study
    over the limit again, a later series, is a new alert, sent and delivered as one: the old id stays
    closed in every delivery ledger). Derived from the id, so the same in a replay."""
    withdrawn, ids = state.get("withdrawn_alerts", {}), [alert_id]
    while withdrawn.get(ids[-1], {}).get("reason") == "under_limit":
        ids.append(hashlib.sha1(f"{ids[-1]}\x1fraised again".encode()).hexdigest())
    return ids


def _raised_again(state: dict, alerts: list[dict]) -> list[dict]:
    """``alerts`` each with its current id (_ids_of)."""
    return [{**alert, "alert_id": _ids_of(state, alert["alert_id"])[-1]} for alert in alerts]


def _latest_object(state: dict) -> str:
    """The SOP Instance UID of the study's object that arrived last: the one whose arrival changed it."""
    return max(state["reports"].values(), key=lambda r: r["arrival"])["sop_instance_uid"]


def _reported_over(state: dict, superseded: list[dict]) -> int:
    """How many of the study's image-header events a dose report (RDSR) superseded."""
    reports = state["reports"]
    return sum(1 for e in superseded if reports.get(e["superseded_by"], {}).get("source") == "RDSR")


def study_alert_outputs(
    state: dict,
    rules: AlertRules,
    study: dict,
    events: list[dict],
    superseded: list[dict],
    at_ms: int,
    resend: bool,
) -> tuple[list[tuple[dict, dict]], bool]:
    """A study's alerts to publish (alerts_to_send), then its withdrawals: the alerts raised from the
    ``superseded`` image-header events (superseded_events) that the study no longer raises, and the
    per-study ones (a sum of a reference level, a DRL) whose value the study's dose events brought to or
    under the limit the alert was raised with (a corrected report's lower values, a duplicate series no
    longer counted).

    An alert is withdrawn under its limit only when (``basis``, recorded in its origin when raised, is
    the same now) the rule's limit and match patterns are unchanged (a rules or levels file changed
    since withdraws nothing: the value fell because of the rules, not the dose) and no more header
    events were superseded by a dose report since (the report may be the first of a continued exam,
    its second one yet to come: the dose worker does not know when a study is complete, so a sum that
    fell when a report replaced the images' estimates is left standing); and only when a comparison
    is made (a level no event matches any more, a DRL without a value, compares nothing)."""
    alerts = _raised_again(state, study_alerts(rules, study, events) + drl_alerts(study))
    out, changed = alerts_to_send(state, alerts, at_ms, resend)
    reported_over = _reported_over(state, superseded)
    sums = study_sums(rules, study, events)
    if not resend:
        basis = {_ids_of(state, a["alert_id"])[-1]: (rule_basis(rules, a), reported_over) for a, _ in sums}
        for alert, origin in out:  # raised now (or with a new value): what its comparison rests on
            if alert["alert_id"] in basis:
                origin["basis"] = list(basis[alert["alert_id"]])
    current = {a["alert_id"] for a in alerts}
    candidates = [
        (alert, event["superseded_by"], "superseded", report_value(rules, alert, study, events, event["superseded_by"]))
        for event in superseded
        for alert in event_alerts(rules, study, event)
        if alert["alert_id"] not in current
    ]
    if state["reports"]:
        latest, withdrawn = _latest_object(state), state.get("withdrawn_alerts", {})
        origins = state.get("alert_origins", {})
        for alert, compared in sums:
            ids = _ids_of(state, alert["alert_id"])
            for alert_id in ids:
                # A withdrawal recorded is re-sent under its own id (resend); a new one only for the
                # current id, under the conditions above.
                basis_then = (origins.get(alert_id) or {}).get("basis")
                fell = (
                    alert_id == ids[-1]
                    and compared
                    and alert["value"] <= alert["threshold"]
                    and basis_then == [rule_basis(rules, alert), reported_over]
                )
                if alert_id not in current and (alert_id in withdrawn or fell):
                    candidates.append(({**alert, "alert_id": alert_id}, latest, "under_limit", alert["value"]))
    withdrawals, withdrew = withdrawals_to_send(state, candidates, at_ms, resend)
    return out + withdrawals, changed or withdrew


_SOURCE_FIELDS = (
    "source",
    "kvp",
    "max_tube_current_mA",
    "tube_current_mA",
    "exposure_time_per_rotation_s",
    "exposure_time_s",
)


def event_record(study: dict, event: dict) -> dict:
    record = {**{k: study.get(k) for k in _CONTEXT}, **event}
    record["event_id"] = f"{study['study_instance_uid']}/{event['event_key']}"
    record["study_instance_uid"] = study["study_instance_uid"]
    record["received_at"] = _dt(event["received_at"])
    sources = event.get("xray_source_parameters")
    if sources:
        record["xray_source_parameters"] = [{k: s.get(k) for k in _SOURCE_FIELDS} for s in sources]
    return record


def register_dose(
    app: faust.App,
    rules: AlertRules,
    codec: Codec | None = None,
    image_files: ImageFiles | None = None,
    size_sample_every: int = 10,
    names: StandardNames | None = None,
    levels: ReferenceLevels | None = None,
) -> None:
    """The dose agents; ``image_files`` lets the worker read sampled CT images' pixels for SSDE (size.py)."""
    codec = codec or default_codec()
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(INSTANCES.name, **raw)
    by_patient = app.topic(DOSE_BY_PATIENT.name, **raw)
    events_out, studies_out = app.topic(DOSE_EVENTS.name, **raw), app.topic(DOSE_STUDIES.name, **raw)
    alerts_out, deadletter = app.topic(DOSE_ALERTS.name, **raw), app.topic(DEADLETTER.name, **raw)
    actions_out = app.topic(ALERT_ACTIONS.name, **raw)
    study_table = app.Table(TABLES[0], default=None, key_type=str)
    app.page("/metrics/")(metrics_page)
    patient_table = app.Table(TABLES[1], default=None, key_type=str)

    async def dead(message: Any, value: bytes, reason: str) -> None:
        origin = f"{message.topic}/{message.partition}/{message.offset}"
        log.warning("deadletter", origin=origin, reason=reason)
        await deadletter.send(
            key=origin.encode(), value=value, headers={"reason": f"dose: {reason}".encode(), "origin": origin.encode()}
        )

    async def publish_alerts(
        to_send: list[tuple[dict, dict]], study: dict, contexts: dict[str, dict] | None = None
    ) -> None:
        """Send what ``alerts_to_send`` (and ``withdrawals_to_send``) chose."""
        for alert, origin in to_send:
            # A patient's window alert is on the window's last study: its own header, not the arriving
            # one's (an entry stored before entries kept it has no kind: the arriving study's, as then).
            about = (contexts or {}).get(alert["study_instance_uid"]) or study
            about = {**study, **about} if "kind" in about else study
            record = {
                **{k: about.get(k) for k in _CONTEXT},
                "kind": about.get("kind"),
                **alert,
                "revision": origin["revision"],
                "raised_at": _dt(origin["raised_at"]),
            }
            log.info(
                "dose.alert",
                rule=alert["rule"],
                metric=alert["metric"],
                value=alert["value"],
                threshold=alert["threshold"],
                study_instance_uid=alert["study_instance_uid"],
                withdrawn=bool(alert.get("superseded_by")),
            )
            await alerts_out.send(
                key=alert["study_instance_uid"].encode(),
                value=alert_bytes(codec, record),
            )
            if alert.get("superseded_by"):
                # Its CLOSED action too: a delivery worker that was stopped reads dose.alert-actions
                # whole at its start, before the alert waiting on dose.alerts, and does not send it.
                action = withdrawal_action(
                    alert["alert_id"],
                    alert["superseded_by"],
                    record["raised_at"],
                    alert.get("withdrawn_reason"),
                    alert.get("replaced_value"),
                )
                await actions_out.send(
                    key=alert["alert_id"].encode(),
                    value=codec.encode(ALERT_ACTIONS.value_schema, _fit(codec, ALERT_ACTIONS.value_schema, action)),
                )

    @app.agent(source)
    async def dose(stream: faust.Stream) -> None:
        async for event in stream.events():
            message = event.message
            try:
                _, instance = codec.decode(event.value, expect=INSTANCES.value_schema)
            except DecodeError as exc:
                await dead(message, event.value, str(exc))
                continue
            sample = image_files is not None and _size_sample(instance, size_sample_every)
            carries = may_carry_dose(instance)
            if not (sample or carries):
                continue
            try:
                await handle(message, event.value, instance, sample, carries)
            except Exception as exc:  # one odd object must not stop the worker for every other
                # The type only: a message could quote a value of the report.
                log.error("dose.failed", error=type(exc).__name__, study_instance_uid=instance["study_instance_uid"])
                await dead(message, event.value, f"cannot be processed ({type(exc).__name__})")

    async def handle(message: Any, value: bytes, instance: dict, sample: bool, carries: bool) -> None:
        """Fold one object into its study and publish what changed."""
        uid = instance["study_instance_uid"]
        stored = study_table.get(uid)
        redelivered = _already_folded(stored, instance)
        fold_dose = carries and (redelivered or not _series_done(stored, instance))
        if not (sample or fold_dose):
            return  # a series already counted: nothing to fold (most CT images)
        # A copy: the table is stored to only once the study's outputs are sent (publish_study), so an
        # object that fails half-way (dead-lettered) leaves the study as it was, not half-folded.
        state, changed = copy.deepcopy(stored), False
        if sample:
            state, changed = _measure_size(state, instance, uid)
        if fold_dose:
            try:
                if content_omitted(instance):
                    # Read and walked off the event loop (~8 s for 1,000 events on a 2-core machine), which
                    # the worker's other partitions, commits and web page share.
                    extracted = await asyncio.get_running_loop().run_in_executor(None, dose_of, instance, image_files)
                else:
                    extracted = dose_of(instance, image_files)
            except DoseExtractionError as exc:
                if isinstance(exc, ReportNotInHeader):
                    log.warning(
                        "dose.report_unread",
                        study_instance_uid=uid,
                        sop_instance_uid=instance["sop_instance_uid"],
                        reason="content over the event's header budget, object not readable",
                    )
                await dead(message, value, str(exc))
                return
            if extracted is not None:
                report, context = extracted
                state = state or {**new_study(uid), "revision": 0}
                changed = fold_report(state, report, context, _ms(instance["received_at"])) or changed
        if state is not None and redelivered and not changed and state["reports"]:
            # The same object again: its outputs may never have reached the broker (module doc).
            await publish_study(uid, state, instance["received_at"], again=True)
            return
        if not changed or state is None:
            return  # nothing new: a series already counted, or an object without dose values
        if not state["reports"]:
            study_table[uid] = state  # a size sample before any dose value: kept for later
            return
        await publish_study(uid, state, instance["received_at"])

    def _measure_size(state: dict | None, instance: dict, uid: str) -> tuple[dict | None, bool]:
        """Fold one sampled CT image's water-equivalent diameter into the study state."""
        if state and instance["sop_instance_uid"] in state.get("sizes", {}):
            return state, False
        ds = image_files.read(instance) if image_files else None
        try:
            diameter = None if ds is None else image_water_equivalent_diameter_mm(ds)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            log.warning("dose.size_unreadable", reason=f"{type(exc).__name__}")
            diameter = None
        if diameter is None:
            return state, False
        state = state or {**new_study(uid), "revision": 0}
        made_by = ds.get("IrradiationEventUID") if ds is not None else None
        event_uid = made_by if isinstance(made_by, str) and made_by else None  # one event, not several
        return state, fold_size(
            state, instance["sop_instance_uid"], instance["series_instance_uid"], diameter, event_uid
        )

    async def publish_study(uid: str, state: dict, at: datetime, again: bool = False) -> None:
        """Publish the study's record, events and alerts; ``again``: re-send them as last published."""
        if again:
            # A state written before published_at was kept: the redelivered object's arrival.
            at = _dt(state.get("published_at", _ms(at)))
        else:
            state["revision"] += 1
            state["published_at"] = _ms(at)
        study, events = summarize(state)
        if names is not None:
            names.apply(study, events)
        if levels is not None:
            levels.apply(study, events)
        # Then the retractions of the image-header events a dose report superseded, on the same key
        # (the topic keeps them behind the events they retract), every time: a pure function of the state.
        superseded = superseded_events(state)
        for ev in [*events, *superseded]:
            await events_out.send(
                key=uid.encode(),
                value=codec.encode(
                    DOSE_EVENTS.value_schema, _fit(codec, DOSE_EVENTS.value_schema, event_record(study, ev))
                ),
            )
        study_value = codec.encode(
            DOSE_STUDIES.value_schema,
            _fit(codec, DOSE_STUDIES.value_schema, {**study, "revision": state["revision"], "received_at": at}),
        )
        await studies_out.send(key=uid.encode(), value=study_value)
        to_send, changed = study_alert_outputs(state, rules, study, events, superseded, _ms(at), again)
        await publish_alerts(to_send, study)
        if changed or not again:
            study_table[uid] = state
        log.info("dose.study", study_instance_uid=uid, kind=study.get("kind"), events=study["events"], again=again)
        if study.get("patient_id"):
            await by_patient.send(key=study["patient_id"].encode(), value=study_value)

    @app.agent(by_patient)
    async def cumulative(stream: faust.Stream) -> None:
        async for event in stream.events():
            try:
                _, study = codec.decode(event.value, expect=DOSE_STUDIES.value_schema)
            except DecodeError as exc:
                await dead(event.message, event.value, str(exc))
                continue
            patient = study["patient_id"]
            state = patient_table.get(patient) or {"studies": {}, "alerts": {}, "revision": 0}
            entry = {k: v for k, v in study.items() if k in _PATIENT_FIELDS}
            # The same study totals again (a redelivery, or the dose agent re-emitting): re-send the
            # patient's raised alerts as first sent, since they may never have reached the broker.
            again = state["studies"].get(study["study_instance_uid"]) == entry
            if not again:
                state["studies"][study["study_instance_uid"]] = entry
                state["revision"] += 1
            studies = list(state["studies"].values())
            alerts = cumulative_alerts(rules, studies, study) + repeat_alerts(rules, studies, study)
            contexts = {s["study_instance_uid"]: s for s in studies}
            to_send, changed = alerts_to_send(state, alerts, _ms(study["received_at"]), again)
            await publish_alerts(to_send, study, contexts=contexts)
            if changed or not again:
                patient_table[patient] = state
