"""End to end on the real stack: dcmtk storescu → receiver → Kafka → Faust → archive + OpenSearch.

Run twice: with the archive on the filesystem and on S3 (S3Proxy; the session's archive sink is
swapped for one writing there). The archive is read back through the store either way.
"""

from __future__ import annotations

import hashlib
import io
import time

import pydicom
import pytest

from diana.schemas.topics import INSTANCES, SERIES, STUDIES
from diana.sinks.archive import archive_relative_path
from diana.storage import ObjectStore, S3Store, open_store
from tests.support.dicomgen import make_study
from tests.support.helpers import dataset_body, os_search, storescu, topic_records, wait_until_caught_up


@pytest.fixture(scope="module", params=["filesystem", "s3"])
def archive(request, pipeline) -> ObjectStore:
    """The archive the pipeline writes to: the session's folder, or S3 with the archive sink swapped."""
    cfg = pipeline.cfg if request.param == "filesystem" else request.getfixturevalue("s3_archive_sink")
    return open_store(cfg, "archive")


@pytest.fixture(scope="module")
def sent_study(pipeline, archive, tmp_path_factory):
    study = make_study(tmp_path_factory.mktemp("study"))
    result = storescu(pipeline.cfg, study.files)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(pipeline.cfg)
    return study


def _archive_files(archive: ObjectStore, study_uid: str) -> list[str]:
    return sorted(key for key in archive.list(f"{study_uid}/") if key.endswith(".dcm"))


def _archived_bytes(archive: ObjectStore, key: str) -> bytes:
    with archive.open(key) as stream:
        return stream.read()


def test_every_instance_is_archived_byte_identical(pipeline, archive, sent_study, tmp_path):
    cfg = pipeline.cfg
    archived = _archive_files(archive, sent_study.study_uid)
    assert len(archived) == len(sent_study.files) == 40
    by_sop = {}
    for path in sent_study.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_sop[ds.SOPInstanceUID] = (path, ds)
    for path, ds in by_sop.values():
        key = archive_relative_path(
            {
                "study_instance_uid": ds.StudyInstanceUID,
                "series_instance_uid": ds.SeriesInstanceUID,
                "sop_instance_uid": ds.SOPInstanceUID,
            }
        )
        assert archive.exists(key), f"{ds.SOPInstanceUID} not archived"
        target = tmp_path / "archived.dcm"
        target.write_bytes(_archived_bytes(archive, key))
        # The data set bytes are those sent, unchanged; the file meta is the receiver's own.
        assert dataset_body(target) == dataset_body(path)
        archived_meta = pydicom.dcmread(io.BytesIO(target.read_bytes()), stop_before_pixels=True).file_meta
        assert archived_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # Nothing is left behind in the landing store once archived.
    assert not list(cfg.path(cfg.storage.landing_dir).rglob("*.dcm"))
    if isinstance(archive, S3Store):  # and the S3 run's objects are on S3 only
        assert not (cfg.path(cfg.storage.archive_dir) / sent_study.study_uid).exists()


def test_topic_holds_one_decodable_event_per_instance(pipeline, archive, sent_study):
    events = [
        (k, e)
        for k, e in topic_records(pipeline.cfg, INSTANCES.name)
        if e["study_instance_uid"] == sent_study.study_uid
    ]
    assert len(events) == 40
    assert len({e["sop_instance_uid"] for _, e in events}) == 40
    for key, event in events:
        assert key == sent_study.study_uid.encode()  # all of a study in one partition
        assert event["patient_id"] == sent_study.patient_id
        assert event["study_date"] == "2024-03-15"
        assert event["modality"] == "CT"
        assert event["calling_ae"] == "STORESCU"
        archived = _archived_bytes(archive, archive_relative_path(event))
        assert hashlib.sha256(archived).hexdigest() == event["sha256"]
        assert archive.size(archive_relative_path(event)) == len(archived) == event["size_bytes"]


def test_opensearch_has_one_document_per_instance_series_and_study(pipeline, sent_study):
    cfg = pipeline.cfg
    study_q = {"term": {"study_instance_uid": sent_study.study_uid}}
    instances = os_search(cfg, "diana-instances", study_q)
    assert len(instances) == 40
    assert {d["_id"] for d in instances} == {d["sop_instance_uid"] for d in instances}
    assert all(
        d["patient_id"] == sent_study.patient_id and d["study_date"] == "2024-03-15" and d["modality"] == "CT"
        for d in instances
    )

    series = os_search(cfg, "diana-series", study_q)
    assert {d["_id"]: (d["series_description"], d["instance_count"], d["modality"]) for d in series} == {
        uid: (s["description"], s["count"], s["modality"]) for uid, s in sent_study.series.items()
    }
    studies = os_search(cfg, "diana-studies", {"ids": {"values": [sent_study.study_uid]}})
    assert len(studies) == 1
    study = studies[0]
    assert (study["instance_count"], study["series_count"], study["modalities"]) == (40, 3, ["CT"])
    assert study["patient_id"] == sent_study.patient_id and study["study_date"] == "2024-03-15"

    # The same counts travel on the aggregate topics (latest revision per key).
    latest_series = {}
    for key, rec in topic_records(cfg, SERIES.name):
        if rec["study_instance_uid"] == sent_study.study_uid:
            if rec["revision"] >= latest_series.get(key, {"revision": -1})["revision"]:
                latest_series[key] = rec
    assert sorted(r["instance_count"] for r in latest_series.values()) == [8, 12, 20]
    study_revisions = [r for k, r in topic_records(cfg, STUDIES.name) if k == sent_study.study_uid.encode()]
    assert max(r["instance_count"] for r in study_revisions) == 40


def test_sending_the_same_study_again_duplicates_nothing(pipeline, archive, sent_study):
    cfg = pipeline.cfg
    study_q = {"term": {"study_instance_uid": sent_study.study_uid}}
    # Wait for the series to complete first (quiet time), so that nothing changes them but the re-send.
    deadline = time.monotonic() + 90
    while True:
        before_series = {d["_id"]: d for d in os_search(cfg, "diana-series", study_q)}
        if len(before_series) == 3 and all(d["status"] == "COMPLETED" for d in before_series.values()):
            break
        assert time.monotonic() < deadline, "series did not complete"
        time.sleep(0.5)
    result = storescu(cfg, sent_study.files)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(cfg)

    events = [e for _, e in topic_records(cfg, INSTANCES.name) if e["study_instance_uid"] == sent_study.study_uid]
    assert len(events) == 80  # the log records every arrival ...
    assert len(_archive_files(archive, sent_study.study_uid)) == 40  # ... the archive holds each object once
    assert not list(cfg.path(cfg.storage.landing_dir).rglob("*.dcm"))
    assert len(os_search(cfg, "diana-instances", study_q)) == 40
    after_series = {d["_id"]: d for d in os_search(cfg, "diana-series", study_q)}

    def summary(docs):  # a re-sent instance must not count, nor amend a completed series
        return {k: (v["instance_count"], v["revision"], v["status"], v["version"]) for k, v in docs.items()}

    assert summary(after_series) == summary(before_series)
    study = os_search(cfg, "diana-studies", {"ids": {"values": [sent_study.study_uid]}})
    assert len(study) == 1 and study[0]["instance_count"] == 40 and study[0]["series_count"] == 3
