"""Time each OpenSearch request of one `diana reindex --kinds instances` run (the transport wrapped, not mocked).

usage: python docs/bench/ingest-stop36/reindex-requests.py CONFIG [ENV=VALUE...]
Prints each request's start and end in ms from the process's start, then the exit.
"""

import os
import sys
import time

START = time.perf_counter()
for assignment in sys.argv[2:]:
    name, _, value = assignment.partition("=")
    os.environ[name] = value

from opensearchpy import Transport  # noqa: E402

original = Transport.perform_request
requests: list[tuple[str, str, float, float]] = []


def timed(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    try:
        return original(self, method, url, *args, **kwargs)
    finally:
        requests.append((method, url.split("?")[0], began - START, time.perf_counter() - START))


Transport.perform_request = timed  # type: ignore[method-assign]

from diana.cli import main  # noqa: E402

try:
    main(["--config", sys.argv[1], "reindex", "--kinds", "instances", "--no-progress", "--delete-old"])
finally:
    bulks = [r for r in requests if r[1].endswith("_bulk")]
    for method, url, began, ended in requests:
        if not url.endswith("_bulk"):
            print(f"{began * 1000:7.0f} {ended * 1000:7.0f} {(ended - began) * 1000:6.0f} ms  {method} {url}")
    if bulks:
        print(f"{bulks[0][2] * 1000:7.0f} {bulks[-1][3] * 1000:7.0f}  {len(bulks)} bulk requests")
    print(f"{(time.perf_counter() - START) * 1000:7.0f} end")
