"""`diana report`: every range and per-day histogram is asked in the site's zone ([report] time_zone, else
this host's), so a day runs from the site's midnight, not UTC's; the page names the zone.

OpenSearch is a recording stand-in answering nothing; the report on the real index is in
tests/integration/test_dashboards_report.py.
"""

from __future__ import annotations

import json
import time
from datetime import date
from pathlib import Path

import pytest
from opensearchpy.exceptions import AuthenticationException, RequestError

import diana.clients
from diana.access.report import build_report, host_time_zone
from diana.cli import main
from diana.config import ConfigError, load_config


class RecordingOpenSearch:
    """Every alias exists, every search finds nothing; ``bodies`` holds what was asked."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.indices = self

    def exists_alias(self, name: str) -> bool:
        return True

    def search(self, index: str, body: dict) -> dict:
        self.bodies.append(body)
        return {}


def _dated_parts(node, found: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Every range on a date field and every date_histogram in a body."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "date_histogram":
                found.append((key, value))
            elif key == "range":
                found += [(key, bounds) for field, bounds in value.items() if field.endswith("_at")]
            _dated_parts(value, found)
    elif isinstance(node, list):
        for item in node:
            _dated_parts(item, found)
    return found


def test_every_range_and_day_of_the_report_is_in_the_site_zone():
    client = RecordingOpenSearch()
    page = build_report(client, "diana", date(2024, 3, 1), date(2024, 3, 31), time_zone="Europe/Zurich")
    dated = [part for body in client.bodies for part in _dated_parts(body, [])]
    assert {kind for kind, _ in dated} == {"range", "date_histogram"}
    assert all(part.get("time_zone") == "Europe/Zurich" for _, part in dated), json.dumps(dated)
    assert "midnight to midnight in Europe/Zurich" in page


def test_the_host_zone_is_its_iana_name_else_its_utc_offset(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    assert host_time_zone() == "America/New_York"
    monkeypatch.setenv("TZ", "EST+5")  # a POSIX rule: no name OpenSearch knows
    time.tzset()  # the C library's local time, which the offset is read from, follows TZ only when told
    try:
        assert host_time_zone() == "-05:00"
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("zone", ["Europe/Zurich", "+05:30", ""])
def test_the_setting_takes_a_zone_name_or_an_offset(zone):
    assert load_config(None, environ={"DIANA_REPORT_TIME_ZONE": zone}).report.time_zone == zone


def test_an_unknown_zone_is_refused_at_start_up():
    with pytest.raises(ConfigError, match=r"\[report\] time_zone = 'Mars/Olympus': no such zone; use an IANA name"):
        load_config(None, environ={"DIANA_REPORT_TIME_ZONE": "Mars/Olympus"})


@pytest.mark.parametrize("offset", ["+19:00", "+23:59", "-18:30"])
def test_an_offset_opensearch_refuses_is_refused_at_start_up(offset):
    # Java's ZoneOffset, which reads OpenSearch's time_zone, takes -18:00 to +18:00; Python up to 23:59.
    with pytest.raises(ConfigError, match=rf"time_zone = '\{offset}': beyond [+-]18:00, .* from -18:00 to \+18:00"):
        load_config(None, environ={"DIANA_REPORT_TIME_ZONE": offset})


@pytest.mark.parametrize("offset", ["+18:00", "-18:00", "-09:30"])
def test_an_offset_within_18_hours_is_taken(offset):
    assert load_config(None, environ={"DIANA_REPORT_TIME_ZONE": offset}).report.time_zone == offset


class RefusingOpenSearch(RecordingOpenSearch):
    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def search(self, index: str, body: dict) -> dict:
        raise self.error


def _report(tmp_path: Path, monkeypatch, client) -> int:
    config = tmp_path / "diana.toml"
    config.write_text('[opensearch]\nurl = "http://127.0.0.1:2"\n[report]\ntime_zone = "Asia/Tokyo"\n')
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: client)
    return main(["--config", str(config), "report", "--to", "2024-03-02", "--out", str(tmp_path / "r.html")])


def test_a_refused_search_is_one_line_naming_the_zone_not_a_traceback(tmp_path: Path, monkeypatch, capsys):
    refusal = RequestError(
        400,
        "x_content_parse_exception",
        {"error": {"root_cause": [{"reason": "[1:80] [range] failed to parse field [time_zone]"}]}},
    )
    assert _report(tmp_path, monkeypatch, RefusingOpenSearch(refusal)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(
        "diana report: OpenSearch refused the search (400 x_content_parse_exception: [1:80] [range] failed to "
        "parse field [time_zone]); the days were asked in Asia/Tokyo ([report] time_zone"
    )
    assert 'set [report] time_zone to an IANA name such as "Europe/Zurich"' in err
    assert not (tmp_path / "r.html").exists()


def test_a_missing_index_is_said_as_such_not_as_a_zone_to_fix(tmp_path: Path, monkeypatch, capsys):
    from opensearchpy.exceptions import NotFoundError

    missing = NotFoundError(404, "index_not_found_exception", {"error": {"reason": "no such index [diana-instances]"}})
    assert _report(tmp_path, monkeypatch, RefusingOpenSearch(missing)) == 1
    err = capsys.readouterr().err
    assert "nothing indexed yet?" in err and "time_zone" not in err and len(err.strip().splitlines()) == 1


def test_refused_credentials_are_said_as_every_command_says_them(tmp_path: Path, monkeypatch, capsys, config):
    refusal = AuthenticationException(401, "security_exception", {})
    assert _report(tmp_path, monkeypatch, RefusingOpenSearch(refusal)) == 1
    assert "refused the credentials (HTTP 401): [opensearch] username" in capsys.readouterr().err
    # cohort's refusal goes the same way (it said "refused the search (401 ...); narrow the filters")
    assert main(["--config", str(config), "cohort", "find"]) == 1
    assert "refused the credentials (HTTP 401): [opensearch] username" in capsys.readouterr().err


def test_the_command_asks_in_the_configured_zone_and_names_it(tmp_path: Path, monkeypatch, capsys):
    config = tmp_path / "diana.toml"
    config.write_text('[opensearch]\nurl = "http://127.0.0.1:2"\n[report]\ntime_zone = "Asia/Tokyo"\n')
    client = RecordingOpenSearch()
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: client)
    out = tmp_path / "r.html"
    argv = ["--config", str(config), "report", "--from", "2024-03-01", "--to", "2024-03-02", "--out", str(out)]
    assert main(argv) == 0
    assert "(Asia/Tokyo days)" in capsys.readouterr().out
    assert "midnight to midnight in Asia/Tokyo" in out.read_text()
    assert all(part.get("time_zone") == "Asia/Tokyo" for body in client.bodies for _, part in _dated_parts(body, []))
