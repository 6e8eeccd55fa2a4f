"""What the dose worker's web port answers (Faust's aiohttp server, on [dose] web_port): its Prometheus
/metrics/ and nothing that reads its tables. Before, Faust's /table endpoints (web_tables_enabled, on by
default in faust-streaming) served the tables without authentication: GET /table/dose-patients/<PatientID>/
answered that patient's dose history; /router (web_router_enabled) told which worker holds a key.
The server is Faust's own web application, served on an ephemeral port of 127.0.0.1 (no Kafka)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from diana.config import Config
from diana.stream_apps.app import create_app
from diana.stream_apps.dose.agent import register_dose
from diana.stream_apps.dose.alerts import AlertRules


def _answers(tmp_path: Path, paths: list[str]) -> dict[str, tuple[int, str]]:
    app = create_app(Config(base_dir=tmp_path), app_id="diana-dose-test", web_port=6097)
    register_dose(app, AlertRules())
    app.web.init_server()  # what the worker does before it listens: the blueprints, then our pages

    async def get_all() -> dict[str, tuple[int, str]]:
        async with TestClient(TestServer(app.web.web_app)) as client:
            answers = {}
            for path in paths:
                response = await client.get(path)
                answers[path] = (response.status, await response.text())
            return answers

    return asyncio.run(get_all())


def test_the_dose_worker_serves_metrics_and_no_table(tmp_path: Path) -> None:
    answers = _answers(
        tmp_path, ["/metrics/", "/table/", "/table/dose-patients/", "/table/dose-patients/P-77/", "/router/"]
    )
    status, body = answers["/metrics/"]
    assert status == 200 and "diana_dose_reports_from_object_total" in body
    for path in ("/table/", "/table/dose-patients/", "/table/dose-patients/P-77/", "/router/"):
        assert answers[path][0] == 404, (path, answers[path])
