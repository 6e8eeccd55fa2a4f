"""The WADO-RS series body alone: server CPU per retrieval under each HTTP stack uvicorn can run.

diana-star's WADO-RS rate is measured against Orthanc by ``bench.serve``, with the index query, the
archive and the client around it. This bench isolates what the server spends sending the body: the
same ``multipart_dicom`` body of ``--instances`` files of ``--size`` bytes from a filesystem archive,
served by one uvicorn process per stack, fetched in turns by the same client as bench.serve's
(requests, 1 MiB reads), ``--rounds`` times. Reported per stack: the server process's CPU seconds
(user + system, from /proc) per retrieval, and the median wall time. CPU per retrieval is the
figure to compare: it moves much less with the machine's load than wall time does.

Stacks: ``h11/asyncio`` (uvicorn's pure-Python parser and the standard loop) and
``httptools/uvloop`` (what uvicorn's "auto" picks when both are installed, as setup.cfg makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

APP = """
from pathlib import Path
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route
from diana.access.dicomweb.wado import multipart_dicom
from diana.storage.filesystem import FilesystemStore

ROOT = Path({root!r})
KEYS = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.dcm"))
STORE = FilesystemStore(ROOT)

async def series(request):
    return StreamingResponse(multipart_dicom(STORE, KEYS, "b"), media_type="multipart/related")

app = Starlette(routes=[Route("/series", series)])
"""

STACKS = {"h11/asyncio": ("h11", "asyncio"), "httptools/uvloop": ("httptools", "uvloop")}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fetch(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with requests.get(url, stream=True, timeout=300) as r:
        r.raise_for_status()
        size = sum(len(chunk) for chunk in r.iter_content(1 << 20))
    return time.perf_counter() - t0, size


def wait_listening(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=2).close()
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wado_body", description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=1000, help="files in the series (default 1,000)")
    ap.add_argument("--size", type=int, default=132_000, help="bytes per file (default 132,000: bench.serve's CT)")
    ap.add_argument("--rounds", type=int, default=20, help="retrievals per stack, in turns (default 20)")
    ap.add_argument("--port", type=int, default=18801, help="first port; one per stack (default 18801)")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="diana-bench-wado-body-"))
    root = work / "archive" / "series"
    root.mkdir(parents=True)
    data = os.urandom(args.size)
    for i in range(args.instances):
        (root / f"{i:05}.dcm").write_bytes(data)
    (work / "wado_body_app.py").write_text(APP.format(root=str(work / "archive")))
    servers = {}
    try:
        for n, (name, (http, loop)) in enumerate(STACKS.items()):
            port = args.port + n
            command = [sys.executable, "-m", "uvicorn", "wado_body_app:app", "--port", str(port)]
            command += ["--http", http, "--loop", loop, "--log-level", "warning"]
            env = dict(os.environ, PYTHONPATH=str(work))
            servers[name] = (subprocess.Popen(command, cwd=work, env=env), f"http://127.0.0.1:{port}/series")
        for _, url in servers.values():
            wait_listening(url)
            fetch(url)  # untimed: first-request costs are not the rate
        cpu = {name: 0.0 for name in servers}
        walls: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (proc, url) in servers.items():
                before = cpu_seconds(proc.pid)
                wall, size = fetch(url)
                cpu[name] += cpu_seconds(proc.pid) - before
                walls[name].append(wall)
        result = {
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load_at_end": os.getloadavg()[0],
            "body_MB": round(size / 1e6, 1),
            "rounds": args.rounds,
            "stacks": {
                name: {
                    "server_cpu_ms_per_retrieval": round(cpu[name] / args.rounds * 1000, 1),
                    "wall_ms_median": round(statistics.median(walls[name]) * 1000, 1),
                }
                for name in servers
            },
        }
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
