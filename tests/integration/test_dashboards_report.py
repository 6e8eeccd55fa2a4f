"""Dashboards saved objects and the HTML report, checked against the live OpenSearch with test data.

Dashboards cannot run here, so each saved visualization is checked instead: its index pattern
resolves to a live alias, every field it uses exists in the live mapping with an aggregatable type,
and the aggregation it encodes returns non-empty buckets. The report is opened in headless Chromium.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from confluent_kafka import Producer
from opensearchpy import OpenSearch
from pydicom.uid import generate_uid

from diana.access.dashboards import aggregation_for, install, render_ndjson
from diana.schemas.topics import INSTANCES
from tests.support import dosebuilder as b
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.helpers import os_search, storescu, wait_until_caught_up
from tests.support.paths import REPO, TEST_HOME

# The committed saved-objects file, for sites that import it by hand (compose/README.md).
NDJSON_PATH = REPO / "compose" / "dashboards" / "diana-star.ndjson"

AGGREGATABLE = {"keyword", "long", "integer", "short", "double", "float", "date", "boolean"}
OBJECTS = [json.loads(line) for line in NDJSON_PATH.read_text().splitlines()]
VISUALIZATIONS = [o for o in OBJECTS if o["type"] == "visualization"]


def _wait(cfg, index: str, query: dict, timeout: float = 90) -> None:
    client = OpenSearch(hosts=[cfg.opensearch.url])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.indices.exists_alias(name=index) and os_search(cfg, index, query):
            return
        time.sleep(0.5)
    raise AssertionError(f"nothing in {index} for {query}")


@pytest.fixture(scope="module")
def live(pipeline, tmp_path_factory):
    """CT with a dose report, DX with DAP in the header, and a junk event: every index has data."""
    cfg = pipeline.cfg
    root = tmp_path_factory.mktemp("dash")
    ct = make_study(root / "ct", [SeriesSpec("CT", "ABDOMEN 5mm", 4, body_part="ABDOMEN")], patient_id="DASH-P1")
    dx = make_study(root / "dx", [SeriesSpec("DX", "CHEST PA", 2, body_part="CHEST")], patient_id="DASH-P2")
    for path in ct.files + dx.files:
        ds = pydicom.dcmread(path)
        ds.ProtocolName = "Abdomen routine" if ds.Modality == "CT" else "Chest PA"
        if ds.Modality == "DX":
            ds.StationName = "DXROOM1"
            ds.ImageAndFluoroscopyAreaDoseProduct = "1.5"
        ds.save_as(path)
    rdsr = b.save(
        b.ct_report(
            [b.ct_event(generate_uid(), ctdivol="18.5", dlp="790", protocol="Abdomen routine")],
            total_dlp="790",
            study_uid=ct.study_uid,
            patient_id="DASH-P1",
        ),
        root / "rdsr.dcm",
    )
    result = storescu(cfg, [*ct.files, rdsr, *dx.files], aet="DASHMODALITY")
    assert result.returncode == 0, result.stdout + result.stderr
    producer = Producer({"bootstrap.servers": cfg.kafka.bootstrap})
    producer.produce(INSTANCES.name, key=b"dashboard-junk", value=b"not an event")
    assert producer.flush(30) == 0
    wait_until_caught_up(cfg)
    _wait(cfg, "diana-dose-alerts", {"term": {"study_instance_uid": ct.study_uid}})
    _wait(cfg, "diana-deadletters", {"match_all": {}})
    _wait(cfg, "diana-series", {"exists": {"field": "verdict"}})
    _wait(cfg, "diana-dose-studies", {"term": {"kind": "DX"}})
    return OpenSearch(hosts=[cfg.opensearch.url])


def _query(dql: str) -> dict:
    """The DQL forms the saved objects use: field:value, joined by 'or'."""
    if not dql:
        return {"match_all": {}}
    terms = [part.strip().split(":", 1) for part in dql.split(" or ")]
    return {"bool": {"should": [{"term": {f: v}} for f, v in terms], "minimum_should_match": 1}}


def test_the_committed_ndjson_is_what_the_code_declares():
    assert NDJSON_PATH.read_text() == render_ndjson()
    dashboards = [o for o in OBJECTS if o["type"] == "dashboard"]
    assert {d["attributes"]["title"] for d in dashboards} == {
        "diana-star Operations",
        "diana-star Cohort discovery",
        "diana-star Dose monitoring",
    }
    ids = {o["id"] for o in OBJECTS}
    assert all(ref["id"] in ids for d in dashboards for ref in d["references"])


@pytest.mark.parametrize("vis", VISUALIZATIONS, ids=[v["id"] for v in VISUALIZATIONS])
def test_visualization_against_the_live_index(live, vis):
    [ref] = vis["references"]
    patterns = {o["id"]: o for o in OBJECTS if o["type"] == "index-pattern"}
    assert ref["id"] in patterns, "index pattern not in the saved objects"
    alias = patterns[ref["id"]]["attributes"]["title"]
    assert live.indices.exists_alias(name=alias), f"{alias} is not a live alias"
    state = json.loads(vis["attributes"]["visState"])
    fields = {a["params"]["field"] for a in state["aggs"] if a["params"].get("field")}
    fields.add(patterns[ref["id"]]["attributes"]["timeFieldName"])
    for field in fields:
        mapping = live.indices.get_field_mapping(index=alias, fields=field)
        types = {
            m["mappings"][field]["mapping"][field.split(".")[-1]]["type"]
            for m in mapping.values()
            if field in m["mappings"]
        }
        assert types and types <= AGGREGATABLE, f"{field}: {types or 'not in the mapping'}"
    source = json.loads(vis["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
    aggs = aggregation_for(state)
    result = live.search(index=alias, body={"size": 0, "query": _query(source["query"]["query"]), "aggs": aggs})
    top = result["aggregations"][next(iter(aggs))]["buckets"]
    assert top and all(bucket["doc_count"] > 0 for bucket in top)
    metric = next(a for a in state["aggs"] if a["schema"] == "metric")
    if metric["type"] != "count":

        def leaves(bucket):
            inner = [k for k in bucket if k.startswith("b")]
            return [bucket] if not inner else [leaf for b2 in bucket[inner[0]]["buckets"] for leaf in leaves(b2)]

        values = [leaf["m"]["value"] for bucket in top for leaf in leaves(bucket)]
        assert any(v not in (None, 0) for v in values), f"{metric['type']}({metric['params']['field']}) is empty"


def test_dashboards_install_posts_the_saved_objects():
    """Dashboards cannot run here: a local HTTP server stands in and records the import request."""
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen["path"], seen["xsrf"] = self.path, self.headers.get("osd-xsrf")
            seen["body"] = self.rfile.read(int(self.headers["Content-Length"]))
            reply = json.dumps({"success": True, "successCount": len(OBJECTS)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = install(f"http://127.0.0.1:{server.server_port}", render_ndjson())
    finally:
        server.shutdown()
    assert result["successCount"] == len(OBJECTS)
    assert seen["path"] == "/api/saved_objects/_import?overwrite=true" and seen["xsrf"] == "true"
    assert render_ndjson().encode() in seen["body"]


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def test_the_report_asks_in_the_widest_zones_opensearch_takes_and_refuses_a_wider_one_at_start(pipeline, tmp_path):
    """[report] time_zone: OpenSearch (Java's ZoneOffset) takes -18:00 to +18:00; +19:00 passed the start-up
    check before and the refused search ended in a traceback."""
    today = date.today()
    for zone, status in (("+18:00", 0), ("-18:00", 0), ("Pacific/Kiritimati", 0), ("+19:00", 2)):
        env = {"DIANA_CONFIG": str(pipeline.config_file), "PATH": "/usr/bin:/bin", "DIANA_REPORT_TIME_ZONE": zone}
        page = tmp_path / "zone.html"
        page.unlink(missing_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "diana.cli", "report", "--from", str(today - timedelta(days=2)), "--out", str(page)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=120,
        )
        assert "Traceback" not in result.stderr, result.stderr
        if status == 0:
            assert result.returncode == 0, (zone, result.stderr)
            assert f"midnight to midnight in {zone}" in page.read_text()
        else:
            assert result.returncode != 0 and "beyond +18:00" in result.stderr and not page.exists(), result.stderr


def test_html_report_renders_in_headless_chromium(live, pipeline, tmp_path):
    chromium = Path("/usr/bin/chromium")
    assert chromium.exists(), "Debian's chromium is not installed: ./test.sh installs it (scripts/bootstrap.sh)"
    page = tmp_path / "report.html"
    today = date.today()
    env = {"DIANA_CONFIG": str(pipeline.config_file), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "diana.cli",
            "report",
            "--from",
            str(today - timedelta(days=1)),
            "--to",
            str(today),
            "--out",
            str(page),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = page.read_text()
    assert "<script" not in text and "src=" not in text and "href=" not in text  # self-contained
    # the headline's instances are a value_count of SOP Instance UIDs, its studies a cardinality (exact here)
    assert re.search(r"<p>[1-9]\d* studies, [1-9]\d* instances, \d+\.\d\d GB\.", text), text[:2000]
    # The DRL survey (tests/support/data/dose-reference-levels.yaml): the CT study's 790 mGy·cm
    # against the national 700 of its standard name "CT Abdomen-Pelvis".
    assert "Reference levels: median per standard name" in text and "CT Abdomen-Pelvis" in text
    assert "Studies over their reference level" in text and "OVER" in text
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run(
        [str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for chart in ("instances-per-day", "ctdivol-by-protocol", "dlp-by-station"):
        start = dom.stdout.find(f'data-chart="{chart}"')
        assert start >= 0, f"chart {chart} missing"
        assert 'class="bar"' in dom.stdout[start : dom.stdout.find("</svg>", start)], f"chart {chart} has no bars"
    shot = TEST_HOME / "report-screenshot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(chromium),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1000,1800",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 20_000  # a blank page is a few kB
