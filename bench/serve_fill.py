"""bench.serve's filler studies at size: the same files for Orthanc, and their events for diana-star.

100,000 instances through ``diana import`` took 30-70 min on the shared machine (24-57 instances/s),
and generating them with pydicom one by one another 10 (168/s). Filler instances only need to be
found by C-FIND, so:

- the files are written from one template instance (``make_instance``, 16×16 pixels) by replacing,
  byte for byte, values of the same length: Study, Series and SOP Instance UIDs, Patient ID,
  Accession Number, Study Date and Instance Number (thousands a second);
- diana-star gets, for each file, the InstanceArrived event the receiver would publish: the
  template's event (its header read by the receiver's own header reader) with the same
  replacements, its size and SHA-256 those of the file. They are produced to dicom.instances and
  indexed by ``diana reindex --kinds instances`` (the whole log: the imported instances too). They
  have no archived file: a retrieve of a filler study is not part of the bench;
- Orthanc receives the same files with dcmtk storescu (``+sd``: one folder per association).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest import DCMTK
from bench.pipeline_steps import produce_instance_event
from tests.support.dicomgen import make_instance

__all__ = ["write_fillers", "produce_filler_events", "send_folders"]

# Placeholders, each as long as the values put in their place.
_ROOT = "1.2.826.0.1.3680043.10.1171"
# A UID component has no leading zero: each number is written after a "1" (study 7 → "1000007").
_WIDTH = {"1": 6, "2": 8, "3": 9}  # study, series, SOP instance
_STUDY, _SERIES, _SOP = (f"{_ROOT}.{kind}.1{0:0{width}d}" for kind, width in _WIDTH.items())
_PATIENT, _ACCESSION, _DATE, _DATE_ISO = "SERVE-P00000", "ACCP00000", "20231231", "2023-12-31"
# (0020,0013) Instance Number, IS, explicit VR little endian, 4 characters.
_NUMBER_TAG = b"\x20\x00\x13\x00IS\x04\x00"
_NUMBER = "9999"


def _values(study: int, series: int, sop: int, number: int, date: str) -> list[tuple[str, str]]:
    return [
        (_STUDY, f"{_ROOT}.1.1{study:06d}"),
        (_SERIES, f"{_ROOT}.2.1{series:08d}"),
        (_SOP, f"{_ROOT}.3.1{sop:09d}"),
        (_PATIENT, f"SERVE-P{study:05d}"),
        (_ACCESSION, f"ACCP{study:05d}"),
        (_DATE, date),
        (_NUMBER, f"{number:>4d}"),
    ]


def _template() -> bytes:
    from io import BytesIO

    ds = make_instance(_STUDY, _SERIES, int(_NUMBER), patient_id=_PATIENT, study_date=_DATE, rows=16, sop_uid=_SOP)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    if data.count(_NUMBER_TAG + _NUMBER.encode()) != 1:
        raise RuntimeError("the template's Instance Number is not where the filler expects it")
    return data


def _fill(data: bytes, values: list[tuple[str, str]]) -> bytes:
    for placeholder, value in values:
        if placeholder == _NUMBER:
            data = data.replace(_NUMBER_TAG + placeholder.encode(), _NUMBER_TAG + value.encode())
        else:
            data = data.replace(placeholder.encode(), value.encode())
    return data


def write_fillers(root: Path, studies: int, per_study: int, per_series: int, folders: int) -> list[dict[str, Any]]:
    """``studies`` studies of ``per_study`` instances under ``root/<folder>/<study>/``; their descriptions."""
    template = _template()
    rng = random.Random(17)
    described = []
    sop = series = 0
    for k in range(studies):
        date = f"2023{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        folder = root / f"{k % folders}" / f"{k:05d}"
        folder.mkdir(parents=True)
        for i in range(per_study):
            if i % per_series == 0:
                series += 1
            sop += 1
            (folder / f"{i:04d}.dcm").write_bytes(_fill(template, _values(k, series, sop, i + 1, date)))
        described.append({"patient": f"SERVE-P{k:05d}", "instances": per_study, "date": date})
    return described


def produce_filler_events(cfg: Any, root: Path) -> tuple[int, float]:
    """One InstanceArrived event per file under ``root`` to dicom.instances; (events, seconds)."""
    from diana.clients import kafka_producer
    from diana.producers.header import read_header
    from diana.schemas.codec import default_codec

    t0 = time.monotonic()
    template = _template()
    header = read_header(template)
    # Everything but the time of arrival, as text: the replacements apply to the header JSON and fields alike.
    text = json.dumps(
        {
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            **header.fields,
            "landing_path": f"bench-fill/{_SOP}.dcm",
            "landing_uri": f"file:///bench-fill/{_SOP}.dcm",
            "source": "IMPORT",
            "calling_ae": "BENCH",
            "called_ae": "DIANA",
        }
    )
    # Instance Number in the header JSON and fields is a number, not the file's padded string.
    text_number = [(f'"{_NUMBER}"', None), (f"[{_NUMBER}]", None), (f": {_NUMBER}", None)]
    if not any(pattern in text for pattern, _ in text_number):
        raise RuntimeError("the template event's Instance Number is not where the filler expects it")
    codec = default_codec()
    producer = kafka_producer(cfg.kafka, {"acks": "all", "linger.ms": 20, "batch.size": 1_000_000})
    count = 0
    received_at = datetime.now(UTC)
    for path in sorted(root.rglob("*.dcm")):
        data = path.read_bytes()
        study, series, sop = _uids_of(path, data)
        number = int(path.stem) + 1
        filled = text
        date = _date_of(data)
        # The event's study_date field is ISO (2023-12-31); its header JSON has the DICOM DA.
        filled = filled.replace(_DATE_ISO, f"{date[:4]}-{date[4:6]}-{date[6:]}")
        for placeholder, value in _values(study, series, sop, number, date):
            if placeholder == _NUMBER:
                for pattern, _ in text_number:
                    filled = filled.replace(pattern, pattern.replace(_NUMBER, str(number)))
            else:
                filled = filled.replace(placeholder, value)
        event = json.loads(filled) | {
            "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "received_at": received_at,
        }
        produce_instance_event(producer, codec, event)
        count += 1
    if producer.flush(120) > 0:
        raise RuntimeError("filler events not acknowledged")
    return count, time.monotonic() - t0


def _uids_of(path: Path, data: bytes) -> tuple[int, int, int]:
    """The study, series and SOP numbers the filler put in ``data`` (read back from its UIDs)."""
    numbers = []
    for kind, width in _WIDTH.items():
        marker = f"{_ROOT}.{kind}.1".encode()
        at = data.index(marker) + len(marker)
        numbers.append(int(data[at : at + width]))
    return numbers[0], numbers[1], numbers[2]


def _date_of(data: bytes) -> str:
    """The filler's Study Date: (0008,0020) DA, 8 characters."""
    tag = b"\x08\x00\x20\x00DA\x08\x00"
    at = data.index(tag) + len(tag)
    return data[at : at + 8].decode()


def send_folders(folders: list[Path], port: int, aec: str) -> float:
    """dcmtk storescu, one association per folder (``+sd +r``: no file list on the command line)."""
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            ["storescu", "-ta", "900", "+sd", "+r", "-aec", aec, "127.0.0.1", str(port), str(folder)],
            env=DCMTK,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu to port {port} failed: {err.decode()[-500:]}")
    return time.monotonic() - started
