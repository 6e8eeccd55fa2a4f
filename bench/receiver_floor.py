"""The receiver's floor: pynetdicom alone, then with the contract's durable steps, and nothing else.

    python -m bench.receiver_floor --port 21115 --folder /tmp/floor --steps bare|fsync|kafka|parse|header [--bootstrap HOST:PORT] [--processes N]

An SCP set up as the diana-star receiver sets pynetdicom up (data sets written to a file as their
fragments arrive, the reactor wake-ups of producers/reactor.py, the receiver's negotiation, TCP_NODELAY,
the same maximum PDU, N processes sharing the port as ``[receiver] processes`` does), whose C-STORE handler does only the named steps and answers success:

- ``bare``: the received file is renamed into the folder (no fsync, no header, no event): what
  pynetdicom itself costs per instance;
- ``fsync``: the received file is fsync'd, hard-linked into the folder and the folder fsync'd, as the
  landing store does (producers/spill.py, producers/landing.py): pynetdicom plus the disk's share of
  "success only when nothing can be lost";
- ``kafka``: ``fsync``, then a 1 KB message produced with the receiver's producer settings (acks=all,
  idempotent, linger 0, Nagle off) and its delivery report awaited: pynetdicom plus every wait the
  contract requires;
- ``parse``: ``kafka``, and first the data set parsed by pydicom up to its pixel data and its four
  identifying UIDs read: the least a receiver must do before it may answer (a C-STORE whose data set
  cannot be parsed, or whose UIDs are missing, gets an error status, not success);
- ``header``: ``kafka``, and first the header read with the receiver's own reader
  (producers/header.py: ``parse``, the UIDs validated, the search fields, the DICOM JSON the event
  carries). No Avro, no metrics, no logs, no bookkeeping: the real receiver cannot be cheaper.

bench.ingest runs them all beside storescp over one association, in the same run as its targets:
a target that even a floor misses is out of reach with this library, this disk and this broker.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

STEPS = ("bare", "fsync", "kafka", "parse", "header")
# The floor under the targets: the least a receiver on pynetdicom and pydicom may do before success.
STRICT = "parse"
# The steps that end with the broker's acknowledgement.
_PUBLISHING = ("kafka", "parse", "header")
TOPIC = "bench-floor"
# Below an InstanceArrived event (its DICOM JSON header alone is several KB): a floor, not a model.
PAYLOAD = b"x" * 1024


def _create_topic(bootstrap: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(TOPIC, 3, 1)]).values():
        try:
            future.result()
        except Exception as exc:  # a second floor run in the same stack finds it there
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def _producer(bootstrap: str):
    from confluent_kafka import Producer

    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 0,
            "socket.nagle.disable": True,
        }
    )


def serve(port: int, folder: Path, steps: str, bootstrap: str | None, max_pdu: int, shared: bool) -> None:
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
    from pynetdicom.sop_class import Verification
    from pynetdicom.transport import ThreadedAssociationServer

    from diana.producers.workers import LeastLoadedAccept

    # Not producers/workers.SharedPortServer: that one carries the transport guard (GuardedServer),
    # which is the receiver's own code; the floor keeps pynetdicom's server, with the port shared
    # and each connection given to the worker with the fewest, as the receiver's workers do.
    class SharedPort(LeastLoadedAccept, ThreadedAssociationServer):
        pass

    import pydicom

    from diana.producers import negotiation, reactor
    from diana.producers.header import read_header_file

    landed = folder / "landed"
    incoming = folder / "incoming"
    landed.mkdir(parents=True, exist_ok=True)
    incoming.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(incoming)  # the same filesystem as the folder: a link, not a copy
    _config.STORE_RECV_CHUNKED_DATASET = True
    negotiation.install()
    reactor.install()
    producer = _producer(bootstrap) if steps in _PUBLISHING else None
    folder_fd = os.open(landed, os.O_RDONLY | os.O_DIRECTORY)
    counter = iter(range(1 << 62))
    pid = os.getpid()

    def handle_store(event: evt.Event) -> int:
        source = event.request._dataset_file
        target = landed / f"{pid}-{next(counter)}.dcm"
        if steps == "bare":
            os.rename(source.name, target)
            return 0x0000
        if steps == "parse":
            ds = pydicom.dcmread(source.name, stop_before_pixels=True)
            if not all(ds.get(k) for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")):
                return 0xA900
        elif steps == "header":
            read_header_file(Path(source.name), scratch_dir=incoming)
        os.fsync(source.fileno())
        os.link(source.name, target)
        os.fsync(folder_fd)
        if producer is not None:
            acknowledged = threading.Event()
            failure: list[object] = []

            def delivered(err: object, _msg: object) -> None:
                if err is not None:
                    failure.append(err)
                acknowledged.set()

            producer.produce(TOPIC, PAYLOAD, key=target.name.encode(), on_delivery=delivered)
            while not acknowledged.is_set():
                producer.poll(0.05)
            if failure:
                return 0xA700
        return 0x0000

    def on_open(event: evt.Event) -> None:
        reactor.fast_reactor(event.assoc.dul)
        sock = event.assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title="FLOOR")
    ae.maximum_pdu_size = max_pdu
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_C_STORE, handle_store), (evt.EVT_CONN_OPEN, on_open)]
    server = ae.make_server(
        ("127.0.0.1", port), evt_handlers=handlers, server_class=SharedPort if shared else ThreadedAssociationServer
    )
    server.serve_forever()


def start_floor(
    folder: Path, port: int, steps: str, bootstrap: str | None = None, max_pdu: int = 1048576, processes: int = 1
) -> subprocess.Popen:
    """The floor SCP as a process of its own (bench.ingest reads its CPU time, its workers' included, from /proc)."""
    command = [sys.executable, "-m", "bench.receiver_floor", "--port", str(port), "--folder", str(folder)]
    command += ["--steps", steps, "--max-pdu", str(max_pdu), "--processes", str(processes)]
    if bootstrap:
        command += ["--bootstrap", bootstrap]
    return subprocess.Popen(
        command, cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.receiver_floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1); AE title FLOOR")
    ap.add_argument("--folder", type=Path, required=True, help="where received files go (incoming/, landed/)")
    ap.add_argument("--steps", choices=STEPS, default="bare", help="what the handler does (module docstring)")
    ap.add_argument("--bootstrap", help="Kafka bootstrap servers (--steps kafka)")
    ap.add_argument("--max-pdu", type=int, default=1048576, help="maximum PDU (the receiver's default)")
    ap.add_argument("--processes", type=int, default=1, help="processes sharing the port (as the receiver's workers)")
    args = ap.parse_args(argv)
    if args.steps in _PUBLISHING:
        if not args.bootstrap:
            ap.error(f"--steps {args.steps} needs --bootstrap HOST:PORT")
        _create_topic(args.bootstrap)
    if args.processes <= 1:
        serve(args.port, args.folder, args.steps, args.bootstrap, args.max_pdu, shared=False)
        return 0
    from diana.producers.workers import run_workers  # the receiver's own forking, PDEATHSIG included

    run_workers(
        args.processes,
        lambda _: serve(args.port, args.folder, args.steps, args.bootstrap, args.max_pdu, True),
        address=("127.0.0.1", args.port),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
