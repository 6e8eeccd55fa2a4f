"""The receiver's CPU with idle associations open, and over busy ones, by how long its reactors wait.

    python -m bench.reactor_wait --work /tmp/rw --waits 0.001,0.02 --rounds 3

Issue 19, stop 29: each association the receiver accepts has two threads (pynetdicom's DUL reactor
and the association's), and both turned once a millisecond when nothing arrived. producers/reactor.py
now wakes each for what it acts on, and a wait without a signal lasts up to ``_IDLE_WAIT_S``. This
bench starts Kafka (bench.ingest's ports) and, for each wait in turn (0.001 is the turn before the
change in effect: the same wake-ups, but no wait longer than pynetdicom's 1 ms turn), a
``diana receive`` with that wait, whose CPU (its process and its worker processes, /proc) it reads:
- over 5 s with 4 associations open that send nothing (pynetdicom SCU, C-ECHO context);
- while ``--associations`` dcmtk ``storescu`` (4) send ``--ct`` CT instances of 0.5 MB, a share each.
Rounds alternate the waits so that the machine's drift falls on both alike.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from bench.ingest import BENCH_PORTS, REPO, _proc_stats, bench_env, diana_config, send, wait_for_echo
from tests.support.dicomgen import SeriesSpec, make_study

# `diana receive` with producers/reactor.py's idle wait set first (its workers are forked, so inherit it).
_RECEIVE_WITH_WAIT = (
    "import sys; import diana.producers.reactor as reactor; reactor._IDLE_WAIT_S = float(sys.argv[1]); "
    "from diana.cli import main; sys.exit(main(sys.argv[2:]))"
)


def _tree_cpu(pid: int) -> float:
    """CPU seconds so far of ``pid`` and its descendants (the receiver and its worker processes)."""
    return _proc_stats(pid)[0]


def _idle_cpu_percent(pid: int, port: int, associations: int, seconds: float) -> float:
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    opened = [ae.associate("127.0.0.1", port, ae_title="DIANA") for _ in range(associations)]
    try:
        if not all(a.is_established for a in opened):
            raise RuntimeError("the receiver refused an association")
        time.sleep(1)
        before, started = _tree_cpu(pid), time.monotonic()
        time.sleep(seconds)
        return 100 * (_tree_cpu(pid) - before) / (time.monotonic() - started)
    finally:
        for assoc in opened:
            assoc.release()


def _send_cpu(pid: int, port: int, files: list[Path], associations: int) -> tuple[float, float]:
    """Wall and receiver CPU seconds while ``associations`` storescu send ``files`` (a share each)."""
    before = _tree_cpu(pid)
    wall = send(files, port, "DIANA", associations)
    return wall, _tree_cpu(pid) - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    parser.add_argument("--waits", default="0.001,0.02", help="idle waits in seconds, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ct", type=int, default=400, help="CT instances of 0.5 MB sent per measurement")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--associations", type=int, default=4, help="storescu processes sending at once")
    args = parser.parse_args(argv)
    waits = [float(w) for w in args.waits.split(",")]

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    config = diana_config(args.work)
    env = bench_env(config)
    port = BENCH_PORTS["diana"]
    from diana.compose.local.stack import local_stack
    from diana.config import load_config

    stack = local_stack(load_config(config))
    stack.start_kafka()
    receiver: subprocess.Popen | None = None
    try:
        stack.wait_kafka()
        subprocess.run([sys.executable, "-m", "diana.cli", "topics"], env=env, check=True, capture_output=True)
        make_study(args.work / "corpus", [SeriesSpec("CT", "WAIT", args.ct)], rows=512)
        files = sorted((args.work / "corpus").rglob("*.dcm"))
        print(f"{len(files)} CT instances; receiver processes as bench.ingest's; waits {waits}", flush=True)
        for round_ in range(1, args.rounds + 1):
            for wait in waits:
                with open(args.work / "receiver.log", "a") as log:
                    receiver = subprocess.Popen(
                        [sys.executable, "-c", _RECEIVE_WITH_WAIT, str(wait), "receive"],
                        env=env,
                        cwd=REPO,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                if not wait_for_echo("DIANA", port):
                    raise RuntimeError("the receiver did not answer C-ECHO")
                time.sleep(2)
                idle = _idle_cpu_percent(receiver.pid, port, 4, args.idle_seconds)
                time.sleep(1)
                wall, cpu = _send_cpu(receiver.pid, port, files, args.associations)
                print(
                    f"round {round_}, wait {wait * 1000:g} ms: 4 idle associations {idle:.1f} % of a core; "
                    f"{len(files)} CT over {args.associations} associations: wall {wall:.2f} s, receiver CPU {cpu:.2f} s",
                    flush=True,
                )
                receiver.terminate()
                receiver.wait(30)
                receiver = None
                shutil.rmtree(args.work / "landing", ignore_errors=True)
    finally:
        if receiver is not None:
            receiver.kill()
        stack.stop_kafka()
    return 0


if __name__ == "__main__":
    sys.exit(main())
