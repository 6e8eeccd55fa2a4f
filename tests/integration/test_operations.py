"""Operations: Prometheus metrics of the running services, and logs that never name a patient."""

from __future__ import annotations

import re
import urllib.request

from diana.producers.scp import STATUS
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.helpers import RawStoreSender, storescu, wait_until_caught_up


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if m := re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line):
            values[m.group(1)] = float(m.group(2))
    return values


def test_receiver_and_sink_metrics_count_what_happened(pipeline, tmp_path):
    cfg = pipeline.cfg
    before = _metrics(cfg.receiver.metrics_port)
    stream_before = _metrics(cfg.stream.web_port)
    study = make_study(tmp_path / "m", [SeriesSpec("CT", "METRICS", 5)], patient_id="METRICS1")
    assert storescu(cfg, study.files).returncode == 0
    wait_until_caught_up(cfg)
    after = _metrics(cfg.receiver.metrics_port)
    assert after["diana_instances_received_total"] - before.get("diana_instances_received_total", 0) == 5
    stored = sum(p.stat().st_size for p in (cfg.path(cfg.storage.archive_dir) / study.study_uid).rglob("*.dcm"))
    assert after["diana_received_bytes_total"] - before.get("diana_received_bytes_total", 0) == stored
    assert after["diana_publish_latency_seconds_count"] - before.get("diana_publish_latency_seconds_count", 0) == 5
    assert after["diana_associations_open"] == 0

    sender = RawStoreSender(cfg)
    try:
        assert sender.send("1.2.3.4", b"\x08\x00\x16\x00UI\xff\x7f1.2") == STATUS.CANNOT_UNDERSTAND
    finally:
        sender.close()
    key = 'diana_instances_rejected_total{reason="undecodable"}'
    assert _metrics(cfg.receiver.metrics_port)[key] - before.get(key, 0) == 1
    archive = _metrics(cfg.sinks.archive_metrics_port)
    assert archive["diana_archive_written_total"] >= 5
    indexed = _metrics(cfg.sinks.opensearch_metrics_port)
    assert indexed['diana_opensearch_indexed_total{index="diana-instances"}'] >= 5
    # The aggregates worker: the five instances went through committed transactions.
    key = 'diana_stream_messages_total{topic="dicom.instances"}'
    stream = _metrics(cfg.stream.web_port)
    assert stream[key] - stream_before.get(key, 0) >= 5
    assert stream['diana_stream_transactions_total{outcome="committed"}'] >= 1


def test_logs_never_name_a_patient(pipeline):
    # Every study the suite sends is for "Test^Patient" (tests/dicomgen.py).
    for name in pipeline.procs:
        text = pipeline.log_text(name)
        assert "Test^Patient" not in text and "Test Patient" not in text, name
