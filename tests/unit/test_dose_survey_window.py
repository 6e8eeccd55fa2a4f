"""The dose survey's window (`diana dose drl`, `diana dose names --days`, the report's reference-level
section) is exactly N days ending on --as-of, else on today in the site's zone ([report] time_zone, else
the host's; the report's: on its --to), not on the host's local date; the same --as-of asks the same
window whenever it is run. `dose names --days` without --as-of has no upper bound (future dates show).

OpenSearch is a recording stand-in answering nothing.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from opensearchpy.exceptions import RequestError

import diana.clients
from diana.access.site_zone import SiteZone
from diana.cli import main

LEVELS = """
window_days: 180
minimum_studies: 3
reference_levels:
  CT Head:
    study: {metric: total_dlp_mGycm, national: 970, local: 850}
"""


class RecordingOpenSearch:
    """Every alias exists, every search (and scan) finds nothing; ``bodies`` holds what was asked."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.indices = self

    def exists_alias(self, name: str) -> bool:
        return True

    def search(self, index: str, body: dict, **_) -> dict:
        self.bodies.append(body)
        return {"aggregations": {"text": {"buckets": []}}}


def _study_dates(client: RecordingOpenSearch) -> list[dict]:
    """Every range on study_date the searches asked."""

    def walk(node) -> list[dict]:
        if isinstance(node, dict):
            here = [node["range"]["study_date"]] if "study_date" in node.get("range", {}) else []
            return here + [r for value in node.values() for r in walk(value)]
        return [r for item in node for r in walk(item)] if isinstance(node, list) else []

    return walk(client.bodies)


@pytest.fixture
def run(tmp_path: Path, monkeypatch):
    """``run(zone, *argv)``: the command with [report] time_zone = zone; (exit status, client)."""
    (tmp_path / "levels.yaml").write_text(LEVELS)

    def run(zone: str, *argv: str) -> tuple[int, RecordingOpenSearch]:
        config = tmp_path / "diana.toml"
        config.write_text(
            f'[opensearch]\nurl = "http://127.0.0.1:2"\n[dose]\nreference_levels = "levels.yaml"\n'
            f'[report]\ntime_zone = "{zone}"\n'
        )
        client = RecordingOpenSearch()
        monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: client)
        return main(["--config", str(config), *argv]), client

    return run


def test_drl_as_of_sets_the_window_whatever_the_clock(run, capsys):
    status, client = run("Europe/Zurich", "dose", "drl", "--as-of", "2024-03-15")
    assert status == 0
    # "the 180 days to 2024-03-15": 180 dates, 2024-03-15 the last (2023-09-17 made them 181)
    assert _study_dates(client) == [{"gte": "2023-09-18", "lte": "2024-03-15"}]
    assert "Median per standard name over the 180 days to 2024-03-15" in capsys.readouterr().out


def test_drl_today_is_the_date_in_the_site_zone(run, capsys):
    # 25 hours apart: never the same date
    windows = {}
    for zone in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):
        before = datetime.now(ZoneInfo(zone)).date()
        status, client = run(zone, "dose", "drl")
        after = datetime.now(ZoneInfo(zone)).date()
        assert status == 0
        [window] = _study_dates(client)
        assert window["lte"] in (before.isoformat(), after.isoformat())
        windows[zone] = window["lte"]
    assert windows["Pacific/Kiritimati"] > windows["Pacific/Pago_Pago"]


def test_names_as_of_ends_the_days_window(run, capsys):
    status, client = run("Europe/Zurich", "dose", "names", "--days", "7", "--as-of", "2024-03-15")
    assert status == 0 and "has a standard name" in capsys.readouterr().out
    assert _study_dates(client) == [{"gte": "2024-03-09", "lte": "2024-03-15"}] * 2  # events and studies: 7 dates
    status, client = run("Europe/Zurich", "dose", "names", "--days", "1", "--as-of", "2024-03-15")
    assert _study_dates(client) == [{"gte": "2024-03-15", "lte": "2024-03-15"}] * 2  # one day: that day


def test_names_days_without_as_of_lists_studies_dated_in_the_future(run, capsys):
    # A modality whose clock is wrong dates its studies after today: the unmapped list is where that shows.
    before = datetime.now(ZoneInfo("Europe/Zurich")).date()
    status, client = run("Europe/Zurich", "dose", "names", "--days", "7")
    after = datetime.now(ZoneInfo("Europe/Zurich")).date()
    assert status == 0
    starts = {(day - timedelta(days=6)).isoformat() for day in (before, after)}
    assert len(_study_dates(client)) == 2 and all(
        window.keys() == {"gte"} and window["gte"] in starts for window in _study_dates(client)
    )
    status, client = run("Europe/Zurich", "dose", "names")
    assert status == 0 and _study_dates(client) == []  # no --days: every study, as before


def test_names_as_of_without_days_is_a_usage_error(run, capsys):
    with pytest.raises(SystemExit) as stop:
        run("Europe/Zurich", "dose", "names", "--as-of", "2024-03-15")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: diana dose names") and "--as-of ends the --days window: add --days N" in err


def test_the_report_survey_ends_on_its_as_of(run, tmp_path: Path, capsys):
    out = tmp_path / "r.html"
    status, client = run("Asia/Tokyo", "report", "--to", "2024-03-02", "--as-of", "2024-03-15", "--out", str(out))
    assert status == 0 and "report 2024-02-01 to 2024-03-02 (Asia/Tokyo days)" in capsys.readouterr().out
    assert _study_dates(client) == [{"gte": "2023-09-18", "lte": "2024-03-15"}]
    assert "Reference levels: median per standard name, the 180 days to 2024-03-15" in out.read_text()


def test_the_report_survey_ends_on_its_to_day_by_default(run, tmp_path: Path, capsys):
    out = tmp_path / "r.html"
    status, client = run("Asia/Tokyo", "report", "--from", "2024-02-01", "--to", "2024-03-02", "--out", str(out))
    assert status == 0
    assert _study_dates(client) == [{"gte": "2023-09-05", "lte": "2024-03-02"}]
    assert "Reference levels: median per standard name, the 180 days to 2024-03-02" in out.read_text()


def test_a_malformed_as_of_is_a_usage_error(run, capsys):
    with pytest.raises(SystemExit) as stop:
        run("Europe/Zurich", "dose", "drl", "--as-of", "2024-13-01")
    assert stop.value.code == 2
    assert "argument --as-of: invalid YYYY-MM-DD date value: '2024-13-01'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("zone", "today"),
    [("Asia/Tokyo", date(2024, 3, 2)), ("America/New_York", date(2024, 3, 1)), ("+14:00", date(2024, 3, 2))],
)
def test_today_is_the_date_in_the_zone(zone, today):
    assert SiteZone(zone).today(now=datetime(2024, 3, 1, 20, 0, tzinfo=UTC)) == today


class BucketsLeftOut(RecordingOpenSearch):
    """One unmapped protocol listed; the terms aggregations say what they left out."""

    def search(self, index: str, body: dict, **_) -> dict:
        station = {"buckets": [{"key": "CT_EAST", "doc_count": 4}], "sum_other_doc_count": 3}
        kind = {"buckets": [{"key": "CT", "doc_count": 7, "station": station}], "sum_other_doc_count": 2}
        text = {"buckets": [{"key": "Head", "doc_count": 9, "kind": kind}], "sum_other_doc_count": 120}
        return {"aggregations": {"text": text}}


def test_dose_names_says_what_its_lists_left_out(config, monkeypatch, capsys):
    """500 texts, 10 kinds, 50 stations: what lay beyond them was dropped without a word."""
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: BucketsLeftOut())
    assert main(["--config", str(config), "dose", "names"]) == 0
    out = capsys.readouterr().out
    assert "Not listed: 120 dose events of protocols beyond the 500 most frequent." in out
    assert "Not listed: 2 dose events of kinds beyond the 10 most frequent of their protocol." in out
    assert "Not listed: 3 dose events of stations beyond the 50 most frequent of their protocol and kind." in out
    assert "Not listed: 120 dose studies of study_descriptions beyond the 500 most frequent." in out


class Refusing(RecordingOpenSearch):
    def search(self, index: str, body: dict, **_) -> dict:
        raise RequestError(
            400, "search_phase_execution_exception", {"error": {"root_cause": [{"reason": "too many buckets"}]}}
        )


@pytest.mark.parametrize(("command", "fix"), [("names", "narrow the window with --days"), ("drl", "nothing compared")])
def test_a_refused_dose_search_is_one_line_not_a_traceback(run, monkeypatch, capsys, command, fix):
    """Any TransportError but a connection's ended `dose names` and `dose drl` in a traceback."""
    monkeypatch.setattr(RecordingOpenSearch, "search", Refusing.search)
    status, _ = run("UTC", "dose", command, "--as-of", "2024-03-15", *(["--days", "30"] if command == "names" else []))
    assert status == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"diana dose {command}: OpenSearch refused the search "
        f"(400 search_phase_execution_exception: too many buckets); {fix}"
    )


def test_a_drl_scroll_that_shards_failed_part_way_is_one_line(run, monkeypatch, capsys):
    """helpers.scan raises ScanError, not a TransportError, when shards fail mid-scroll: a traceback."""
    from opensearchpy.helpers import ScanError

    import diana.access.dose_survey as dose_survey

    def failing(*args, **kwargs):
        raise ScanError("scroll-1", "Scroll request has only succeeded on 1 (skipped 0) shards out of 3.")

    monkeypatch.setattr(dose_survey, "reference_level_survey", failing)
    status, _ = run("UTC", "dose", "drl", "--as-of", "2024-03-15")
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("diana dose drl: OpenSearch did not finish the search (") and "nothing compared" in err
    assert "Traceback" not in err
