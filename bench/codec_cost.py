"""CPU cost per InstanceArrived of the codec (schemas/codec.py): whole records, a projection, the field decoder.

    python -m bench.codec_cost [--repeat 3000]

Prints a Markdown table: decode (whole record, through a projection to every field but the
header, and the aggregates worker's FieldDecoder of the fields it reads, schemas/field_decoder.py) and encode, for events whose header_json holds 0, 150 and 3,000 elements.
CPU time (time.process_time), so a busy machine slows it less than wall time would.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

from diana.schemas.codec import Codec
from diana.schemas.field_decoder import FieldDecoder
from diana.stream_apps.aggregates import INSTANCE_FIELDS_READ


def _event(elements: int) -> dict:
    header = {f"{i:08X}": {"vr": "LO", "Value": ["x" * 20]} for i in range(elements)}
    return {
        "sop_instance_uid": "1.2.826.0.1.3680043.10.1234.3.12345",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.826.0.1.3680043.10.1234.1.1",
        "series_instance_uid": "1.2.826.0.1.3680043.10.1234.2.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": 526_000,
        "sha256": "ab" * 32,
        "landing_path": "ab/abab.dcm",
        "received_at": datetime(2024, 3, 15, 10, 0, 0, 123000, tzinfo=UTC),
        "source": "C_STORE",
        "instance_number": 7,
        "modality": "CT",
        "header_json": json.dumps(header) if elements else None,
    }


def _cpu_us(call: Callable[[], object], repeat: int) -> float:
    started = time.process_time()
    for _ in range(repeat):
        call()
    return (time.process_time() - started) / repeat * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.codec_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3000, help="calls per figure")
    args = ap.parse_args(argv)
    codec = Codec()
    # The projection's point: every field but the header, whose bytes are then skipped, not built.
    without_header = [f.name for f in codec.schema("InstanceArrived").fields if f.name != "header_json"]
    projected = Codec({"InstanceArrived": without_header})
    fields = FieldDecoder(codec, "InstanceArrived", INSTANCE_FIELDS_READ)
    rows: dict[str, list[str]] = {
        k: [] for k in ("decode", "decode projection", "field decoder (aggregates)", "encode")
    }
    sizes = []
    for elements in (0, 150, 3000):
        event = _event(elements)
        data = codec.encode("InstanceArrived", event)
        sizes.append(f"{len(data) / 1000:.1f} KB")
        rows["decode"].append(f"{_cpu_us(lambda d=data: codec.decode(d), args.repeat):.0f} µs")
        rows["decode projection"].append(f"{_cpu_us(lambda d=data: projected.decode(d), args.repeat):.0f} µs")
        rows["field decoder (aggregates)"].append(f"{_cpu_us(lambda d=data: fields.decode(d), args.repeat):.0f} µs")
        rows["encode"].append(f"{_cpu_us(lambda e=event: codec.encode('InstanceArrived', e), args.repeat):.0f} µs")
    print("| | " + " | ".join(sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
