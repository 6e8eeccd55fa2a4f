"""Objects real devices send, over the real network: stored, archived, indexed, never refused.

An element that cannot be decoded, and headers of any size (a 1.3 MB dose report, a 25 MB RT
Structure Set, a 200 MB enhanced multi-frame object), and what the broker refuses for good.
"""

from __future__ import annotations

import hashlib
import time
import urllib.request
from pathlib import Path

from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from pydicom.uid import generate_uid

from diana.producers.scp import STATUS
from diana.schemas.codec import DecodeError, default_codec
from diana.schemas.topics import INSTANCES
from tests.support.dicomgen import (
    make_instance,
    write_enhanced_multiframe,
    write_large_rdsr,
    write_misfit_length_instance,
    write_rt_structure_set,
)
from tests.support.helpers import (
    RawStoreSender,
    dataset_body,
    os_search,
    read_messages,
    stored_sha256,
    storescu,
    wait_until_caught_up,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _archived(cfg, study: str, series: str, sop: str) -> Path:
    return cfg.path(cfg.storage.archive_dir) / study / series / f"{sop}.dcm"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _indexed(cfg, sop: str) -> dict:
    [doc] = os_search(cfg, "diana-instances", {"term": {"sop_instance_uid": sop}})
    return doc


def _events_of(cfg, sops: set[str]) -> dict[str, tuple[int, dict]]:
    """The dicom.instances events of these instances: (message size, record)."""
    codec = default_codec()
    out = {}
    for msg in read_messages(cfg, INSTANCES.name):
        try:
            _, record = codec.decode(msg.value())
        except DecodeError:
            continue  # other tests' junk messages
        if record["sop_instance_uid"] in sops:
            out[record["sop_instance_uid"]] = (len(msg.value()), record)
    return out


def test_element_whose_length_does_not_fit_its_vr_is_stored_archived_byte_for_byte_and_indexed(pipeline, tmp_path):
    cfg = pipeline.cfg
    path = tmp_path / "misfit.dcm"
    ds = write_misfit_length_instance(path)
    body = dataset_body(path)
    assert b"\x28\x00\x06\x01US\x03\x00" in body  # the misfit element travels as the device wrote it

    sender = RawStoreSender(cfg, aet="MISFIT")
    try:
        status = sender.send(ds.SOPInstanceUID, body)
    finally:
        sender.close()

    assert status == STATUS.SUCCESS
    wait_until_caught_up(cfg)
    archived = _archived(cfg, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert _sha256(archived) == stored_sha256(CT, ds.SOPInstanceUID, EXPLICIT_LE, body)
    assert archived.read_bytes().endswith(body)
    doc = _indexed(cfg, ds.SOPInstanceUID)
    assert doc["header_omitted"] == [
        {"path": "00280106", "reason": "undecodable: a value of 3 bytes does not fit VR US"}
    ]
    assert "00280106" not in doc["dicom"]
    assert doc["dicom"]["00280100"] == {"vr": "US", "Value": [16]}  # every other element is there
    assert doc["patient_id"] == "MISFIT1" and doc["modality"] == "CT"
    # Searchable by what was left out
    hits = os_search(cfg, "diana-instances", {"term": {"header_omitted.path": "00280106"}})
    assert ds.SOPInstanceUID in {h["sop_instance_uid"] for h in hits}


def test_large_headers_are_archived_and_indexed_and_the_dose_report_read(pipeline, tmp_path):
    cfg = pipeline.cfg
    rdsr_path = tmp_path / "rdsr.dcm"
    rdsr, rdsr_size = write_large_rdsr(rdsr_path, events=900)
    rt_uid, rt_size = write_rt_structure_set(tmp_path / "rtstruct.dcm", points=1_000_000)
    mf_uid, mf_size = write_enhanced_multiframe(tmp_path / "enhanced.dcm", frames=400)
    print(f"sizes: RDSR {rdsr_size} B, RT Structure Set {rt_size} B, enhanced multi-frame {mf_size} B")
    assert rdsr_size > 1_250_000 and rt_size > 25_000_000 and mf_size > 200_000_000

    started = time.monotonic()
    result = storescu(
        cfg, [rdsr_path, tmp_path / "rtstruct.dcm", tmp_path / "enhanced.dcm"], extra=["-v"], aet="BIGHEADERS"
    )
    print(f"storescu: {time.monotonic() - started:.1f} s")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and output.count("Received Store Response (Success)") == 3, output

    wait_until_caught_up(cfg, timeout=300)
    events = _events_of(cfg, {rdsr.SOPInstanceUID, rt_uid, mf_uid})
    assert set(events) == {rdsr.SOPInstanceUID, rt_uid, mf_uid}
    for sop, (size, record) in events.items():
        print(f"{sop}: event {size} B, header {len(record['header_json'] or '')} B, omitted {record['header_omitted']}")
        assert size < cfg.kafka.max_message_bytes
        archived = _archived(cfg, record["study_instance_uid"], record["series_instance_uid"], sop)
        assert _sha256(archived) == record["sha256"]
        doc = _indexed(cfg, sop)
        assert doc["sha256"] == record["sha256"]

    # The dose report's header fits whole: nothing left out, every irradiation event read.
    assert not events[rdsr.SOPInstanceUID][1]["header_omitted"]
    # The contour sequence is referenced (left to the archived object), the rest of the header indexed.
    rt_omitted = events[rt_uid][1]["header_omitted"]
    assert [o["path"] for o in rt_omitted] == ["30060039"] and rt_omitted[0]["reason"].startswith("too large")
    rt_doc = _indexed(cfg, rt_uid)
    assert rt_doc["modality"] == "RTSTRUCT" and "30060020" in rt_doc["dicom"]
    # The per-frame functional groups of 400 frames fit, pixel data referenced.
    mf_doc = _indexed(cfg, mf_uid)
    assert mf_doc["number_of_frames"] == 400 and len(mf_doc["dicom"]["52009230"]["Value"]) == 400
    assert "BulkDataURI" in mf_doc["dicom"]["7FE00010"]

    by_study = {"term": {"study_instance_uid": rdsr.StudyInstanceUID}}
    deadline = time.monotonic() + 180
    dose_events: list[dict] = []
    while time.monotonic() < deadline:
        dose_events = os_search(cfg, "diana-dose-events", by_study, size=2000)
        if len(dose_events) >= 900:
            break
        time.sleep(2)
    assert len(dose_events) == 900
    [study] = os_search(cfg, "diana-dose-studies", by_study)
    assert study["events"] == 900


def _metric(cfg, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{cfg.receiver.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _set_topic_limit(cfg, value: str) -> None:
    admin = AdminClient({"bootstrap.servers": cfg.kafka.bootstrap})
    entry = ConfigEntry("max.message.bytes", value, incremental_operation=AlterConfigOpType.SET)
    for future in admin.incremental_alter_configs(
        [ConfigResource("TOPIC", INSTANCES.name, incremental_configs=[entry])]
    ).values():
        future.result()


def test_an_event_the_broker_refuses_for_good_gets_a_final_status_a_log_line_and_a_metric(pipeline, tmp_path):
    cfg = pipeline.cfg
    wait_until_caught_up(cfg)
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="REFUSED1", study_date="20240604")
    path = tmp_path / "refused.dcm"
    ds.save_as(path, enforce_file_format=True)
    body = dataset_body(path)
    landing = cfg.path(cfg.storage.landing_dir)
    before_landing = {p.name for p in landing.rglob("*.dcm")}
    refused_before = _metric(cfg, "diana_publish_refused_total")

    _set_topic_limit(cfg, "100")  # the broker now refuses every event as too large
    try:
        time.sleep(2)  # the broker applies topic configuration asynchronously
        sender = RawStoreSender(cfg, aet="REFUSED")
        try:
            status = sender.send(ds.SOPInstanceUID, body)
        finally:
            sender.close()
    finally:
        _set_topic_limit(cfg, str(cfg.kafka.max_message_bytes))

    assert status == STATUS.EVENT_REFUSED  # a final failure: the sender does not retry for ever
    assert _metric(cfg, "diana_publish_refused_total") == refused_before + 1
    assert "broker refuses the event for good" in pipeline.log_text("receiver")
    assert {p.name for p in landing.rglob("*.dcm")} == before_landing  # nothing left that no event points to

    time.sleep(2)
    sender = RawStoreSender(cfg, aet="REFUSED")
    try:
        assert sender.send(ds.SOPInstanceUID, body) == STATUS.SUCCESS  # the limit restored, accepted again
    finally:
        sender.close()


def test_a_broker_with_a_smaller_limit_still_gets_the_object_without_its_header(pipeline, tmp_path):
    """Our limit says the event fits, the broker's says not: the event goes again without the header."""
    cfg = pipeline.cfg
    wait_until_caught_up(cfg)
    rdsr_path = tmp_path / "rdsr.dcm"
    rdsr, _ = write_large_rdsr(rdsr_path, events=300, patient_id="SMALLBROKER1")
    _set_topic_limit(cfg, "8000")  # the header compresses to far more; the event without it to ~1 kB
    try:
        time.sleep(2)
        result = storescu(cfg, [rdsr_path], extra=["-v"], aet="SMALLBROKER")
    finally:
        _set_topic_limit(cfg, str(cfg.kafka.max_message_bytes))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Received Store Response (Success)" in output, output
    wait_until_caught_up(cfg)
    [(_, record)] = _events_of(cfg, {rdsr.SOPInstanceUID}).values()
    assert record["header_json"] is None
    assert record["header_omitted"] == [
        {"path": "", "reason": "the broker refused the event with its header (MSG_SIZE_TOO_LARGE)"}
    ]
    archived = _archived(cfg, rdsr.StudyInstanceUID, rdsr.SeriesInstanceUID, rdsr.SOPInstanceUID)
    assert _sha256(archived) == record["sha256"]
    assert _indexed(cfg, rdsr.SOPInstanceUID)["patient_id"] == "SMALLBROKER1"
