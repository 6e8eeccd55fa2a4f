"""The landing store on a real S3 server (S3Proxy), end to end, and events written before v4.

The session pipeline's receiver and archive sink are swapped for ones with ``[storage] backend =
"s3"`` (same consumer group, same port): the receiver lands each object in the bucket under
``landing/<sha256[:2]>/<sha256>.dcm`` before it publishes, the event carries that ``s3://`` URI,
and the archive sink copies it server-side into ``archive/`` and removes it from ``landing/``.
Before the swap, an InstanceArrived v2 (host-relative ``landing_path``) is archived by the
filesystem sink; after it, another one by the S3 sink (it reads this host's landing folder).
"""

from __future__ import annotations

import hashlib
import io
import time
from datetime import UTC, datetime
from pathlib import Path

import avro.io
import avro.schema
import pydicom
import pytest
from confluent_kafka import Producer
from pydicom.uid import generate_uid

from diana.config import Config
from diana.operations.status import collect_status
from diana.producers.landing import LandingStore, open_landing
from diana.schemas.codec import MAGIC
from diana.schemas.topics import INSTANCES
from diana.sinks.archive import archive_relative_path
from diana.storage import ObjectStore, S3Store, open_store
from tests.support.dicomgen import make_instance, make_study
from tests.support.helpers import storescu, topic_records, wait_until_caught_up
from tests.support.paths import REPO, port
from tests.support.stack import wait_for_echo

S3 = {"DIANA_STORAGE_BACKEND": "s3"}


def _publish_v2_event(cfg: Config, tmp_path: Path) -> dict:
    """Land one instance in this host's landing folder and publish its event as a v2 receiver did."""
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="V2EVENT", study_date="20240605")
    path = tmp_path / "v2.dcm"
    ds.save_as(path, enforce_file_format=True)
    stored = LandingStore(cfg.path(cfg.storage.landing_dir)).put(path.read_bytes())
    event = {
        "sop_instance_uid": ds.SOPInstanceUID,
        "sop_class_uid": ds.SOPClassUID,
        "study_instance_uid": ds.StudyInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
        "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
        "size_bytes": stored.size,
        "sha256": stored.sha256,
        "landing_path": stored.relative_path,
        "received_at": datetime.now(UTC),
        "source": "C_STORE",
    }
    schema = avro.schema.parse((REPO / "schemas" / "instance_arrived.v2.avsc").read_text())
    full = {f.name: event.get(f.name, f.default if f.has_default else None) for f in schema.fields}
    buf = io.BytesIO()
    buf.write(MAGIC + schema.fingerprint("CRC-64-AVRO"))
    avro.io.DatumWriter(schema).write(full, avro.io.BinaryEncoder(buf))
    producer = Producer({"bootstrap.servers": cfg.kafka.bootstrap})
    producer.produce(INSTANCES.name, key=ds.StudyInstanceUID.encode(), value=buf.getvalue())
    assert producer.flush(30) == 0
    return event


def _wait_archived(archive: ObjectStore, key: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not archive.exists(key):
        assert time.monotonic() < deadline, f"{key} not archived within {timeout:.0f}s"
        time.sleep(0.5)


def _sha_of(archive: ObjectStore, key: str) -> str:
    with archive.open(key) as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def _assert_a_v2_event_is_archived(cfg, tmp_path) -> None:
    """An older event (a path relative to this host's landing folder, no URI) is archived from there."""
    event = _publish_v2_event(cfg, tmp_path)
    archive = open_store(cfg, "archive")
    _wait_archived(archive, archive_relative_path(event))
    assert _sha_of(archive, archive_relative_path(event)) == event["sha256"]
    wait_until_caught_up(cfg)
    assert not (cfg.path(cfg.storage.landing_dir) / event["landing_path"]).exists()


def test_a_v2_event_is_archived_from_the_landing_folder(pipeline, tmp_path):
    _assert_a_v2_event_is_archived(pipeline.cfg, tmp_path)


@pytest.fixture(scope="module")
def s3_landing(pipeline, s3proxy: Config):
    """The session pipeline with its receiver and archive sink on S3 for this module; back after."""
    pipeline.stop("receiver")
    pipeline.stop("archive-sink")
    pipeline.start("receiver-s3", "receive", settings=S3)
    pipeline.start("archive-sink-s3", "sink", "archive", settings=S3)
    wait_for_echo(s3proxy, timeout=60, procs=pipeline.procs)
    yield s3proxy
    pipeline.stop("receiver-s3")
    pipeline.stop("archive-sink-s3")
    pipeline.start("receiver", "receive")
    pipeline.start("archive-sink", "sink", "archive")
    wait_for_echo(pipeline.cfg, timeout=60, procs=pipeline.procs)


@pytest.fixture(scope="module")
def sent_study(pipeline, s3_landing, tmp_path_factory):
    study = make_study(tmp_path_factory.mktemp("s3-landing"), patient_id="S3LANDING")
    result = storescu(s3_landing, study.files)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(s3_landing)
    return study


def test_the_receiver_lands_on_s3_and_the_event_carries_the_s3_uri(s3_landing, sent_study):
    landing = open_store(s3_landing, "landing")
    assert isinstance(landing, S3Store)
    events = [
        e for _, e in topic_records(s3_landing, INSTANCES.name) if e["study_instance_uid"] == sent_study.study_uid
    ]
    assert len(events) == len(sent_study.files) == 40
    for event in events:
        key = f"{event['sha256'][:2]}/{event['sha256']}.dcm"
        assert event["landing_uri"] == f"s3://{landing.bucket}/landing/{key}"
        assert event["landing_path"] == key  # the key, for readers of versions before v4
        assert event["source"] == "C_STORE"


def test_the_archive_sink_copies_from_s3_landing_verified_and_empties_landing(s3_landing, sent_study):
    cfg = s3_landing
    archive, landing = open_store(cfg, "archive"), open_store(cfg, "landing")
    assert isinstance(archive, S3Store)
    events = [e for _, e in topic_records(cfg, INSTANCES.name) if e["study_instance_uid"] == sent_study.study_uid]
    for event in events:
        key = archive_relative_path(event)
        assert _sha_of(archive, key) == event["sha256"]
        # A server-side copy keeps the metadata the receiver recorded with its verified put.
        head = archive.client.head_object(Bucket=archive.bucket, Key=archive.prefix + key)
        assert head["Metadata"].get("sha256") == event["sha256"]
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sent_study.files}
    assert {e["sop_instance_uid"] for e in events} == sent
    # Landed objects are removed once archived; nothing landed in the local folder but scratch.
    assert [k for k in landing.list() if k.endswith(".dcm")] == []
    local = cfg.path(cfg.storage.landing_dir)
    assert not [p for p in local.rglob("*.dcm") if ".incoming" not in p.parts]


def test_a_resend_lands_the_same_key_again_and_duplicates_nothing(s3_landing, sent_study):
    cfg = s3_landing
    result = storescu(cfg, sent_study.files[:5])
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(cfg)
    archive, landing = open_store(cfg, "archive"), open_store(cfg, "landing")
    assert len([k for k in archive.list(f"{sent_study.study_uid}/") if k.endswith(".dcm")]) == 40
    assert [k for k in landing.list() if k.endswith(".dcm")] == []


def test_status_counts_what_waits_in_the_s3_landing_store(s3_landing, tmp_path):
    cfg = s3_landing
    landing = open_landing(cfg)
    before = collect_status(cfg).landing_objects
    stored = landing.put(b"not archived: no event points to it " + tmp_path.name.encode())
    try:
        assert stored.uri.startswith("s3://")
        assert collect_status(cfg).landing_objects == before + 1
    finally:
        open_store(cfg, "landing").delete(stored.relative_path)


def test_a_v2_event_is_archived_by_the_s3_sink_from_this_hosts_landing_folder(s3_landing, tmp_path):
    _assert_a_v2_event_is_archived(s3_landing, tmp_path)


def test_an_object_landed_on_s3_without_an_event_is_republished(pipeline, s3_landing, tmp_path):
    """As after a crash between the put and the publish (on any host): the outbox step of a receiver
    lists the bucket's landing/, republishes the object, and the archive sink archives it."""
    cfg = s3_landing
    number = port(11210)
    settings = {
        **S3,
        "DIANA_RECEIVER_PORT": str(number),
        "DIANA_RECEIVER_METRICS_PORT": "0",
        "DIANA_RECEIVER_RECONCILE_INTERVAL_S": "2",
        "DIANA_RECEIVER_RECONCILE_AFTER_S": "1",
    }
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="S3LEFTBEHIND", study_date="20240611")
    path = tmp_path / "left.dcm"
    ds.save_as(path, enforce_file_format=True)
    stored = open_landing(cfg).put(path.read_bytes())
    pipeline.start("receiver-s3-reconcile", "receive", settings=settings)
    try:
        archive = open_store(cfg, "archive")
        key = archive_relative_path(
            {
                "study_instance_uid": ds.StudyInstanceUID,
                "series_instance_uid": ds.SeriesInstanceUID,
                "sop_instance_uid": ds.SOPInstanceUID,
            }
        )
        _wait_archived(archive, key, timeout=120)
        assert _sha_of(archive, key) == stored.sha256
        wait_until_caught_up(cfg)
        assert not open_store(cfg, "landing").exists(stored.relative_path)
        log = pipeline.log_text("receiver-s3-reconcile")
        assert "recover.done" in log or "reconcile.republished" in log
    finally:
        pipeline.stop("receiver-s3-reconcile")
