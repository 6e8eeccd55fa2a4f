"""CSV cells a spreadsheet would run as formulas (CSV injection), quoted, and read back.

A text cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a single quote
before it; one starting with the quote itself is quoted too, so that the quote can be taken off again
exactly. Used for the CSVs people open in spreadsheets that hold DICOM or PACS values (`cohort find`,
the export's key file, a collect job's report). In the core because access/ and producers/ both use it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COHORT_FIND_COLUMNS", "FORMULA_STARTS", "quote_cell", "unquote_cell"]

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")

# The columns of `diana cohort find`'s CSV (access/cohort.py); collect (producers/pacs_pull/requests.py)
# takes the quotes off a CSV with exactly this header only: a hand-made list is read as written.
COHORT_FIND_COLUMNS = (
    "study_instance_uid",
    "study_date",
    "accession_number",
    "patient_id",
    "patient_sex",
    "patient_age_years",
    "modalities",
    "study_description",
    "stations",
    "series",
    "instances",
)


def quote_cell(value: Any) -> Any:
    """A text value that a spreadsheet would run as a formula, prefixed with a single quote; others as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def unquote_cell(cell: str) -> str:
    """A cell as it was before ``quote_cell``: ``'=X`` -> ``=X``, ``''X`` -> ``'X``, others as they are."""
    if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS):
        return cell[1:]
    return cell
