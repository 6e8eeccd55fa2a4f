"""From an instance-arrived event's DICOM JSON header to a dose record: the one entry point."""

from __future__ import annotations

import json

from pydicom import Dataset

from diana.stream_apps.dose.context import study_context
from diana.stream_apps.dose.headers import read_header_dose
from diana.stream_apps.dose.sr import read_dose_report

__all__ = ["DoseExtractionError", "dataset_from_header_json", "extract_dose"]


class DoseExtractionError(ValueError):
    """The header could not be read back or walked; the event goes to the dead-letter topic."""


def _no_bulk(_tag, _vr, _uri) -> bytes:
    # Values over 1 KiB stay in the archived object; no dose value is that long.
    return b""


def dataset_from_header_json(header_json: str) -> Dataset:
    try:
        return Dataset.from_json(json.loads(header_json), bulk_data_uri_handler=_no_bulk)
    except Exception as exc:  # pydicom raises many kinds on odd JSON
        raise DoseExtractionError(
            f"cannot rebuild the data set from its JSON header: {type(exc).__name__}: {exc}"
        ) from exc


def extract_dose(ds: Dataset) -> tuple[dict, dict] | None:
    """(dose record, study context) of a dose report or dose-bearing image; None for anything else."""
    try:
        record = read_dose_report(ds) or read_header_dose(ds)
        if record is None:
            return None
        context = study_context(ds)
        if record["source"] == "RDSR" and context.get("modality") in (None, "SR"):
            # A dose report's own Modality is SR: the rules' and dashboards' `modality` is the one the
            # dose was given by (CT, DX, RF, MG, NM), which the report's kind says.
            context["modality"] = record["kind"]
        return record, context
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise DoseExtractionError(f"cannot read the dose values: {type(exc).__name__}: {exc}") from None
