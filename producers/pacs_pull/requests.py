"""What a collect job asks for: the lines of its input, each turned into C-FIND keys or an error.

A CSV names its columns in a header: ``AccessionNumber``; or ``PatientID`` with optional
``DateFrom``/``DateTo``; or ``StudyInstanceUID`` (the CSV ``diana cohort find --output`` writes);
``Modality`` may narrow any of them. A file whose first line names no known column is read as one
accession number per line. A line that cannot be used keeps its line number and says why, so the job
reports it and goes on with the others.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from diana.schemas.uid import is_valid_uid
from diana.spreadsheet_csv import COHORT_FIND_COLUMNS, unquote_cell

__all__ = ["CollectRequest", "RequestError", "parse_csv", "criteria_request", "normalise_date", "COHORT_FIND_HEADER"]

# header spelling (lower case, without spaces, '_' and '-') -> field
_COLUMNS = {
    "accessionnumber": "accession_number",
    "accession": "accession_number",
    "patientid": "patient_id",
    "studyinstanceuid": "study_instance_uid",
    "datefrom": "date_from",
    "from": "date_from",
    "dateto": "date_to",
    "to": "date_to",
    "modality": "modalities",
    "modalitiesinstudy": "modalities",
    # not "modalities": in the CSV of `cohort find` it lists what diana-star holds, not a filter
}
# DICOM value lengths: SH 16 (accession), LO 64 (patient id), UI 64.
_MAX_LENGTH = {"accession_number": 16, "patient_id": 64, "study_instance_uid": 64}
_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")


class RequestError(ValueError):
    """An input that cannot become a job at all (no file, no usable column)."""


@dataclass(frozen=True)
class CollectRequest:
    """One line of a job: the C-FIND keys it stands for, or why it cannot be used."""

    line: int
    text: str
    accession_number: str = ""
    patient_id: str = ""
    study_instance_uid: str = ""
    date_from: str = ""  # YYYYMMDD
    date_to: str = ""
    modalities: tuple[str, ...] = field(default_factory=tuple)
    error: str = ""

    def find_keys(self) -> dict[str, str]:
        """Study Root C-FIND matching keys (empty ones are left out)."""
        keys: dict[str, str] = {}
        if self.accession_number:
            keys["AccessionNumber"] = self.accession_number
        if self.patient_id:
            keys["PatientID"] = self.patient_id
        if self.study_instance_uid:
            keys["StudyInstanceUID"] = self.study_instance_uid
        if self.date_from or self.date_to:
            keys["StudyDate"] = f"{self.date_from}-{self.date_to}"
        if self.modalities:
            keys["ModalitiesInStudy"] = "\\".join(self.modalities)
        return keys


def normalise_date(value: str) -> str:
    """``2024-03-15`` or ``20240315`` -> ``20240315``; anything else is a ValueError saying so."""
    text = value.strip()
    try:
        return date.fromisoformat(text if "-" in text else f"{text[:4]}-{text[4:6]}-{text[6:]}").strftime("%Y%m%d")
    except ValueError:
        raise ValueError(f"{value!r} is not a date like 2024-03-15") from None


# The header `diana cohort find --output F.csv` writes: only a CSV with exactly this header has its cells'
# formula quotes (diana.spreadsheet_csv) taken off; a hand-made list's values are read as written.
COHORT_FIND_HEADER = COHORT_FIND_COLUMNS


def _build(line: int, text: str, values: dict[str, str]) -> CollectRequest:
    fields: dict[str, object] = {}
    try:
        for name in ("accession_number", "patient_id", "study_instance_uid"):
            value = values.get(name, "").strip()
            if len(value) > _MAX_LENGTH[name] or any(c in value for c in "*?\\"):
                raise ValueError(
                    f"{name} {value!r} is not a single DICOM value (at most {_MAX_LENGTH[name]} characters, no * ? \\)"
                )
            fields[name] = value
        if fields["study_instance_uid"] and not is_valid_uid(fields["study_instance_uid"]):
            raise ValueError(f"study_instance_uid {fields['study_instance_uid']!r} is not a UID")
        for name in ("date_from", "date_to"):
            raw = values.get(name, "").strip()
            fields[name] = normalise_date(raw) if raw else ""
        if fields["date_from"] and fields["date_to"] and str(fields["date_from"]) > str(fields["date_to"]):
            raise ValueError(f"date_from {fields['date_from']} is after date_to {fields['date_to']}")
        modalities = tuple(m.strip().upper() for m in re.split(r"[ ;|/\\]+", values.get("modalities", "")) if m.strip())
        bad = [m for m in modalities if not _MODALITY.match(m)]
        if bad:
            raise ValueError(f"modality {bad[0]!r} is not a DICOM modality code such as CT")
        fields["modalities"] = modalities
        if not (fields["accession_number"] or fields["patient_id"] or fields["study_instance_uid"]):
            raise ValueError("no accession number, patient ID or study UID on this line")
    except ValueError as exc:
        return CollectRequest(line, text, error=str(exc))
    return CollectRequest(line, text, **fields)  # type: ignore[arg-type]


def parse_csv(path: Path) -> list[CollectRequest]:
    """The requests of a CSV file, one per data line (blank lines are skipped, their numbers kept)."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise RequestError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RequestError(f"{path} is not UTF-8 text; save the CSV as UTF-8") from None
    rows = list(csv.reader(io.StringIO(raw)))
    if not rows:
        raise RequestError(f"{path} is empty; give one accession number per line, or a CSV with a header")
    header = [_COLUMNS.get(re.sub(r"[\s_\-]", "", h.lower())) for h in rows[0]]
    unquote: Callable[[str], str] = str  # cells as written, unless the file is a `cohort find` CSV
    if not any(header):
        # No header: one accession number per line, numbered from the first line of the file.
        header, data, first = ["accession_number"], rows, 1
    else:
        data, first = rows[1:], 2
        if tuple(rows[0]) == COHORT_FIND_HEADER:
            unquote = unquote_cell
        if not any(h in ("accession_number", "patient_id", "study_instance_uid") for h in header):
            raise RequestError(
                f"{path}: the header names no AccessionNumber, PatientID or StudyInstanceUID column "
                f"(known columns: AccessionNumber, PatientID, StudyInstanceUID, DateFrom, DateTo, Modality)"
            )
    out = []
    for number, row in enumerate(data, start=first):
        if not any(cell.strip() for cell in row):
            continue
        text = ",".join(row)
        if len(row) > len(header):
            out.append(CollectRequest(number, text, error=f"{len(row)} fields where the header has {len(header)}"))
            continue
        values = {h: unquote(cell) for h, cell in zip(header, row, strict=False) if h}
        out.append(_build(number, text, values))
    return out


def criteria_request(date_from: str = "", date_to: str = "", modalities: tuple[str, ...] = ()) -> CollectRequest:
    """A job of one line: every study in a date range (and of these modalities), e.g. from cohort filters."""
    if not (date_from or date_to):
        raise RequestError("a job by criteria needs --date-from and/or --date-to (a PACS is too big to pull whole)")
    text = f"date {date_from or '...'} to {date_to or '...'}" + (
        f", modality {'/'.join(modalities)}" if modalities else ""
    )
    try:
        start = normalise_date(date_from) if date_from else ""
        end = normalise_date(date_to) if date_to else ""
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    if start and end and start > end:
        raise RequestError(f"--date-from {date_from} is after --date-to {date_to}")
    bad = [m for m in modalities if not _MODALITY.match(m.upper())]
    if bad:
        raise RequestError(f"--modality {bad[0]!r} is not a DICOM modality code such as CT")
    return CollectRequest(1, text, date_from=start, date_to=end, modalities=tuple(m.upper() for m in modalities))
