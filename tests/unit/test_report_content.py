"""`diana report`: what the page shows, over a stand-in OpenSearch answering canned hits and aggregations.

What the real index answers to these bodies is checked in tests/integration/test_dashboards_report.py.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest

import diana.access.report as report
from diana.access.report import build_report
from diana.stream_apps.dose.reference_levels import load_reference_levels

ACCESSION = "ACC20240301X"
OVER_LEVEL = {
    "study_date": "2024-03-01",
    "station_name": "CT_EAST",
    "standard_name": "CT head",
    "drl_metric": "total_dlp_mGycm",
    "drl_value": 1500.0,
    "drl_level": 1000.0,
    "drl_source": "local",
    "over_drl": True,
    "accession_number": ACCESSION,
}
ALERT = {
    "raised_at": "2024-03-01T10:00:00+00:00",
    "rule": "dlp-high",
    "metric": "total_dlp_mGycm",
    "value": 2100.0,
    "threshold": 2000.0,
    "study_date": "2024-03-01",
    "station_name": "CT_WEST",
    "protocol": "Head routine",
    "accession_number": "ACC20240301Y",
}


class CannedOpenSearch:
    """Every alias exists; a search of the dose studies over their level or of the alerts finds one hit,
    an aggregation the canned answer of its index (else nothing)."""

    def __init__(self, aggregations: dict[str, dict] | None = None, aliases: set[str] | None = None):
        self.indices = self
        self.aggregations = aggregations or {}
        self.aliases = aliases

    def exists_alias(self, name: str) -> bool:
        return self.aliases is None or name in self.aliases

    def search(self, index: str, body: dict) -> dict:
        if index.endswith("dose-alerts"):
            return {"hits": {"hits": [{"_source": ALERT}]}}
        if index.endswith("dose-studies") and "over_drl" in str(body["query"]):
            return {"hits": {"hits": [{"_source": OVER_LEVEL}]}}
        return {"aggregations": self.aggregations.get(index.removeprefix("diana-"), {})}


@pytest.fixture
def levels(monkeypatch):
    monkeypatch.setattr(report, "reference_level_survey", lambda *a, **k: [])
    return load_reference_levels(Path(__file__).parents[2] / "dose-reference-levels.example.yaml")


def _page(levels, **kw) -> str:
    return build_report(CannedOpenSearch(), "diana", date(2024, 3, 1), date(2024, 3, 2), levels, time_zone="UTC", **kw)


def test_the_page_names_studies_without_their_accession_numbers_by_default(levels):
    page = _page(levels)
    assert ACCESSION not in page and ALERT["accession_number"] not in page
    assert ">accession<" not in page
    # what lets a physicist find the study: its date, station, standard name or protocol
    for shown in ("2024-03-01", "CT_EAST", "CT head", "CT_WEST", "Head routine"):
        assert shown in page
    assert "--identifiers adds accession numbers" in page


def test_identifiers_are_shown_when_asked_for(levels):
    page = _page(levels, identifiers=True)
    assert ACCESSION in page and ALERT["accession_number"] in page
    assert "keep it as patient data" in page


@pytest.mark.parametrize("flag", [[], ["--identifiers"]])
def test_the_command_adds_identifiers_only_with_its_flag(tmp_path: Path, monkeypatch, flag):
    import diana.clients
    from diana.cli import main

    config = tmp_path / "diana.toml"
    config.write_text('[opensearch]\nurl = "http://127.0.0.1:2"\n[report]\ntime_zone = "UTC"\n')
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: CannedOpenSearch())
    out = tmp_path / "r.html"
    assert main(["--config", str(config), "report", "--to", "2024-03-02", "--out", str(out), *flag]) == 0
    assert (ALERT["accession_number"] in out.read_text()) == bool(flag)


def _dlp_by_station(means: dict[str, float]) -> dict:
    """The dose-studies aggregation of one day with these stations' mean DLPs."""
    return {
        "stations": {
            "buckets": [
                {
                    "key": station,
                    "doc_count": 1,
                    "dlp": {"value": mean},
                    "dap": {"value": None},
                    "days": {"buckets": [{"key_as_string": "2024-03-01", "dlp": {"value": mean}}]},
                }
                for station, mean in means.items()
            ]
        }
    }


def _chart(page: str, chart_id: str) -> str:
    start = page.index(f'data-chart="{chart_id}"')
    return page[start : page.index("</svg>", start)]


def test_mean_dlp_per_scanner_is_drawn_side_by_side_not_stacked():
    client = CannedOpenSearch({"dose-studies": _dlp_by_station({"CT_EAST": 100.0, "CT_WEST": 300.0})})
    page = build_report(client, "diana", date(2024, 3, 1), date(2024, 3, 1), time_zone="UTC")
    chart = _chart(page, "dlp-by-station")
    assert ">300 mGy·cm<" in chart and ">400" not in chart  # the axis tops at the largest mean, not their sum
    bars = re.findall(r'<rect class="bar" x="([\d.]+)" y="([\d.]+)" width="[\d.]+" height="([\d.]+)"', chart)
    assert len(bars) == 2
    (x_east, y_east, h_east), (x_west, y_west, h_west) = bars
    assert x_east != x_west  # beside each other
    assert float(y_east) + float(h_east) == pytest.approx(float(y_west) + float(h_west), abs=0.2)  # on the axis
    assert float(h_west) == pytest.approx(3 * float(h_east), abs=0.2)


def test_counts_still_stack():
    day = {
        "key_as_string": "2024-03-01",
        "modality": {"buckets": [{"key": "CT", "doc_count": 3}, {"key": "MR", "doc_count": 1}]},
    }
    client = CannedOpenSearch({"instances": {"days": {"buckets": [day]}}})
    page = build_report(client, "diana", date(2024, 3, 1), date(2024, 3, 1), time_zone="UTC")
    chart = _chart(page, "instances-per-day")
    assert ">4<" in chart  # the axis tops at the day's total
    xs = set(re.findall(r'<rect class="bar" x="([\d.]+)"', chart))
    assert len(xs) == 1  # one bar of two parts


def test_a_missing_instance_alias_fails_naming_the_alias_and_the_setting(tmp_path: Path, monkeypatch, capsys):
    import diana.clients
    from diana.cli import main

    config = tmp_path / "diana.toml"
    config.write_text('[opensearch]\nurl = "http://127.0.0.1:2"\nindex_prefix = "dianna"\n')
    # the stack's aliases are diana-*: the prefix is misspelt
    client = CannedOpenSearch(aliases={"diana-instances", "diana-dose-studies"})
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: client)
    out = tmp_path / "r.html"
    assert main(["--config", str(config), "report", "--to", "2024-03-02", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "diana report: OpenSearch has no dianna-instances alias: check [opensearch] index_prefix ('dianna'), "
        "or whether the OpenSearch sink has indexed anything yet"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "dates, said",
    [
        (["--to", "0001-01-05"], "--from defaults to 30 days before --to"),
        (["--from", "9999-12-01", "--to", "9999-12-31"], "the day after --to"),
    ],
)
def test_a_date_at_the_calendars_ends_is_one_line_not_a_traceback(tmp_path: Path, monkeypatch, capsys, dates, said):
    import diana.clients
    from diana.cli import main

    config = tmp_path / "diana.toml"
    config.write_text('[opensearch]\nurl = "http://127.0.0.1:2"\n')
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: CannedOpenSearch())
    assert main(["--config", str(config), "report", *dates, "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "outside 0001-01-01 to 9999-12-31" in err and said in err


def test_an_alert_is_raised_at_the_sites_time_and_labelled_so():
    page = build_report(CannedOpenSearch(), "diana", date(2024, 3, 1), date(2024, 3, 1), time_zone="Europe/Zurich")
    assert "<th>raised (Europe/Zurich)</th>" in page
    assert "<td>2024-03-01 11:00:00</td>" in page  # 10:00 UTC, winter time in Zurich
    assert "2024-03-01T10:00:00" not in page


def _summary(page: str) -> str:
    return re.search(r"<p>([^<]*studies, [^<]*GB)\. Made", page).group(1)


def test_the_headline_counts_every_instance_and_marks_an_estimated_study_count():
    """The headline's instances were the sum of the top 30 modality buckets (instances without a modality
    left out) while its studies and GB counted them; the studies, a cardinality estimate, were unmarked."""
    buckets = [
        {"key": "CT", "doc_count": 70, "studies": {"value": 5}, "bytes": {"value": 7e6}},
        {"key": "(none)", "doc_count": 30, "studies": {"value": 2}, "bytes": {"value": 3e6}},
    ]
    ingest = {
        "modalities": {"buckets": buckets[:1]},  # as a terms aggregation without `missing` answered
        "instances": {"value": 100},
        "studies": {"value": 7},
        "bytes": {"value": 1e9},
    }
    page = build_report(
        CannedOpenSearch({"instances": ingest}), "diana", date(2024, 3, 1), date(2024, 3, 1), time_zone="UTC"
    )
    assert _summary(page) == "7 studies, 100 instances, 1.00 GB"
    ingest |= {"studies": {"value": 123_456}, "modalities": {"buckets": buckets}}
    page = build_report(
        CannedOpenSearch({"instances": ingest}), "diana", date(2024, 3, 1), date(2024, 3, 1), time_zone="UTC"
    )
    assert _summary(page).startswith("≈123456 studies, 100 instances")


def test_the_instance_search_asks_exact_counts_and_the_instances_without_a_modality():
    class Recording(CannedOpenSearch):
        bodies: list = []

        def search(self, index, body):
            self.bodies.append((index, body))
            return super().search(index, body)

    client = Recording()
    build_report(client, "diana", date(2024, 3, 1), date(2024, 3, 1), time_zone="UTC")
    [aggs] = [b["aggs"] for i, b in client.bodies if i == "diana-instances"]
    assert aggs["instances"] == {"value_count": {"field": "sop_instance_uid"}}
    assert aggs["studies"]["cardinality"]["precision_threshold"] == 40_000
    assert aggs["modalities"]["aggs"]["studies"]["cardinality"]["precision_threshold"] == 40_000
    assert aggs["modalities"]["terms"]["missing"] == aggs["days"]["aggs"]["modality"]["terms"]["missing"]


def test_a_day_of_more_modalities_than_asked_gets_an_other_bar():
    """The day's inner terms kept 10 modalities and the rest of the day's instances were not drawn."""
    day = {
        "key_as_string": "2024-03-01",
        "modality": {"buckets": [{"key": "CT", "doc_count": 3}], "sum_other_doc_count": 5},
    }
    client = CannedOpenSearch({"instances": {"days": {"buckets": [day]}}})
    page = build_report(client, "diana", date(2024, 3, 1), date(2024, 3, 1), time_zone="UTC")
    chart = _chart(page, "instances-per-day")
    assert ">8<" in chart  # the axis tops at the day's total, the other 5 included
    assert ">(other)<" in page[page.index('data-chart="instances-per-day"') :]


def test_the_days_modalities_beyond_the_ranges_most_frequent_join_the_other_bar_each_its_own_colour():
    """Each day's top terms differ: drawn as they came, their union passed the palette and two series
    shared a colour. The most frequent over the range keep their bars; each day's rest is "(other)"."""
    from diana.access import report

    days = [
        {
            "key_as_string": f"2024-03-{d:02d}",
            "modality": {"buckets": [{"key": f"M{d * 5 + k:02d}", "doc_count": 10 + d} for k in range(5)]},
        }
        for d in range(1, 8)
    ]  # 35 modalities over 7 days, 5 a day; the later days' are the more frequent
    series = report._split({"days": {"buckets": days}}, "days", "modality")
    assert len(series) == report.DAY_MODALITIES + 1 <= len(report._COLOURS)
    assert set(series) - {report.OTHER} == {f"M{n:02d}" for n in range(15, 40)} - {f"M{n:02d}" for n in range(15, 20)}
    assert series[report.OTHER] == {"2024-03-01": 55, "2024-03-02": 60, "2024-03-03": 65}
    total = sum(sum(v.values()) for v in series.values())
    assert total == sum(10 + d for d in range(1, 8) for _ in range(5))
