"""dcmtk's dcmqrscp as a second real PACS: files indexed with dcmqridx, diana-star's receiver known as
a move destination. Unlike Orthanc, it goes on after a refused sub-operation and answers a C-MOVE
with its counts (0xB000 when some failed), so a partly refused retrieve is reproducible."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.helpers import DCMTK_ENV
from tests.support.paths import port

DCMQRSCP_AE = "DCMQRSCP"
DCMQRSCP_PORT = port(18106)


def start_dcmqrscp(work: Path, destinations: dict[str, tuple[str, int]], files: list[Path]) -> subprocess.Popen:
    """dcmqrscp on DCMQRSCP_PORT holding ``files``; ``destinations``: AE title -> (host, port) it may move to."""
    for tool in ("dcmqrscp", "dcmqridx", "echoscu"):
        if shutil.which(tool, path="/usr/bin:/bin") is None:
            pytest.fail(f"dcmtk's {tool} is needed: apt-get install dcmtk", pytrace=False)
    storage = work / "dcmqrscp-storage"
    storage.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dcmqridx", str(storage), *map(str, files)], check=True, capture_output=True, env=DCMTK_ENV)
    hosts = "\n".join(f"peer{i} = ({ae}, {host}, {p})" for i, (ae, (host, p)) in enumerate(destinations.items()))
    config = work / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {DCMQRSCP_PORT}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
        f"HostTable BEGIN\n{hosts}\nHostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
        f"AETable BEGIN\n{DCMQRSCP_AE} {storage} RW (1000, 1024mb) ANY\nAETable END\n"
    )
    log = open(work / "dcmqrscp.log", "ab")
    proc = subprocess.Popen(
        ["dcmqrscp", "-v", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV, cwd=work
    )
    deadline = time.monotonic() + 30
    while True:
        echo = subprocess.run(
            ["echoscu", "-aec", DCMQRSCP_AE, "127.0.0.1", str(DCMQRSCP_PORT)], capture_output=True, env=DCMTK_ENV
        )
        if echo.returncode == 0:
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"dcmqrscp did not start: {(work / 'dcmqrscp.log').read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)


def stop_dcmqrscp(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
