"""How connections opened at once are spread over the receiver's worker processes.

    python -m bench.worker_spread --trials 100                 # the receiver's way (producers/workers.py)
    python -m bench.worker_spread --trials 300 --so-reuseport  # each worker binding with SO_REUSEPORT

Starts ``--workers`` processes sharing one port, opens ``--connections`` connections at the same moment
(``--trials`` times, each time waiting until all are accepted, then closing them) and counts the splits:
how many trials gave 2/2, 1/3, 0/4 with the defaults.

- default: the floor SCP of ``bench.receiver_floor --steps bare`` (pynetdicom, the receiver's
  ``LeastLoadedAccept`` over one socket the parent bound), the connections DICOM associations;
- ``--so-reuseport``: plain sockets, each worker binding the port with SO_REUSEPORT and accepting, as
  the receiver's workers did before issue 19's stop 24: which worker gets a connection is the kernel's
  hash of the peer's address and port.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

_ESTABLISHED, _LISTEN = "01", "0A"  # the state column of /proc/net/tcp


def _reuseport_worker(port: int, index: int, accepted: multiprocessing.Queue) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its TIME_WAITs do not hold the port
    server.bind(("127.0.0.1", port))
    server.listen(64)
    while True:
        client, _ = server.accept()
        accepted.put(index)
        client.close()


def reuseport_splits(workers: int, connections: int, trials: int, port: int) -> collections.Counter:
    accepted: multiprocessing.Queue = multiprocessing.Queue()
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_reuseport_worker, args=(port, i, accepted), daemon=True) for i in range(workers)]
    for proc in procs:
        proc.start()
    time.sleep(0.5)
    splits: collections.Counter = collections.Counter()
    try:
        for _ in range(trials):
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
            by_worker = collections.Counter(accepted.get(timeout=10) for _ in range(connections))
            splits[_split(by_worker, workers)] += 1
            for client in clients:
                client.close()
    finally:
        for proc in procs:
            proc.kill()
    return splits


def _split(by_worker: collections.Counter, workers: int) -> str:
    return "/".join(str(n) for n in sorted((by_worker.get(i, 0) for i in range(workers)), reverse=True))


def established_connections(pid: int, port: int) -> int:
    """Connections to ``port`` that process ``pid`` holds open (its fds matched to /proc/net/tcp{,6})."""
    inodes = set(_socket_inodes(pid))
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for fields in map(str.split, Path(table).read_text().splitlines()[1:]):
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == _ESTABLISHED and fields[9] in inodes:
                count += 1
    return count


def held_connections(pids: list[int], port: int, total: int, timeout: float = 30.0) -> list[int]:
    """Each process's connections to ``port``, once ``total`` are open in all (an accept or a close
    shows a moment later), or as they are when ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while sum(counts := [established_connections(pid, port) for pid in pids]) != total and time.monotonic() < deadline:
        time.sleep(0.02)
    return counts


def _serving(pid: int, port: int) -> bool:
    """Whether worker ``pid`` accepts: it holds its own descriptor of the listening socket besides the one
    inherited from the parent (``LeastLoadedAccept.server_bind`` takes it)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for fields in map(str.split, Path(table).read_text().splitlines()[1:]):
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == _LISTEN:
                listening.add(fields[9])
    return len([inode for inode in _socket_inodes(pid) if inode in listening]) >= 2


def _socket_inodes(pid: int) -> list[str]:
    inodes = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.append(target[len("socket:[") : -1])
    return inodes


def open_at_once(port: int, ae_title: str, count: int) -> list:
    """``count`` associations (Verification) requested at the same moment, from as many threads; those
    that came back (the caller checks that all did and are established)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="SPREAD")
    ae.add_requested_context(Verification)
    start = threading.Barrier(count)
    opened: list = []

    def open_one() -> None:
        start.wait()
        opened.append(ae.associate("127.0.0.1", port, ae_title=ae_title))

    threads = [threading.Thread(target=open_one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return opened


def receiver_splits(workers: int, connections: int, trials: int, port: int) -> collections.Counter:
    from bench.receiver_floor import start_floor

    folder = Path(tempfile.mkdtemp(prefix="worker-spread-"))
    floor = start_floor(folder, port, "bare", processes=workers)
    splits: collections.Counter = collections.Counter()
    try:
        deadline = time.monotonic() + 30
        while len(children := Path(f"/proc/{floor.pid}/task/{floor.pid}/children").read_text().split()) < workers:
            if floor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor SCP did not start its workers on port {port} (taken? --port)")
            time.sleep(0.2)
        pids = [int(pid) for pid in children]
        while not all(_serving(pid, port) for pid in pids):  # each imports pynetdicom, then listens
            if floor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor SCP's workers did not all listen on port {port}")
            time.sleep(0.2)
        for _ in range(trials):
            opened = open_at_once(port, "FLOOR", connections)
            if len(opened) != connections or not all(a.is_established for a in opened):
                raise RuntimeError("an association was not established")
            counts = held_connections(pids, port, connections)
            if sum(counts) != connections:
                raise RuntimeError(f"{sum(counts)} connections open on port {port}, not {connections}")
            splits[_split(collections.Counter(dict(enumerate(counts))), workers)] += 1
            for association in opened:
                association.release()
            if sum(counts := held_connections(pids, port, 0)):
                raise RuntimeError(f"{sum(counts)} connections still open on port {port}")
    finally:
        floor.terminate()
        floor.wait(30)
    return splits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker_spread", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--connections", type=int, default=4, help="connections opened at once (default 4)")
    ap.add_argument("--trials", type=int, default=100, help="how many times (default 100)")
    ap.add_argument("--port", type=int, default=21180, help="port on 127.0.0.1 (default 21180)")
    ap.add_argument("--so-reuseport", action="store_true", help="plain sockets bound with SO_REUSEPORT instead")
    args = ap.parse_args(argv)
    measure = reuseport_splits if args.so_reuseport else receiver_splits
    started = time.monotonic()
    splits = measure(args.workers, args.connections, args.trials, args.port)
    how = "SO_REUSEPORT (kernel hash)" if args.so_reuseport else "the receiver's shared listener"
    print(f"{args.connections} connections at once over {args.workers} workers, {args.trials} trials, {how}:")
    for split, count in splits.most_common():
        print(f"  {split}: {count}")
    print(f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
