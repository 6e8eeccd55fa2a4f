"""`diana cohort`: the queries it sends and what it does with more studies than --limit.

The index here is a small stand-in for the OpenSearch client that answers the query forms cohort.py
builds (bool filter, range, terms, exists, composite aggregation, search_after) over documents in
memory, and records every body it is sent. What the real index does with these bodies is checked in
tests/integration/test_cohort.py.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from opensearchpy.exceptions import RequestError

import diana.access.cohort as cohort
import diana.cli.access
import diana.clients
from diana.access.cohort import TERMS_BATCH, CohortFilter, find_studies
from diana.cli import main
from tests.support.umask import umask

MAX_TERMS_COUNT = 65_536  # index.max_terms_count


def _predicate(query: dict):
    """``query`` (the forms cohort.py uses) as a test on one document."""
    kind, spec = next(iter(query.items()))
    if kind == "match_all":
        return lambda doc: True
    if kind == "bool":
        musts = [_predicate(q) for q in spec.get("filter", [])]
        shoulds = [_predicate(q) for q in spec.get("should", [])]
        nots = [_predicate(spec["must_not"])] if "must_not" in spec else []
        return lambda doc: (
            all(p(doc) for p in musts)
            and (not shoulds or any(p(doc) for p in shoulds))
            and not any(p(doc) for p in nots)
        )
    if kind == "multi_match":  # operator "and" over text fields of one analyzer, words split on blanks
        words = spec["query"].lower().split()

        def in_field(doc, field, word):
            return word in str(doc.get(field) or "").lower().split()

        if spec.get("type") == "cross_fields":  # each word in any field
            return lambda doc: all(any(in_field(doc, f, w) for f in spec["fields"]) for w in words)
        return lambda doc: any(all(in_field(doc, f, w) for w in words) for f in spec["fields"])  # best_fields
    if kind == "exists":
        return lambda doc: doc.get(spec["field"]) is not None
    if kind == "terms":
        [(field, values)] = spec.items()
        if len(values) > MAX_TERMS_COUNT:
            raise RequestError(
                400,
                "search_phase_execution_exception",
                {"error": {"root_cause": [{"reason": f"The number of terms [{len(values)}] ... exceeded"}]}},
            )
        wanted = set(values)
        return lambda doc: doc.get(field) in wanted
    if kind == "term":
        [(field, condition)] = spec.items()
        return lambda doc: str(doc.get(field, "")).upper() == condition["value"].upper()
    if kind == "wildcard":  # `*` any characters, `?` one; case-insensitive as asked
        [(field, condition)] = spec.items()
        assert condition["case_insensitive"] is True
        return lambda doc: fnmatch.fnmatchcase(str(doc.get(field, "")).upper(), condition["value"].upper())
    if kind == "range":
        [(field, bounds)] = spec.items()
        tests = {
            "gt": lambda v, b: v > b,
            "gte": lambda v, b: v >= b,
            "lt": lambda v, b: v < b,
            "lte": lambda v, b: v <= b,
        }
        return lambda doc: doc.get(field) is not None and all(tests[op](doc[field], b) for op, b in bounds.items())
    raise AssertionError(f"query form not in this stand-in: {kind}")


def _order(value):
    return (value is not None, value)  # a missing value first, as composite's missing_bucket sorts it


def _terms(values) -> list:
    """A terms aggregation's keys: the most frequent first, then in order."""
    counts = Counter(values)
    return sorted(counts, key=lambda v: (-counts[v], v))


def _earliest_dated(doc: dict):
    return (doc.get("study_date") is None, doc.get("study_date") or "")  # the sort cohort.py asks: a missing date last


class RecordingIndex:
    """A stand-in OpenSearch client over instance and dose-study documents; ``bodies`` is what it was sent."""

    def __init__(self, instances: list[dict], dose_studies: list[dict] = ()):
        self.docs = {"instances": instances, "dose-studies": list(dose_studies)}
        self.bodies: list[tuple[str, dict]] = []
        self._matching: dict[str, list[dict]] = {}

    def search(self, index: str, body: dict) -> dict:
        self.bodies.append((index, body))
        kind = index.removeprefix("diana-")
        key = kind + json.dumps(body["query"], sort_keys=True)
        if key not in self._matching:
            test = _predicate(body["query"])
            self._matching[key] = [d for d in self.docs[kind] if test(d)]
        docs = self._matching[key]
        return self._composite(body, docs) if "aggs" in body else self._page(body, docs)

    def count(self, index: str, body: dict) -> dict:
        test = _predicate(body["query"])
        return {"count": sum(1 for d in self.docs[index.removeprefix("diana-")] if test(d))}

    def _page(self, body: dict, docs: list[dict]) -> dict:
        [(field, _)] = body["sort"][0].items()
        docs = sorted(docs, key=lambda d: d[field])
        if "search_after" in body:
            docs = [d for d in docs if d[field] > body["search_after"][0]]
        page = docs[: body["size"]]
        return {"hits": {"hits": [{"_source": d, "sort": [d[field]]} for d in page]}}

    def _composite(self, body: dict, docs: list[dict]) -> dict:
        composite = body["aggs"]["studies"]["composite"]
        names = [(name, spec["terms"]["field"]) for source in composite["sources"] for name, spec in source.items()]
        buckets: dict[tuple, list[dict]] = {}
        for doc in docs:
            buckets.setdefault(tuple(doc.get(field) for _, field in names), []).append(doc)
        keys = sorted(buckets, key=lambda k: [_order(v) for v in k])
        if "after" in composite:
            after = [_order(composite["after"][name]) for name, _ in names]
            keys = [k for k in keys if [_order(v) for v in k] > after]
        aggs = body["aggs"]["studies"].get("aggs", {})
        out = []
        for key in keys[: composite["size"]]:
            group = buckets[key]
            bucket = {
                "key": {name: value for (name, _), value in zip(names, key, strict=True)},
                "doc_count": len(group),
            }
            if aggs:
                first = group[0]
                if "sort" in aggs["first"]["top_hits"]:
                    assert aggs["first"]["top_hits"]["sort"] == [{"study_date": {"order": "asc", "missing": "_last"}}]
                    first = min(group, key=_earliest_dated)
                bucket |= {
                    "modalities": {"buckets": [{"key": m} for m in _terms(d["modality"] for d in group)]},
                    "stations": {"buckets": []},
                    "series": {"value": len({d.get("series_instance_uid") for d in group} - {None})},
                    "first": {"hits": {"hits": [{"_source": first}]}},
                }
            out.append(bucket)
        result: dict = {"buckets": out}
        if out:
            result["after_key"] = out[-1]["key"]
        return {"aggregations": {"studies": result}}


def _instance(uid: str, study_date: str | None, modality: str = "CT") -> dict:
    return {"study_instance_uid": uid, "study_date": study_date, "modality": modality}


def _month_of_studies() -> list[dict]:
    """30 studies, one a day; their UIDs in no relation to their dates, as real UIDs are."""
    rng = random.Random(1)
    return [_instance(f"1.2.{rng.randint(10**8, 10**9)}", f"2024-01-{day:02d}") for day in range(1, 31)]


def test_a_cohort_cut_at_the_limit_keeps_the_earliest_studies_and_says_more_match():
    index = RecordingIndex(_month_of_studies())
    found = find_studies(index, "diana", CohortFilter(date_from="2024-01-01", date_to="2024-01-31"), limit=10)
    assert [r["study_date"] for r in found.rows] == [f"2024-01-{day:02d}" for day in range(1, 11)]
    assert found.more_match
    everything = find_studies(index, "diana", CohortFilter(), limit=30)
    assert len(everything.rows) == 30 and not everything.more_match


def test_a_study_without_a_date_comes_first_and_a_study_of_two_dates_is_one_row():
    instances = [*_month_of_studies(), _instance("9.9", None), _instance("8.8", "2024-01-05", "MR")]
    instances.append(_instance("8.8", "2024-01-06", "CT"))  # the same study, a second date
    rows = find_studies(RecordingIndex(instances), "diana", CohortFilter(), limit=100).rows
    assert rows[0]["study_instance_uid"] == "9.9"
    [two_dates] = [r for r in rows if r["study_instance_uid"] == "8.8"]
    assert two_dates["instances"] == 2 and two_dates["modalities"] == "CT/MR"
    assert len(rows) == 32


def _split_study(uid: str, dates: list[str | None], per_date: int = 2) -> list[dict]:
    """A study whose instances carry several study dates (None: indexed without its header, so undated),
    a series and a modality per date."""
    return [
        {
            **_instance(uid, day, ("CT", "MR", "PT")[n % 3]),
            "series_instance_uid": f"{uid}.{n}",
            **({"accession_number": f"A{uid}"} if day else {}),
        }
        for n, day in enumerate(dates)
        for _ in range(per_date)
    ]


def test_a_study_over_two_dates_cut_at_the_limit_has_all_its_instances_counted():
    instances = [
        *_split_study("5.1", ["2023-12-31", "2024-01-05"], per_date=3),
        *_month_of_studies(),  # 2024-01-01 on: each after 5.1's first date, some before its second
    ]
    found = find_studies(RecordingIndex(instances), "diana", CohortFilter(), limit=1)
    [row] = found.rows
    assert found.more_match
    assert (row["study_instance_uid"], row["study_date"], row["instances"]) == ("5.1", "2023-12-31", 6)
    assert (row["series"], row["modalities"]) == (2, "CT/MR")


def test_a_study_with_an_undated_instance_has_the_date_of_its_dated_ones():
    instances = [
        *_split_study("6.1", [None, "2024-01-20"]),  # one instance indexed without its header
        *_split_study("6.2", ["2024-01-10"]),
        *_split_study("6.3", [None]),  # nothing but undated instances: undated, first
    ]
    index = RecordingIndex(instances)
    rows = find_studies(index, "diana", CohortFilter(), limit=10).rows
    assert [(r["study_instance_uid"], r.get("study_date")) for r in rows] == [
        ("6.3", None),
        ("6.2", "2024-01-10"),
        ("6.1", "2024-01-20"),
    ]
    assert rows[2]["instances"] == 4 and rows[2]["accession_number"] == "A6.1"  # the dated instance's header
    cut = find_studies(index, "diana", CohortFilter(), limit=2)
    assert [r["study_instance_uid"] for r in cut.rows] == ["6.3", "6.2"] and cut.more_match


def test_the_kept_studies_are_counted_in_terms_batches(monkeypatch):
    monkeypatch.setattr(cohort, "TERMS_BATCH", 2)
    instances = [
        row
        for n in range(5)
        for row in _split_study(f"7.{n}", [None, f"2024-01-0{n + 1}", f"2024-02-0{n + 1}"], per_date=1)
    ]
    index = RecordingIndex(instances)
    found = find_studies(index, "diana", CohortFilter(), limit=4)
    assert [(r["study_instance_uid"], r["study_date"], r["instances"]) for r in found.rows] == [
        (f"7.{n}", f"2024-01-0{n + 1}", 3) for n in range(4)
    ]
    assert found.more_match
    terms = [
        f["terms"]["study_instance_uid"]
        for _, body in index.bodies
        if "bool" in body["query"]
        for f in body["query"]["bool"]["filter"]
        if "terms" in f
    ]
    assert terms and max(len(batch) for batch in terms) <= 2


def _dose_cohort(in_range: int) -> RecordingIndex:
    uids = [f"1.3.{n}" for n in range(in_range)]
    instances = [_instance(uid, f"2024-{1 + n % 12:02d}-01") for n, uid in enumerate(uids)]
    dose = [{"study_instance_uid": uid, "study_date": "2024-06-01", "total_dlp_mGycm": 900.0} for uid in uids]
    # Over the threshold but years before the range: not wanted, and must not fill the terms query.
    old = [f"1.4.{n}" for n in range(5)]
    instances += [_instance(uid, "2019-01-01") for uid in old]
    dose += [{"study_instance_uid": uid, "study_date": "2019-01-01", "total_dlp_mGycm": 900.0} for uid in old]
    # A dose study without a study date whose images have one in range: wanted.
    instances.append(_instance("1.5.1", "2024-01-01"))
    dose.append({"study_instance_uid": "1.5.1", "total_dlp_mGycm": 900.0})
    return RecordingIndex(instances, dose)


def test_dose_above_over_max_terms_count_studies_is_asked_in_batches_within_the_date_range():
    index = _dose_cohort(MAX_TERMS_COUNT + 100)
    cohort = CohortFilter(date_from="2024-01-01", date_to="2024-12-31", dose_above=[("total_dlp_mGycm", 500.0)])
    found = find_studies(index, "diana", cohort, limit=3)
    assert [r["study_date"] for r in found.rows] == ["2024-01-01"] * 3 and found.more_match
    dose_queries = [body["query"] for name, body in index.bodies if name == "diana-dose-studies"]
    assert all("study_date" in json.dumps(q) for q in dose_queries)
    # The queries picking the studies (by date and study), not those counting the kept ones' instances.
    terms = [
        f["terms"]["study_instance_uid"]
        for name, body in index.bodies
        if name == "diana-instances" and len(body["aggs"]["studies"]["composite"]["sources"]) == 2
        for f in body["query"]["bool"]["filter"]
        if "terms" in f
    ]
    sent = [uid for batch in terms for uid in batch]
    assert max(len(batch) for batch in terms) <= TERMS_BATCH
    assert len(sent) == len(set(sent)) == MAX_TERMS_COUNT + 101  # each in-range dose study once, no 2019 one
    assert "1.5.1" in sent


@pytest.fixture
def exported(monkeypatch) -> list[list[str]]:
    """The study UIDs each `cohort export` would have exported, instead of exporting them."""
    calls: list[list[str]] = []
    monkeypatch.setattr(diana.cli.access, "_cohort_export", lambda cfg, args, client, prefix, uids: calls.append(uids))
    return calls


def _index_of(monkeypatch, index) -> None:
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: index)


def test_find_says_on_stderr_that_more_studies_match_than_it_returns(config, monkeypatch, capsys):
    _index_of(monkeypatch, RecordingIndex(_month_of_studies()))
    assert main(["--config", str(config), "cohort", "find", "--limit", "10", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 11  # a header and 10 rows
    assert "more than 10 studies match; the 10 earliest by study date are returned - raise --limit" in err


def test_export_refuses_a_cut_cohort_unless_the_limit_was_asked_for(config, monkeypatch, capsys, exported):
    monkeypatch.setattr(diana.cli.access, "DEFAULT_COHORT_LIMIT", 20)
    _index_of(monkeypatch, RecordingIndex(_month_of_studies()))
    argv = ["--config", str(config), "cohort", "export", "--out", "/tmp/never-written"]
    assert main(argv) == 1
    assert exported == []
    assert "more than 20 studies match; nothing exported" in capsys.readouterr().err
    main([*argv, "--limit", "20"])
    assert len(exported) == 1 and len(exported[0]) == 20
    assert "the 20 earliest by study date are exported" in capsys.readouterr().err


def test_a_refused_search_is_one_line_with_what_to_do_not_a_traceback(config, monkeypatch, capsys):
    class Refusing:
        def search(self, index, body):
            raise RequestError(
                400, "search_phase_execution_exception", {"error": {"root_cause": [{"reason": "too many"}]}}
            )

    _index_of(monkeypatch, Refusing())
    assert main(["--config", str(config), "cohort", "find", "--modality", "CT"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip() == (
        "diana cohort find: OpenSearch refused the search (400 search_phase_execution_exception: too many); "
        "narrow the filters"
    )


def test_cohort_find_output_is_readable_by_its_owner_only(tmp_path: Path, monkeypatch, capsys):
    """The file lists patient IDs: before, `diana cohort find --output FILE` opened it with open(..., "w"),
    0644 with the usual umask (and an older file kept its mode)."""
    import stat

    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: None)
    row = {"study_instance_uid": "1.2.3", "study_date": "2024-03-15", "accession_number": "A1", "patient_id": "P-77"}
    monkeypatch.setattr(cohort, "find_studies", lambda *a, **k: cohort.FoundStudies([row], more_match=False))
    out = tmp_path / "cohort.csv"
    out.write_text("an older list\n")
    out.chmod(0o644)
    with umask(0o022):
        assert main(["cohort", "find", "--output", str(out)]) == 0
    assert "P-77" in out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def _archived_cohort(tmp_path, studies: int, per_study: int = 3) -> tuple[RecordingIndex, list[dict]]:
    """Studies indexed with their instances' hashes and laid out in the default archive folder of the
    `config` fixture (var/archive beside it)."""
    instances = []
    for n in range(studies):
        for k in range(per_study):
            study, series, sop = f"1.9.{n}", f"1.9.{n}.1", f"1.9.{n}.1.{k}"
            data = f"object {sop}".encode()
            path = tmp_path / "var" / "archive" / study / series / f"{sop}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            instances.append(
                {
                    **_instance(study, f"2024-02-{n + 1:02d}"),
                    "series_instance_uid": series,
                    "sop_instance_uid": sop,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size_bytes": len(data),
                }
            )
    return RecordingIndex(instances), instances


def _instance_searches(index: RecordingIndex) -> list[list[str]]:
    """The study UIDs of each search (first page) of the studies' instances an export sent."""
    return [
        body["query"]["terms"]["study_instance_uid"]
        for _, body in index.bodies
        if "terms" in body["query"] and "search_after" not in body
    ]


def test_export_searches_the_instances_a_batch_of_studies_at_a_time_as_it_goes(config, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cohort, "STUDIES_PER_BATCH", 2)
    index, instances = _archived_cohort(tmp_path, studies=5)
    _index_of(monkeypatch, index)
    import diana.access.export as export

    searched_when_copied: list[int] = []  # how many instance searches were sent when each object was copied
    write = export.write_atomic

    def recording_write(path, data):
        searched_when_copied.append(len(_instance_searches(index)))
        write(path, data)

    monkeypatch.setattr(export, "write_atomic", recording_write)
    out = tmp_path / "out"
    assert main(["--config", str(config), "cohort", "export", "--out", str(out), "--no-progress"]) == 0
    assert "exported 15 objects of 5 studies" in capsys.readouterr().out
    assert len(list(out.rglob("*.dcm"))) == 15
    assert [len(b) for b in _instance_searches(index)] == [2, 2, 1]
    # the first objects were copied before the later studies' instances were asked for
    assert searched_when_copied[1] == 1 and max(searched_when_copied) == 3


def test_a_refused_instance_search_of_an_export_is_one_line_not_a_traceback(config, monkeypatch, capsys, tmp_path):
    stand_in, _ = _archived_cohort(tmp_path, studies=2)
    find = stand_in.search

    def refusing(index, body):
        if "terms" in body["query"]:  # the export's search of the studies' instances
            raise RequestError(400, "search_phase_execution_exception", {"error": {"reason": "too many clauses"}})
        return find(index, body)

    stand_in.search = refusing  # type: ignore[method-assign]
    _index_of(monkeypatch, stand_in)
    out = tmp_path / "out"
    assert main(["--config", str(config), "cohort", "export", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "OpenSearch refused the search (400 search_phase_execution_exception: too many clauses)" in err
    assert f"{out} is marked with EXPORT-INCOMPLETE.txt" in err and (out / "EXPORT-INCOMPLETE.txt").exists()


def test_an_export_of_no_study_says_so_and_creates_nothing(config, monkeypatch, capsys, tmp_path):
    _index_of(monkeypatch, RecordingIndex(_month_of_studies()))
    out = tmp_path / "out"
    assert main(["--config", str(config), "cohort", "export", "--modality", "MR", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "diana cohort export: no study matches the filters; nothing exported"
    assert "exported 0 objects" not in captured.out and not out.exists()


def test_dicom_form_dates_are_asked_and_compared_as_iso_dates():
    index = RecordingIndex(_month_of_studies())
    found = find_studies(index, "diana", CohortFilter(date_from="20240105", date_to="2024-01-10"), limit=100)
    assert [r["study_date"] for r in found.rows] == [f"2024-01-{day:02d}" for day in range(5, 11)]
    ranges = [
        f["range"]["study_date"]
        for _, body in index.bodies
        for f in body["query"]["bool"]["filter"]
        if "range" in f  # the query picking the studies; the one counting them nests it
    ]
    assert ranges and all(r == {"gte": "2024-01-05", "lte": "2024-01-10"} for r in ranges)
    with pytest.raises(cohort.CohortError, match="--date-from 2024-01-10 is after --date-to 2024-01-05"):
        find_studies(index, "diana", CohortFilter(date_from="2024-01-10", date_to="20240105"))


def test_csv_cells_a_spreadsheet_would_run_are_quoted_and_collect_reads_them_back(tmp_path):
    import csv
    import io

    from diana.producers.pacs_pull.requests import parse_csv

    rows = [
        {
            "study_instance_uid": "1.2.3",
            "accession_number": "-A1",
            "patient_id": "=HYPERLINK(1)",
            "study_description": "@SUM(1)",
            "patient_age_years": -1.0,
            "series": 2,
        },
        {"study_instance_uid": "1.2.4", "accession_number": "'+A2", "patient_id": "\tP2", "study_description": "CT"},
    ]
    out = io.StringIO()
    cohort.write_rows(rows, out, "csv")
    written = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["accession_number"] for r in written] == ["'-A1", "''+A2"]
    assert [r["patient_id"] for r in written] == ["'=HYPERLINK(1)", "'\tP2"]
    assert written[0]["study_description"] == "'@SUM(1)" and written[1]["study_description"] == "CT"
    assert written[0]["patient_age_years"] == "-1.0"  # a number is no formula
    path = tmp_path / "cohort.csv"
    path.write_text(out.getvalue(), encoding="utf-8")
    first, second = parse_csv(path)  # `diana collect` asks the PACS for the values as they were
    assert first.find_keys() == {"AccessionNumber": "-A1", "PatientID": "=HYPERLINK(1)", "StudyInstanceUID": "1.2.3"}
    assert (second.accession_number, second.patient_id) == ("'+A2", "P2")  # collect strips blanks, as always


def test_description_words_may_be_in_different_fields():
    instances = [
        {**_instance("2.1", "2024-01-01"), "study_description": "CT thorax low", "protocol_name": "dose 1mm"},
        {**_instance("2.2", "2024-01-02"), "study_description": "CT low dose thorax"},
        {**_instance("2.3", "2024-01-03"), "study_description": "CT thorax", "series_description": "low"},
    ]
    rows = find_studies(RecordingIndex(instances), "diana", CohortFilter(description="low dose")).rows
    assert [r["study_instance_uid"] for r in rows] == ["2.1", "2.2"]


def test_an_export_whose_studies_left_the_index_after_the_search_fails_and_leaves_no_folder(
    config, monkeypatch, capsys, tmp_path
):
    stand_in, _ = _archived_cohort(tmp_path, studies=2)
    find = stand_in.search

    def instances_gone(index, body):
        if "terms" in body["query"]:  # the export's search of the studies' instances: removed meanwhile
            return {"hits": {"hits": []}}
        return find(index, body)

    stand_in.search = instances_gone  # type: ignore[method-assign]
    _index_of(monkeypatch, stand_in)
    out = tmp_path / "out"
    assert main(["--config", str(config), "cohort", "export", "--out", str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("diana cohort export: no object to export") and "nothing exported" in captured.err
    assert "exported 0 objects" not in captured.out and not out.exists()


def _stations_and_modalities() -> list[dict]:
    return [
        _instance("1.1", "2024-01-01", "CT") | {"station_name": "CT_EAST"},
        _instance("1.2", "2024-01-02", "MR") | {"station_name": "MR_1"},
        _instance("1.3", "2024-01-03", "US") | {"station_name": "ct_west"},
        _instance("1.4", "2024-01-04", "CR") | {"station_name": "XRAY"},
    ]


def test_a_comma_list_of_modalities_is_any_of_them():
    """`--modality CT,MR` was one term "CT,MR": it matched nothing, silently."""
    index = RecordingIndex(_stations_and_modalities())
    rows = find_studies(index, "diana", CohortFilter(modality=["CT,mr", "CR"])).rows
    assert [r["study_instance_uid"] for r in rows] == ["1.1", "1.2", "1.4"]


def test_a_station_with_a_wildcard_matches_as_a_pattern_whatever_the_case():
    """`--station CT*` was the exact term "CT*": it matched nothing, silently."""
    index = RecordingIndex(_stations_and_modalities())
    rows = find_studies(index, "diana", CohortFilter(station=["ct*"])).rows
    assert [r["study_instance_uid"] for r in rows] == ["1.1", "1.3"]
    rows = find_studies(RecordingIndex(_stations_and_modalities()), "diana", CohortFilter(station=["MR_?"])).rows
    assert [r["study_instance_uid"] for r in rows] == ["1.2"]
    # a name without a wildcard stays exact, and a station's comma is its own
    index = RecordingIndex(_stations_and_modalities())
    assert find_studies(index, "diana", CohortFilter(station=["CT_EAST,MR_1"])).rows == []


@pytest.mark.parametrize(("name", "first_line"), [("c.CSV", "study_instance_uid,"), ("c.Json", "[")])
def test_the_output_format_follows_the_suffix_whatever_its_case(tmp_path: Path, monkeypatch, name, first_line):
    """`-o c.CSV` wrote the text table: the suffix was compared case-sensitively."""
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: None)
    row = {"study_instance_uid": "1.2.3", "study_date": "2024-03-15"}
    monkeypatch.setattr(cohort, "find_studies", lambda *a, **k: cohort.FoundStudies([row], more_match=False))
    out = tmp_path / name
    assert main(["cohort", "find", "-o", str(out)]) == 0
    assert out.read_text().startswith(first_line)


@pytest.mark.parametrize("name", ["c.txt", "c.xlsx"])
def test_an_unknown_output_suffix_is_refused_naming_the_formats(tmp_path: Path, monkeypatch, capsys, name):
    """`-o c.xlsx` silently wrote the text table into a file a spreadsheet cannot open."""
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: pytest.fail("searched"))
    out = tmp_path / name
    assert main(["cohort", "find", "-o", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert ".csv or .json" in err and "--format table|csv|json" in err
    # with --format the name is the user's choice
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: None)
    monkeypatch.setattr(cohort, "find_studies", lambda *a, **k: cohort.FoundStudies([], more_match=False))
    assert main(["cohort", "find", "-o", str(out), "--format", "table"]) == 0
    assert out.read_text().endswith("0 studies\n")


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_a_comma_list_option_without_a_value_is_refused_not_dropped(value):
    """Its empty pieces dropped, the option had no value left and the search matched every study (an unset
    shell variable in `--modality "$MOD"` exported the whole index)."""
    with pytest.raises(cohort.CohortError, match="no value"):
        find_studies(RecordingIndex(_month_of_studies()), "diana", CohortFilter(modality=[value]))
    with pytest.raises(cohort.CohortError, match="no value"):
        CohortFilter(sex=[value]).validate()
