"""Unit: archive placement, verification and idempotency on a plain filesystem (no broker)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from diana.producers.landing import LandingStore
from diana.sinks.archive import ArchiveSink


def _event(stored, sop="1.2.3.4.5") -> dict:
    return {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4", "sop_instance_uid": sop,
            "sha256": stored.sha256, "landing_path": stored.relative_path}


@pytest.fixture
def roots(tmp_path: Path):
    return LandingStore(tmp_path / "landing"), ArchiveSink(tmp_path / "landing", tmp_path / "archive")


def test_archive_moves_verified_bytes_and_is_idempotent(roots):
    landing, sink = roots
    stored = landing.put(b"DICOM-BYTES" * 100)
    event = _event(stored)
    assert sink.archive_one(event) == "written"
    target = sink.archive_root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == stored.sha256
    assert not (landing.root / stored.relative_path).exists()
    # Re-delivery (landing copy gone) and re-send (landing copy back) are both no-ops.
    assert sink.archive_one(event) == "unchanged"
    landing.put(b"DICOM-BYTES" * 100)
    assert sink.archive_one(event) == "unchanged"
    assert not (landing.root / stored.relative_path).exists()


def test_different_bytes_for_the_same_uid_keep_the_first(roots):
    landing, sink = roots
    first = landing.put(b"first")
    sink.archive_one(_event(first))
    second = landing.put(b"second")
    assert sink.archive_one(_event(second)) == "conflict"
    assert (sink.archive_root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm").read_bytes() == b"first"
    assert (landing.root / second.relative_path).exists()  # kept for inspection, not lost


def test_corrupt_landing_copy_and_hostile_paths_are_refused(roots):
    landing, sink = roots
    stored = landing.put(b"payload")
    (landing.root / stored.relative_path).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="does not match"):
        sink.archive_one(_event(stored))
    with pytest.raises(ValueError, match="invalid UID"):
        sink.archive_one(_event(stored, sop="../../x"))
    evil = dict(_event(stored), landing_path="../../etc/passwd")
    with pytest.raises(ValueError, match="leaves its root"):
        sink.archive_one(evil)
    assert not any(sink.archive_root.rglob("*.dcm"))
