"""Reproduces a librdkafka 2.16.0 abort: an AdminClient asking ``describe_consumer_groups`` every few seconds
(futures read without blocking, as a watch would) dies of an assertion when the broker stops and starts.

    python -m bench.describe_groups_abort --work /tmp/describe-abort [--cycles 3] [--watchers 4] [--interval 5]

Starts a Kafka of its own (ports 31092-31093, under ``--work``), then ``--watchers`` processes that each send a
describe request every ``--interval`` seconds with that request timeout; stops the broker for 12 s every
``--cycles`` times, and prints after each restart which watchers have died and how. The sinks' membership
guard was first written this way and then read the client's statistics instead (diana/group_membership.py,
docs/RELIABILITY.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

_WATCHER = """
import sys, time
from confluent_kafka.admin import AdminClient
admin = AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0})
interval, pending, asked = float(sys.argv[2]), None, 0.0
while True:
    now = time.monotonic()
    if pending is not None and pending.done():
        try:
            pending.result()
        except Exception:
            pass
        pending = None
    if pending is None and now - asked >= interval:
        asked = now
        pending = admin.describe_consumer_groups(["some-group"], request_timeout=interval)["some-group"]
    time.sleep(0.05)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.describe_groups_abort", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder for the broker's data")
    parser.add_argument("--cycles", type=int, default=3, help="broker stops and starts (default 3)")
    parser.add_argument("--watchers", type=int, default=4, help="processes asking (default 4)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between requests (default 5)")
    args = parser.parse_args(argv)
    from diana.compose.local.stack import local_stack
    from diana.config import load_config

    args.work.mkdir(parents=True, exist_ok=True)
    config = args.work / "diana.toml"
    config.write_text(
        f'[kafka]\nbootstrap = "127.0.0.1:31092"\n[stack]\nhome = "{args.work}/stack"\nkafka_port = 31092\n'
        "kafka_controller_port = 31093\nopensearch_port = 31200\nopensearch_transport_port = 31300\n"
    )
    stack = local_stack(load_config(config))
    stack.start_kafka()
    stack.wait_kafka()
    bootstrap = "127.0.0.1:31092"
    # Each watcher's stderr goes to a file of its own: a pipe nobody reads could fill and block it.
    errors = [args.work / f"watcher-{i}.err" for i in range(args.watchers)]
    watchers = [
        subprocess.Popen([sys.executable, "-c", _WATCHER, bootstrap, str(args.interval)], stderr=open(error, "w"))
        for error in errors
    ]
    try:
        for cycle in range(1, args.cycles + 1):
            time.sleep(7)
            stack.stop_kafka()
            time.sleep(12)
            stack.start_kafka()
            stack.wait_kafka()
            time.sleep(3)
            dead = [w for w in watchers if w.poll() is not None]
            print(f"restart {cycle}: {len(dead)} of {len(watchers)} watchers dead", flush=True)
    finally:
        for watcher, error in zip(watchers, errors, strict=True):
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
                print(f"watcher {watcher.pid}: alive at the end")
            else:
                last = error.read_text().strip().splitlines()[-1:]
                print(f"watcher {watcher.pid}: exit {watcher.returncode}: {' '.join(last)}")
        stack.stop_kafka()


if __name__ == "__main__":
    main()
