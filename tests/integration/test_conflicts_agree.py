"""On the real stack: a corrected re-send (same SOP Instance UID, changed PatientName) under each
archive conflict policy leaves the archive, the index, the aggregates and export describing the
same kept version, and the copy not kept in quarantine."""

from __future__ import annotations

import hashlib

import pytest
from pydicom.uid import generate_uid

from diana.access.export import export_instances
from diana.schemas.codec import DecodeError, default_codec
from diana.schemas.topics import ARCHIVE_CONFLICTS, INSTANCES
from tests.support.dicomgen import make_instance
from tests.support.helpers import os_search, read_messages, storescu, wait_until_caught_up

POLICY_SETTING = "DIANA_SINKS_ARCHIVE_CONFLICT_POLICY"
# The processes that apply the policy.
APPLY_POLICY = {
    "aggregates": ("aggregate",),
    "archive-sink": ("sink", "archive"),
    "opensearch-sink": ("sink", "opensearch"),
}


def _restart(pipeline, policy: str | None) -> None:
    settings = {POLICY_SETTING: policy} if policy else None
    for name, args in APPLY_POLICY.items():
        pipeline.stop(name)
        pipeline.start(name, *args, settings=settings)


def _records(cfg, topic: str, sop: str) -> list[dict]:
    """The records of ``topic`` about ``sop``; other tests' junk messages on the topic are passed over."""
    codec = default_codec()
    out = []
    for msg in read_messages(cfg, topic):
        try:
            record = codec.decode(msg.value())[1]
        except DecodeError:
            continue
        if record["sop_instance_uid"] == sop:
            out.append(record)
    return out


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("policy", ["KEEP_FIRST", "REPLACE", "KEEP_BOTH"])
def test_corrected_resend_leaves_archive_index_aggregates_and_export_in_agreement(pipeline, tmp_path, policy):
    cfg = pipeline.cfg
    _restart(pipeline, policy)
    try:
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        names = ["Doe^Jane", "Doe^Janet"]  # the re-send corrects the name
        paths = []
        for number, name in enumerate(names):
            ds = make_instance(study, series, 1, patient_id="CONFLICT1", study_date="20240609", sop_uid=sop)
            ds.PatientName = name
            paths.append(tmp_path / f"v{number}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        for path in paths:
            result = storescu(cfg, [path])
            assert result.returncode == 0, result.stdout + result.stderr
            wait_until_caught_up(cfg, timeout=180)

        events = _records(cfg, INSTANCES.name, sop)
        assert [e["patient_name"] for e in events] == names and events[0]["sha256"] != events[1]["sha256"]
        kept, dropped = (events[1], events[0]) if policy == "REPLACE" else (events[0], events[1])

        archive = cfg.path(cfg.storage.archive_dir)
        archived = archive / study / series / f"{sop}.dcm"
        assert _sha(archived) == kept["sha256"]
        [doc] = os_search(cfg, "diana-instances", {"term": {"sop_instance_uid": sop}})
        assert (doc["sha256"], doc["patient_name"]) == (kept["sha256"], kept["patient_name"])
        [study_doc] = os_search(cfg, "diana-studies", {"term": {"study_instance_uid": study}})
        assert study_doc["patient_name"] == kept["patient_name"]
        assert (study_doc["instance_count"], study_doc["total_bytes"]) == (1, kept["size_bytes"])
        [series_doc] = os_search(cfg, "diana-series", {"term": {"series_instance_uid": series}})
        assert (series_doc["instance_count"], series_doc["total_bytes"]) == (1, kept["size_bytes"])
        summary = export_instances([doc], archive, tmp_path / "export")
        assert (summary.exported, summary.hash_mismatch, summary.missing) == (1, [], [])

        [report] = _records(cfg, ARCHIVE_CONFLICTS.name, sop)
        assert (report["policy"], report["kept_sha256"]) == (policy, kept["sha256"])
        quarantine = cfg.path(cfg.storage.quarantine_dir)
        quarantined = sorted(quarantine.rglob(f"{sop}.*.dcm"))
        if policy == "KEEP_BOTH":
            assert quarantined == []
            assert _sha(archive / report["version_path"]) == dropped["sha256"]  # kept beside, as a version
        else:
            assert [_sha(p) for p in quarantined] == [dropped["sha256"]]
            assert quarantined[0] == quarantine / report["quarantine_path"]
        assert not list(cfg.path(cfg.storage.landing_dir).glob(f"*/{dropped['sha256']}.dcm"))
    finally:
        _restart(pipeline, None)
