"""The Avro schemas' former versions kept in schemas/ (name.vN.avsc), as writers and readers of the
releases before would use them: for the unit tests of upgrade order and schema resolution."""

from __future__ import annotations

import io
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import diana.schemas.codec as codec_module
from diana.schemas.codec import MAGIC, Codec

SCHEMAS = Path(codec_module.__file__).parent  # the .avsc files the codec reads

# A DoseAlert as the dose worker raises it (revision 1, no withdrawal).
DOSE_ALERT: dict[str, Any] = {
    "alert_id": "a1",
    "revision": 1,
    "raised_at": datetime(2024, 3, 15, tzinfo=UTC),
    "rule": "CT abdomen study DLP",
    "rule_type": "reference_level",
    "metric": "dlp_mGycm",
    "value": 1200.0,
    "threshold": 1000.0,
    "study_instance_uid": "1.2.3",
    "message": "CT abdomen study DLP: study dlp_mGycm 1200 exceeds 1000",
}


def write_with(version_file: str, record: dict) -> bytes:
    """``record`` as a writer of the kept former schema ``version_file`` put it on the wire."""
    import avro.io
    import avro.schema

    writer = avro.schema.parse((SCHEMAS / version_file).read_text())
    buf = io.BytesIO()
    buf.write(MAGIC + writer.fingerprint("CRC-64-AVRO"))
    fields = {f.name for f in writer.fields}
    avro.io.DatumWriter(writer).write({k: v for k, v in record.items() if k in fields}, avro.io.BinaryEncoder(buf))
    return buf.getvalue()


def read_as(data: bytes, writer_file: str, reader_file: str) -> dict:
    """The single-object message ``data`` (written with ``writer_file``) as a reader holding ``reader_file``
    reads it by schema resolution alone."""
    import fastavro

    writer, reader = (
        fastavro.parse_schema(json.loads((SCHEMAS / name).read_text()), named_schemas={})
        for name in (writer_file, reader_file)
    )
    return fastavro.schemaless_reader(io.BytesIO(data[10:]), writer, reader)


def codec_of_release_before(folder: Path, version_file: str) -> Codec:
    """The real Codec of the release whose current schema was ``version_file`` (e.g. dose_alert.v2.avsc):
    built in ``folder`` from every current file, with ``name.avsc`` as that version and the versions from
    it on not kept yet."""
    name, number = re.fullmatch(r"(.+)\.v(\d+)\.avsc", version_file).groups()
    later = re.compile(rf"{re.escape(name)}(\.v(\d+))?\.avsc")
    for path in SCHEMAS.glob("*.avsc"):
        match = later.fullmatch(path.name)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(number)):
            shutil.copy(path, folder / path.name)
    shutil.copy(SCHEMAS / version_file, folder / f"{name}.avsc")
    return Codec(schema_dir=folder)
