"""Unit: archive placement, verification and idempotency on a plain filesystem (no broker)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from diana.config import ConflictPolicy
from diana.producers.landing import LandingStore
from diana.sinks.archive import ArchiveSink


def _event(stored, sop="1.2.3.4.5", v2: bool = False) -> dict:
    """An InstanceArrived as v4 writes it (landing_uri) or, ``v2``, as v1 to v3 did (landing_path)."""
    where = {"landing_path": stored.relative_path} if v2 else {"landing_uri": stored.uri}
    return {
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "sop_instance_uid": sop,
        "sha256": stored.sha256,
        **where,
    }


@pytest.fixture
def roots(tmp_path: Path):
    return LandingStore(tmp_path / "landing"), ArchiveSink(tmp_path / "landing", tmp_path / "archive")


@pytest.mark.parametrize("v2", [False, True], ids=["v4-uri", "v2-relative-path"])
def test_archive_moves_verified_bytes_and_is_idempotent(roots, v2):
    landing, sink = roots
    stored = landing.put(b"DICOM-BYTES" * 100)
    assert stored.uri == (landing.root / stored.relative_path).as_uri()
    event = _event(stored, v2=v2)
    assert sink.archive_one(event) == "written"
    target = sink.archive.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == stored.sha256
    assert not (landing.root / stored.relative_path).exists()
    # Re-delivery (landing copy gone) and re-send (landing copy back) are both no-ops.
    assert sink.archive_one(event) == "unchanged"
    landing.put(b"DICOM-BYTES" * 100)
    assert sink.archive_one(event) == "unchanged"
    assert not (landing.root / stored.relative_path).exists()


@pytest.mark.parametrize(
    "policy,kept,beside",
    [
        (ConflictPolicy.KEEP_FIRST, b"first", None),
        (ConflictPolicy.REPLACE, b"second", None),
        (ConflictPolicy.KEEP_BOTH, b"first", b"second"),
    ],
)
def test_same_uid_different_bytes_follows_the_policy_and_is_reported(tmp_path, policy, kept, beside):
    landing = LandingStore(tmp_path / "landing")
    reports = []
    sink = ArchiveSink(tmp_path / "landing", tmp_path / "archive", policy=policy, report=reports.append)
    first, second = landing.put(b"first"), landing.put(b"second")
    assert sink.archive_one(_event(first)) == "written"
    assert sink.archive_one(_event(second)) == "conflict"
    folder = sink.archive.root / "1.2.3" / "1.2.3.4"
    assert (folder / "1.2.3.4.5.dcm").read_bytes() == kept
    version = folder / f"1.2.3.4.5.{second.sha256[:12]}.dcm"
    assert (version.read_bytes() if version.exists() else None) == beside
    assert not any(landing.root.rglob("*.dcm"))  # handled: nothing left in landing
    assert [(r["policy"], r["archived_sha256"], r["incoming_sha256"]) for r in reports] == [
        (policy, first.sha256, second.sha256)
    ]
    # A replay of both events changes nothing and reports nothing new.
    assert sink.archive_one(_event(first)) in ("unchanged", "superseded")
    assert sink.archive_one(_event(second)) in ("unchanged", "superseded")
    assert (folder / "1.2.3.4.5.dcm").read_bytes() == kept and len(reports) == 1


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="KEEP_FIRST"):
        ArchiveSink(tmp_path / "l", tmp_path / "a", policy="keep")


def test_corrupt_landing_copy_and_hostile_paths_are_refused(roots):
    landing, sink = roots
    stored = landing.put(b"payload")
    (landing.root / stored.relative_path).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="does not match"):
        sink.archive_one(_event(stored))
    with pytest.raises(ValueError, match="invalid UID"):
        sink.archive_one(_event(stored, sop="../../x"))
    evil = dict(_event(stored, v2=True), landing_path="../../etc/passwd")
    with pytest.raises(ValueError, match="not a valid object key"):
        sink.archive_one(evil)
    # A URI outside this sink's landing store is refused: an event cannot make it read (and then
    # delete) any other file or object.
    for uri in ("file:///etc/passwd", f"{landing.root.parent.as_uri()}/archive/x.dcm", "s3://bucket/landing/ab/x.dcm"):
        with pytest.raises(ValueError, match="not in this landing store"):
            sink.archive_one(dict(_event(stored), landing_uri=uri))
    with pytest.raises(ValueError, match="names no landed object"):
        sink.archive_one({k: v for k, v in _event(stored).items() if k != "landing_uri"})
    assert not any(sink.archive.root.rglob("*.dcm"))
    assert Path("/etc/passwd").exists()


@pytest.mark.parametrize(
    "policy,quarantined",
    [(ConflictPolicy.KEEP_FIRST, b"second"), (ConflictPolicy.REPLACE, b"first"), (ConflictPolicy.KEEP_BOTH, None)],
)
def test_the_copy_not_kept_is_quarantined_after_the_report(tmp_path, policy, quarantined):
    landing = LandingStore(tmp_path / "landing")
    first, second = landing.put(b"first"), landing.put(b"second")
    seen_at_report: list[bool] = []

    def report(record: dict) -> None:
        # When the report is made, nothing has moved yet.
        seen_at_report.append((landing.root / second.relative_path).exists())
        reports.append(record)

    reports: list[dict] = []
    sink = ArchiveSink(
        tmp_path / "landing", tmp_path / "archive", policy=policy, report=report, quarantine=tmp_path / "q"
    )
    sink.archive_one(_event(first))
    assert sink.archive_one(_event(second)) == "conflict"
    assert seen_at_report == [True]
    files = {p.read_bytes(): p for p in (tmp_path / "q").rglob("*.dcm")}
    assert list(files) == ([quarantined] if quarantined else [])
    [record] = reports
    assert record["kept_sha256"] == (second.sha256 if policy == ConflictPolicy.REPLACE else first.sha256)
    if quarantined:
        assert files[quarantined] == tmp_path / "q" / record["quarantine_path"]
