"""The C-MOVE stall of issue 17 in a focused loop: does a sub-association lose a C-STORE response under load?

Each loop opens one association to a C-STORE SCP (dcmtk ``storescp``, started here) the way a C-MOVE
opens its sub-association (``access/qr/sub_association.py``'s handlers), and sends ``--objects`` small CT
objects from a non-main thread, as the Q/R SCP's association thread does, while ``--busy`` threads keep
the interpreter busy (a loaded receiver). A loop stalls when a response never comes (DIMSE timeout
``--timeout``): pynetdicom's reactor thread took it ("Received unexpected C-STORE service message").
``--stock`` sets Nagle off only, as before the fix, so the two can be compared.

    python -m bench.move_stall --seconds 300            # with the fix
    python -m bench.move_stall --seconds 300 --stock    # as before it
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from diana.access.qr.sub_association import sub_association_handlers


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.unexpected = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.unexpected += "unexpected" in record.getMessage()


def _nagle_off_only(event: evt.Event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _one_loop(port: int, objects: int, timeout: float, handlers: list[tuple[Any, Any]]) -> int:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ae = AE(ae_title="DIANA")
    ae.dimse_timeout = timeout
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP", evt_handlers=handlers)
    if not assoc.is_established:
        raise SystemExit(f"storescp on port {port} did not accept the association")
    sent = 0
    for _ in range(objects):
        ds.SOPInstanceUID = generate_uid()
        if getattr(assoc.send_c_store(ds), "Status", None) != 0x0000:
            break
        sent += 1
    if assoc.is_established:
        assoc.release()
    return sent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=28150, help="port for the storescp started here (default 28150)")
    ap.add_argument("--objects", type=int, default=300, help="C-STOREs per association (default 300)")
    ap.add_argument("--busy", type=int, default=3, help="threads keeping the interpreter busy (default 3)")
    ap.add_argument("--seconds", type=float, default=300, help="run loops for this long (default 300)")
    ap.add_argument("--timeout", type=float, default=10, help="DIMSE timeout: a loop stalled after it (default 10)")
    ap.add_argument("--stock", action="store_true", help="Nagle off only, without the fix (as before it)")
    args = ap.parse_args(argv)
    if shutil.which("storescp") is None:
        raise SystemExit("dcmtk's storescp is needed: apt-get install dcmtk")
    count = _Count()
    logging.getLogger("pynetdicom").addHandler(count)
    handlers = [(evt.EVT_CONN_OPEN, _nagle_off_only)] if args.stock else sub_association_handlers()
    stop = threading.Event()

    def keep_busy() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    for _ in range(args.busy):
        threading.Thread(target=keep_busy, daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="move-stall-") as out:
        scp = subprocess.Popen(["storescp", "--fork", "--ignore", "-od", out, str(args.port)])
        try:
            time.sleep(1)
            loops: list[int] = []
            started = time.monotonic()
            while time.monotonic() - started < args.seconds:
                before = len(loops)
                sender = threading.Thread(
                    target=lambda: loops.append(_one_loop(args.port, args.objects, args.timeout, handlers))
                )
                sender.start()
                sender.join()
                if len(loops) == before:  # the sending thread died
                    loops.append(0)
                print(f"loop {len(loops)}: {loops[-1]} of {args.objects} sent, {time.monotonic() - started:.0f} s")
        finally:
            stop.set()
            scp.terminate()
            scp.wait(10)
    stalled = sum(1 for sent in loops if sent < args.objects)
    print(
        f"{'stock' if args.stock else 'fixed'}: {stalled} of {len(loops)} loops stalled; {sum(loops)} C-STOREs; "
        f"{count.unexpected} responses taken by the reactor thread; {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
