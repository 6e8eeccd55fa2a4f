"""The Dashboards saved objects: each chart over time bins the field its index pattern filters on."""

from __future__ import annotations

from diana.access.dashboards import INDEX_PATTERNS, VISUALIZATIONS, render_ndjson
from tests.support.paths import REPO


def test_each_date_histogram_bins_the_time_field_of_its_index_pattern():
    # A chart binning another field than the one the time picker filters shows bars outside the range
    # picked and leaves out documents inside it (studies per day binned first_received_at while the
    # studies pattern filtered last_received_at: a study amended later was cut or moved).
    mismatched = [
        (v.id, field, INDEX_PATTERNS[v.index])
        for v in VISUALIZATIONS
        for kind, field, _ in v.buckets
        # study months (cohort-study-dates) are the study dates of what arrived in the range: on purpose
        if kind == "date_histogram" and field != "study_date" and field != INDEX_PATTERNS[v.index]
    ]
    assert mismatched == []


def test_studies_are_counted_on_the_day_they_began_to_arrive():
    [studies_per_day] = [v for v in VISUALIZATIONS if v.id == "ops-studies-per-day"]
    assert studies_per_day.buckets[0] == ("date_histogram", "first_received_at", "d")
    assert INDEX_PATTERNS["studies"] == "first_received_at"


def test_the_committed_ndjson_is_what_the_code_declares():
    assert (REPO / "compose" / "dashboards" / "diana-star.ndjson").read_text() == render_ndjson("diana")
