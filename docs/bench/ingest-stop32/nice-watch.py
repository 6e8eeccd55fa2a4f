"""Experiment: every 0.3 s, put every thread of the indexing path (OpenSearch, aggregator, sinks) at nice N."""

import os
import sys
import time

N = int(sys.argv[1])


def indexing(cmd: bytes) -> bool:
    if b"org.opensearch.bootstrap.OpenSearch" in cmd:
        return True
    return b"diana.cli" in cmd and (b"\0aggregate" in cmd or b"\0sink\0" in cmd)


while True:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            if not indexing(cmd):
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                if os.getpriority(os.PRIO_PROCESS, int(tid)) != N:
                    os.setpriority(os.PRIO_PROCESS, int(tid), N)
        except (OSError, ValueError):
            pass
    time.sleep(0.3)
