"""A collect job's report: one row per study found, and one per line that found none or could not be used."""

from __future__ import annotations

import csv
from typing import TextIO

from diana.producers.pacs_pull.ledger import JobState
from diana.spreadsheet_csv import quote_cell

__all__ = ["OUTCOMES", "SHORT", "COLUMNS", "report_rows", "write_report", "summary_line", "shortfall"]

# ledger state -> the report's outcome
OUTCOMES = {
    "STUDY_COMPLETE": "retrieved",
    "STUDY_SKIPPED": "already_present",
    "STUDY_PARTIAL": "partial",
    "STUDY_FAILED": "failed",
    "LINE_NOT_FOUND": "not_found",
    "LINE_UNPARSABLE": "unparsable",
    "LINE_FAILED": "find_failed",
}
# The outcomes that mean something asked for did not come (not_found is an answer, not a failure).
SHORT = ("failed", "partial", "find_failed", "unparsable")
COLUMNS = (
    "line",
    "input",
    "outcome",
    "study_instance_uid",
    "accession_number",
    "expected_instances",
    "indexed_instances",
    "pacs_status",
    "retrieves",
    "detail",
)


def report_rows(job: JobState) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for number, line in sorted(job.lines.items()):
        studies = [s for s in job.studies.values() if s.line == number or number in s.found_by]
        if line.state != "LINE_FOUND" or not studies:
            rows.append(
                {
                    "line": number,
                    "input": line.text,
                    "outcome": OUTCOMES.get(line.state, "pending"),
                    "pacs_status": line.pacs_status,
                    "detail": line.detail,
                }
            )
            continue
        for s in sorted(studies, key=lambda s: s.study_instance_uid):
            rows.append(
                {
                    "line": number,
                    "input": line.text,
                    "outcome": OUTCOMES.get(s.state, "pending"),
                    "study_instance_uid": s.study_instance_uid,
                    "accession_number": s.accession_number,
                    "expected_instances": s.expected_instances,
                    "indexed_instances": s.indexed_instances,
                    "pacs_status": s.pacs_status,
                    "retrieves": s.attempts,
                    "detail": s.detail,
                }
            )
    return rows


def write_report(job: JobState, out: TextIO) -> int:
    """The job's report as CSV; a cell a spreadsheet would run as a formula (an input line, an accession
    number, a PACS's text) is quoted (diana.spreadsheet_csv: nothing in diana-star reads the report back)."""
    rows = report_rows(job)
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: quote_cell(v) for k, v in row.items()} for row in rows)
    return len(rows)


def _outcome_counts(job: JobState) -> dict[str, int]:
    counts: dict[str, int] = {}
    seen: set[object] = set()
    for row in report_rows(job):
        study = row.get("study_instance_uid")
        if study in seen:  # a study found by several lines is counted once
            continue
        if study:
            seen.add(study)
        outcome = str(row["outcome"])
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def shortfall(job: JobState) -> dict[str, int]:
    """What did not come, by outcome (a study found by several lines counted once); empty: nothing."""
    return {name: n for name, n in sorted(_outcome_counts(job).items()) if name in SHORT}


def summary_line(job: JobState) -> str:
    counts = _outcome_counts(job)
    state = "done" if job.finished else ("paused: " + job.paused if job.paused else "not finished")
    parts = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    return f"job {job.job_id} ({state}): {parts or 'nothing yet'}"
