"""Image-header dose events a dose report superseded stop counting: the dose worker retracts them on
dose.events (``superseded_by``) and the OpenSearch sink deletes their documents. No services."""

from __future__ import annotations

import json

from confluent_kafka import Message
from pydicom.uid import generate_uid

from diana.schemas.codec import default_codec
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import DOSE_EVENTS
from diana.sinks.opensearch import OpenSearchSink
from diana.stream_apps.dose.agent import _fit, event_record
from diana.stream_apps.dose.study import fold_report, new_study, summarize, superseded_events
from tests.support import dosebuilder as b
from tests.support import doseimages as img
from tests.unit.test_dose_families import extracted


def _study_of_images_then_a_ct_report() -> tuple[dict, dict, dict]:
    """A PET/CT study: a CT image and a PET image (header events), then the CT dose report."""
    study = generate_uid()
    state = new_study(study)
    ct_image = img.water_phantom_ct(study, generate_uid(), 1, radius_mm=5, hu_inside=0, size=16)
    pet_image = img.radiopharmaceutical(study, pet=True, activity="370000000", series_uid=generate_uid())
    for at, ds in enumerate((ct_image, pet_image)):
        fold_report(state, *extracted(ds), at)
    before = summarize(state)
    report = b.ct_report(
        [b.ct_event_with("8.1", ctdivol="5", dlp="200", sources=[b.ct_source("A", "120", "200", "250", "0.5")])],
        total_dlp="200",
        study_uid=study,
    )
    fold_report(state, *extracted(report), 2)
    return state, before[0], {"sop": report.SOPInstanceUID, "ct_series": ct_image.SeriesInstanceUID}


def test_a_ct_report_retracts_the_ct_image_events_it_supersedes_and_not_the_pet_activity():
    state, before, names = _study_of_images_then_a_ct_report()
    assert before["events"] == 2  # the CT image's event and the PET administration were published
    _, events = summarize(state)
    (retracted,) = superseded_events(state)
    assert retracted["event_key"] == f"series:{names['ct_series']}"
    assert retracted["superseded_by"] == names["sop"] and retracted["kind"] == "CT"
    kept = {e["event_key"] for e in events}
    assert retracted["event_key"] not in kept and "8.1" in kept and any(e["kind"] == "NM" for e in events)
    assert superseded_events(state) == [retracted]  # the same again: a replay retracts the same events


def test_a_study_without_a_dose_report_retracts_nothing():
    study = generate_uid()
    state = new_study(study)
    fold_report(state, *extracted(img.water_phantom_ct(study, generate_uid(), 1, radius_mm=5, hu_inside=0, size=16)), 0)
    assert superseded_events(state) == []


def _message(record: dict, offset: int) -> Message:
    value = default_codec().encode(DOSE_EVENTS.value_schema, _fit(default_codec(), DOSE_EVENTS.value_schema, record))
    return Message(topic=DOSE_EVENTS.name, partition=0, offset=offset, value=value)


def test_the_sink_deletes_a_retracted_event_indexed_before_in_the_same_batch_or_not():
    state, _, names = _study_of_images_then_a_ct_report()
    study, events = summarize(state)
    (retracted,) = superseded_events(state)
    published = {**retracted}
    published.pop("superseded_by")  # as the image's event was first sent
    batch = [_message(event_record(study, published), 1)]
    batch += [_message(event_record(study, e), 2 + i) for i, e in enumerate(events)]
    batch.append(_message(event_record(study, retracted), 9))
    sink = OpenSearchSink(None, IndexLayout("diana"), index_version=3)
    (request,) = sink.prepare(batch).requests
    lines = [json.loads(line) for line in request.body.splitlines()]
    actions = [(op, meta["_id"]) for line in lines for op, meta in line.items() if isinstance(meta, dict)]
    event_id = f"{study['study_instance_uid']}/{retracted['event_key']}"
    # One action per document: the retraction in the event's place (the latest of an id wins); a delete
    # has no document line.
    assert actions == [("delete", event_id)] + [
        ("index", f"{study['study_instance_uid']}/{e['event_key']}") for e in events
    ]
    assert len(lines) == 2 * len(events) + 1


class _Client:
    def __init__(self, statuses: list[int]):
        self.statuses = statuses

    def bulk(self, body, filter_path=None, params=None):
        return {
            "items": [
                {"delete" if b'"delete"' in line else "index": {"status": s}}
                for s, line in zip(self.statuses, body.splitlines(), strict=False)
            ]
        }


class _Dead:
    def __init__(self):
        self.sent = []

    def send(self, msg, reason):
        self.sent.append(reason)


def test_a_retraction_of_a_document_never_indexed_is_done_not_dead_lettered():
    state, _, _ = _study_of_images_then_a_ct_report()
    study, _ = summarize(state)
    (retracted,) = superseded_events(state)
    sink = OpenSearchSink(_Client([404]), IndexLayout("diana"), index_version=3)
    dead = _Dead()
    sink.write([_message(event_record(study, retracted), 1)], dead)
    assert dead.sent == []
