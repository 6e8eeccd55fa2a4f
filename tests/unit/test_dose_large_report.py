"""A dose report whose content tree is over the event's header budget (a long fluoroscopy procedure:
1,000 events, 3.5 MB, 9 MB of DICOM JSON) arrives with its ContentSequence listed in header_omitted.
Before, the dose worker extracted nothing from it and said nothing. Now it reads the stored object
(the landing store's copy, else the archive's) and extracts the dose from it; when neither can be
read, the event is dead-lettered with its reason, logged and counted. No services."""

from __future__ import annotations

import asyncio
import json
from io import BytesIO
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from pydicom.uid import generate_uid

from diana.config import Config
from diana.producers.header import read_header
from diana.stream_apps.app import create_app
from diana.stream_apps.dose.agent import ReportNotInHeader, content_omitted, dose_of, metrics_page, register_dose
from diana.stream_apps.dose.alerts import AlertRules
from diana.stream_apps.dose.image_files import ImageFiles
from tests.support import dosebuilder as b

EVENTS = 40
BUDGET = 16 * 1024  # the events' JSON is over it: the content tree is left out, as at 1,000 events and 8 MB


def _report_and_instance(budget: int = BUDGET):
    events = [b.projection_event(f"1.2.3.{i}", dap="0.00001", dose_rp="0.5", fluoro=True) for i in range(EVENTS)]
    ds = b.dose_report(events, study_uid=generate_uid(), procedure=b.PROJECTION_PROCEDURE)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    header = read_header(buf.getvalue(), header_budget_bytes=budget)
    instance = {
        **header.fields,
        "sop_class_uid": header.sop_class_uid,
        "sop_instance_uid": header.sop_instance_uid,
        "study_instance_uid": header.study_instance_uid,
        "series_instance_uid": header.series_instance_uid,
        "landing_path": f"ab/{generate_uid()}.dcm",
    }
    return ds, instance


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("diana_dose_reports_from_object_total", {"outcome": outcome}) or 0.0


def test_a_report_over_the_header_budget_is_read_from_the_archived_object(tmp_path: Path):
    ds, instance = _report_and_instance()
    assert content_omitted(instance)  # what the receiver did: the tree is in the object only
    files = ImageFiles(tmp_path / "landing", tmp_path / "archive")
    archived = tmp_path / "archive" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    archived.parent.mkdir(parents=True)
    ds.save_as(archived, enforce_file_format=True)
    before = _count("read")
    report, context = dose_of(instance, files)
    assert report["source"] == "RDSR" and len(report["events"]) == EVENTS  # before: nothing
    assert context["study_instance_uid"] == ds.StudyInstanceUID and _count("read") == before + 1


def test_from_the_landing_copy_first(tmp_path: Path):
    ds, instance = _report_and_instance()
    landed = tmp_path / "landing" / instance["landing_path"]
    landed.parent.mkdir(parents=True)
    ds.save_as(landed, enforce_file_format=True)
    report, _ = dose_of(instance, ImageFiles(tmp_path / "landing", tmp_path / "archive"))
    assert len(report["events"]) == EVENTS


def test_an_object_that_cannot_be_read_is_dead_lettered_and_counted_not_ignored(tmp_path: Path):
    _, instance = _report_and_instance()
    before = _count("unread")
    with pytest.raises(ReportNotInHeader, match="over the event's header budget"):
        dose_of(instance, ImageFiles(tmp_path / "landing", tmp_path / "archive"))
    with pytest.raises(ReportNotInHeader):
        dose_of(instance, None)
    assert _count("unread") == before + 2


def test_another_object_under_the_name_is_not_read_as_the_report(tmp_path: Path):
    ds, instance = _report_and_instance()
    other, _ = _report_and_instance()
    landed = tmp_path / "landing" / instance["landing_path"]
    landed.parent.mkdir(parents=True)
    other.save_as(landed, enforce_file_format=True)
    with pytest.raises(ReportNotInHeader):
        dose_of(instance, ImageFiles(tmp_path / "landing", tmp_path / "archive"))


def test_a_report_within_the_budget_is_read_from_the_header_alone(tmp_path: Path):
    _, instance = _report_and_instance(budget=8 * 1024 * 1024)
    assert not content_omitted(instance)
    report, _ = dose_of(instance, None)
    assert len(report["events"]) == EVENTS


def test_the_dose_worker_serves_its_metrics_on_its_web_port(tmp_path: Path):
    app = create_app(Config(base_dir=tmp_path), app_id="diana-dose-test", web_port=6098)
    register_dose(app, AlertRules())  # registers /metrics/ (nothing listens until the worker starts)
    assert "/metrics/" in app.web.views
    # app.web is Faust's aiohttp driver, the one the page's View.bytes delegates to: before, aiohttp
    # refused prometheus's content type (it names a charset) and every scrape was a 500
    response = asyncio.run(metrics_page(app.web, None))
    assert response.status == 200
    assert b"diana_dose_reports_from_object_total" in response.body
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert response.content_type == "text/plain" and response.charset == "utf-8"


class _NoRead:
    def read(self, instance: dict) -> None:
        raise AssertionError("the object was read")


def test_one_undecodable_element_in_the_content_tree_is_extracted_from_the_header(tmp_path: Path):
    """Before, any path under the ContentSequence in header_omitted sent a report to its object: with
    S3 (or no shared folders) it was dead-lettered and its dose lost, though the header held it all."""
    _, instance = _report_and_instance(budget=8 * 1024 * 1024)
    instance = {
        **instance,
        "landing_uri": "s3://bucket/landing/ab/x.dcm",
        "header_omitted": [{"path": "0040A730/2/0040A160", "reason": "ValueError"}],  # header_model, one value
    }
    assert content_omitted(instance)
    report, _ = dose_of(instance, _NoRead())  # type: ignore[arg-type]
    assert report["source"] == "RDSR" and len(report["events"]) == EVENTS


def test_part_left_out_and_nothing_in_the_header_then_the_object_else_the_header(tmp_path: Path):
    ds, instance = _report_and_instance(budget=8 * 1024 * 1024)
    header = json.loads(instance["header_json"])
    header["0040A730"]["Value"] = header["0040A730"]["Value"][:1]  # no event left in the header's tree
    instance = {
        **instance,
        "header_json": json.dumps(header),
        "header_omitted": [{"path": "0040A730/3/0040A730", "reason": "ValueError"}],
    }
    assert dose_of(instance, None) is None or not dose_of(instance, None)[0]["events"]  # type: ignore[index]
    landed = tmp_path / "landing" / instance["landing_path"]
    landed.parent.mkdir(parents=True)
    ds.save_as(landed, enforce_file_format=True)
    report, _ = dose_of(instance, ImageFiles(tmp_path / "landing", tmp_path / "archive"))
    assert len(report["events"]) == EVENTS  # read from the object
    landed.unlink()
    before = _count("header")
    dose_of(instance, ImageFiles(tmp_path / "landing", tmp_path / "archive"))  # not dead-lettered
    assert _count("header") == before + 1


def test_a_non_dose_sr_is_not_read_from_its_object():
    _, instance = _report_and_instance()  # its content tree over the budget
    header = json.loads(instance["header_json"])
    header["0040A043"]["Value"][0]["00080100"]["Value"] = ["18748-4"]  # a diagnostic imaging report
    header["0040A043"]["Value"][0]["00080102"]["Value"] = ["LN"]
    instance = {**instance, "header_json": json.dumps(header)}
    assert dose_of(instance, _NoRead()) is None  # type: ignore[arg-type]
