"""CPU of the archive sink's placement of landed objects, without Kafka: ``ArchiveSink.archive_one``
over ``--ct`` objects of 0.5 MB (one series) and ``--dx`` of 100 kB (three series), landed first
(fsync'd, as the receiver leaves them) into a landing folder beside the archive under ``--work``.

    python -m bench.archive_place --work /tmp/archive-place [--ct 1000] [--dx 300] [--runs 3] [--profile]

Each run starts from a fresh landing folder and archive; the CPU (user, system) and wall time of
the placements alone are printed, then with ``--profile`` the top functions of one more run by
own time (cProfile roughly doubles the Python part). The corpus is random bytes: the sink never
parses an object, it verifies the event's SHA-256, hard-links and removes the landing copy.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import time
from pathlib import Path

CT_BYTES = 525_000  # a 512 x 512 x 16-bit slice and its header
DX_BYTES = 100_000


def _landed_events(work: Path, ct: int, dx: int) -> list[dict]:
    from diana.producers.landing import LandingStore

    landing = LandingStore(work / "landing")
    events = []
    for i in range(ct + dx):
        stored = landing.put(os.urandom(CT_BYTES if i < ct else DX_BYTES))
        series = "1.2.3.4" if i < ct else f"1.2.3.5.{i % 3}"
        events.append(
            {
                "study_instance_uid": "1.2.3",
                "series_instance_uid": series,
                "sop_instance_uid": f"{series}.{i}",
                "sha256": stored.sha256,
                "landing_uri": stored.uri,
            }
        )
    os.sync()  # the landing writes' own I/O is not counted in the placements
    return events


def run_once(work: Path, ct: int, dx: int, profile: cProfile.Profile | None = None) -> dict[str, float]:
    from diana.sinks.archive import ArchiveSink

    shutil.rmtree(work, ignore_errors=True)
    events = _landed_events(work, ct, dx)
    sink = ArchiveSink(work / "landing", work / "archive")
    before, started = os.times(), time.perf_counter()
    if profile is not None:
        profile.enable()
    outcomes = [sink.archive_one(event) for event in events]
    if profile is not None:
        profile.disable()
    wall, after = time.perf_counter() - started, os.times()
    assert outcomes == ["written"] * len(events), "every object placed once"
    return {"user_s": after.user - before.user, "system_s": after.system - before.system, "wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.archive_place", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (emptied), on the archive's disk")
    parser.add_argument("--ct", type=int, default=1000, help="objects of 0.5 MB (default 1000)")
    parser.add_argument("--dx", type=int, default=300, help="objects of 100 kB (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs (default 3)")
    parser.add_argument("--profile", action="store_true", help="then one run under cProfile: top functions")
    args = parser.parse_args(argv)
    count = args.ct + args.dx
    for run in range(1, args.runs + 1):
        r = run_once(args.work, args.ct, args.dx)
        cpu = r["user_s"] + r["system_s"]
        print(
            f"run {run}: {count} objects, CPU {cpu:.3f} s (user {r['user_s']:.2f}, system {r['system_s']:.2f})"
            f" = {cpu / count * 1e3:.3f} ms each; wall {r['wall_s']:.3f} s"
        )
    if args.profile:
        profile = cProfile.Profile()
        run_once(args.work, args.ct, args.dx, profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
