"""The C-MOVE stall of issue 17 in a focused loop: does a sub-association lose a C-STORE response under load?

Each loop opens one association to a C-STORE SCP (dcmtk ``storescp``, started here) the way a C-MOVE
opens its sub-association (``diana/outbound_association.py``'s handlers), and sends ``--objects`` small CT
objects from a non-main thread, as the Q/R SCP's association thread does, while ``--busy`` threads keep
the interpreter busy (a loaded receiver). A loop stalls when a response never comes (DIMSE timeout
``--timeout``): pynetdicom's reactor thread took it ("Received unexpected C-STORE service message").
``--stock`` sets Nagle off only, as before the fix, so the two can be compared.

``--service find``: the same for a collect job's C-FIND to a PACS (producers/pacs_pull/scu.py): each
loop opens a fresh association to a pynetdicom C-FIND SCP (another process, started here, answering
one match at once), sends one study-level C-FIND and releases, as ``PacsClient.find_studies`` does; a
loop stalls when the final response never comes.

    python -m bench.move_stall --seconds 300            # with the fix
    python -m bench.move_stall --seconds 300 --stock    # as before it
    python -m bench.move_stall --service find --seconds 300 [--stock]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from diana.outbound_association import outbound_association_handlers


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


def _find_scp(port: int) -> None:
    """A C-FIND SCP answering every query with one match at once (run in its own process)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    def on_find(event: evt.Event) -> Any:
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = "1.2.3.4"
        yield 0xFF00, match

    ae = AE(ae_title="PACS")
    ae.add_supported_context(FIND)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_FIND, on_find)])


def _one_find_loop(port: int, finds: int, timeout: float, handlers: list[tuple[Any, Any]]) -> int:
    """``finds`` C-FINDs, each on an association of its own (as PacsClient does); how many got their final answer."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    answered = 0
    for _ in range(finds):
        ae = AE(ae_title="DIANA-COLLECT")
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
        ae.add_requested_context(FIND)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS", evt_handlers=handlers)
        if not assoc.is_established:
            raise SystemExit(f"the C-FIND SCP on port {port} did not accept the association")
        final = [status for status, _ in assoc.send_c_find(query, FIND) if status.get("Status") == 0x0000]
        if assoc.is_established:
            assoc.release()
        if not final:
            break
        answered += 1
    return answered


def _wait_listening(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on port {port} after {seconds:.0f} s") from None
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=28150, help="port for the storescp started here (default 28150)")
    ap.add_argument("--objects", type=int, default=300, help="C-STOREs per association (default 300)")
    ap.add_argument("--busy", type=int, default=3, help="threads keeping the interpreter busy (default 3)")
    ap.add_argument("--seconds", type=float, default=300, help="run loops for this long (default 300)")
    ap.add_argument("--timeout", type=float, default=10, help="DIMSE timeout: a loop stalled after it (default 10)")
    ap.add_argument("--stock", action="store_true", help="Nagle off only, without the fix (as before it)")
    ap.add_argument(
        "--fast-reactor",
        action="store_true",
        help="with the fix, and the zero-sleep DUL loop a C-MOVE sub-association has (producers/reactor.py)",
    )
    ap.add_argument(
        "--service",
        choices=("store", "find"),
        default="store",
        help="store: C-STOREs on one association, as a C-MOVE (default); find: one C-FIND per association, "
        "--objects of them per loop, as a collect job",
    )
    ap.add_argument("--find-scp", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the SCP's own process
    args = ap.parse_args(argv)
    if args.find_scp:
        _find_scp(args.find_scp)
        return
    if args.service == "store" and shutil.which("storescp") is None:
        raise SystemExit("dcmtk's storescp is needed: apt-get install dcmtk")
    count = _Count()
    logging.getLogger("pynetdicom").addHandler(count)
    handlers = [(evt.EVT_CONN_OPEN, _nagle_off_only)] if args.stock else outbound_association_handlers()
    if args.fast_reactor:
        from diana.producers import reactor

        reactor.install()
        handlers.append((evt.EVT_CONN_OPEN, reactor.fast_requestor))
    stop = threading.Event()

    def keep_busy() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    for _ in range(args.busy):
        threading.Thread(target=keep_busy, daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="move-stall-") as out:
        if args.service == "store":
            scp = subprocess.Popen(["storescp", "--fork", "--ignore", "-od", out, str(args.port)])
            one_loop = _one_loop
        else:
            scp = subprocess.Popen([sys.executable, "-m", "bench.move_stall", "--find-scp", str(args.port)])
            one_loop = _one_find_loop
        try:
            _wait_listening(args.port)
            loops: list[int] = []
            started = time.monotonic()
            while time.monotonic() - started < args.seconds:
                before = len(loops)
                sender = threading.Thread(
                    target=lambda: loops.append(one_loop(args.port, args.objects, args.timeout, handlers))
                )
                sender.start()
                sender.join()
                if len(loops) == before:  # the sending thread died
                    loops.append(0)
                print(f"loop {len(loops)}: {loops[-1]} of {args.objects} answered, {time.monotonic() - started:.0f} s")
        finally:
            stop.set()
            scp.terminate()
            scp.wait(10)
    stalled = sum(1 for sent in loops if sent < args.objects)
    what = "C-STOREs" if args.service == "store" else "C-FINDs (one association each)"
    print(
        f"{'stock' if args.stock else 'fixed'}{', fast reactor' if args.fast_reactor else ''}: {stalled} of {len(loops)} loops stalled; {sum(loops)} {what}; "
        f"{count.unexpected} responses taken by the reactor thread; {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
