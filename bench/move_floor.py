"""The floor under C-MOVE's "within 2× of storescp" target: how fast can pynetdicom alone send a series?

C-MOVE of a series is, on the wire, one association of C-STOREs toward the destination. This bench
sends the same files to the same dcmtk ``storescp`` in one run, without any archive, index or C-MOVE:

- ``storescu``: dcmtk's storescu, one association (the reference of bench.serve);
- ``pynetdicom``: a pynetdicom 3 SCU sending each file by path, streamed from the file as our C-MOVE
  does (``STORE_SEND_CHUNKED_DATASET``), with the handlers of diana-star's outbound associations
  (Nagle off, the sender-side response queue: diana/outbound_association.py);
- ``pynetdicom, datasets in memory``: the same with the files read beforehand (pydicom datasets that
  pynetdicom encodes), no file read during the send;
- ``pynetdicom, no reactor sleep``: ``pynetdicom`` with the zero-sleep DUL loop diana-star's C-MOVE
  sub-associations use (producers/reactor.py ``fast_requestor``).

Each mode runs ``--repeats`` times, the modes interleaved so that every one sees the same load;
the median is reported, and its ratio to storescu's median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.ingest import send, start_storescp, wait_for_echo
from tests.support.dicomgen import make_instance

PORT = 28213


def write_series(folder: Path, n: int, rows: int) -> list[Path]:
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        ds = make_instance(study, series, i + 1, patient_id="FLOOR", study_date="20240102", rows=rows)
        path = folder / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def pynetdicom_send(files: list[Path], port: int, items: list[Any], fast: bool) -> float:
    """Seconds to send ``items`` (paths or datasets) over one pynetdicom association to storescp."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config, evt

    from diana.outbound_association import outbound_association_handlers
    from diana.producers import reactor

    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = read_file_meta_info(files[0])
    ae = AE(ae_title="FLOOR")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    t0 = time.perf_counter()
    handlers = outbound_association_handlers()
    if fast:
        reactor.install()  # process-wide, but changes only acceptors and the associations given fast_reactor
        handlers.append((evt.EVT_CONN_OPEN, reactor.fast_requestor))
    assoc = ae.associate("127.0.0.1", port, ae_title="ANY", evt_handlers=handlers)
    if not assoc.is_established:
        raise RuntimeError("no association with storescp")
    failed = 0
    for item in items:
        status = assoc.send_c_store(item)
        if getattr(status, "Status", None) != 0:
            failed += 1
    assoc.release()
    wall = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"{failed} C-STOREs failed")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.move_floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=1000, help="CT instances in the series (default 1000)")
    ap.add_argument("--rows", type=int, default=256, help="rows and columns of each 16-bit slice (default 256)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each mode, interleaved (default 3)")
    ap.add_argument("--port-offset", type=int, default=0, help="add this to storescp's port (default 28213)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    from pydicom import dcmread

    port = PORT + args.port_offset
    with tempfile.TemporaryDirectory(prefix="diana-move-floor-") as tmp:
        work = Path(tmp)
        files = write_series(work / "series", args.instances, args.rows)
        datasets = [dcmread(f) for f in files]
        scp = start_storescp(work, port)
        try:
            if not wait_for_echo("ANY", port):
                raise RuntimeError("storescp did not start")
            modes: dict[str, Callable[[], float]] = {
                "storescu": lambda: send(files, port, "ANY", 1),
                "pynetdicom, files by path": lambda: pynetdicom_send(files, port, files, fast=False),
                "pynetdicom, datasets in memory": lambda: pynetdicom_send(files, port, datasets, fast=False),
                "pynetdicom, files by path, no reactor sleep": lambda: pynetdicom_send(files, port, files, fast=True),
            }
            runs: dict[str, list[float]] = {name: [] for name in modes}
            for number in range(args.repeats):
                for name, run in modes.items():
                    runs[name].append(run())
                    # storescp writes every object it receives: empty its folder between runs.
                    for f in (work / "storescp").iterdir():
                        f.unlink()
                print(f"run {number + 1}: " + ", ".join(f"{n} {r[-1]:.2f} s" for n, r in runs.items()), flush=True)
        finally:
            scp.terminate()
            scp.wait(10)
    floor = statistics.median(runs["storescu"])
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_at_end": os.getloadavg(),
        "instances": args.instances,
        "rows": args.rows,
        "modes": {
            name: {
                "median_s": round(statistics.median(r), 3),
                "runs_s": [round(x, 3) for x in r],
                "inst_per_s": round(args.instances / statistics.median(r), 1),
                "x_storescu": round(statistics.median(r) / floor, 2),
            }
            for name, r in runs.items()
        },
    }
    print("| sender → storescp | median s | inst/s | × storescu | runs s |")
    print("|---|---:|---:|---:|---|")
    for name, m in result["modes"].items():
        print(f"| {name} | {m['median_s']} | {m['inst_per_s']} | {m['x_storescu']} | {m['runs_s']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
