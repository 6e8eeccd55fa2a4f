"""Orthanc from Debian as a real client of diana-star: query/retrieve through its REST API, DICOMweb
through its plugin (orthanc-dicomweb). Started by the tests on test ports, stopped after."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.helpers import DCMTK_ENV
from tests.support.paths import port

ORTHANC_AE = "ORTHANC"
DICOM_PORT = port(18104)
HTTP_PORT = port(18105)
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc = proc
        self.url = url

    def get(self, path: str) -> Any:
        response = requests.get(self.url + path, timeout=60)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        response = requests.post(
            self.url + path, data=json.dumps(body) if not isinstance(body, str) else body, timeout=300
        )
        assert response.ok, f"Orthanc {path}: {response.status_code} {response.text}"
        return response.json() if response.text.strip() else None


def start_orthanc(
    work: Path,
    modalities: dict[str, list],
    dicomweb_servers: dict[str, dict],
    verbose: bool = False,
    settings: dict[str, Any] | None = None,
) -> Orthanc:
    """``verbose``: Orthanc logs each association opened and closed (tests count them on the PACS side);
    ``settings``: more of Orthanc's configuration (e.g. ``LimitFindResults``)."""
    binary = shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if binary is None or not PLUGIN.exists():
        pytest.fail(
            "Orthanc and its DICOMweb plugin are needed: apt-get install orthanc orthanc-dicomweb "
            "(scripts/bootstrap.sh --test installs them)",
            pytrace=False,
        )
    storage = work / "orthanc-storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = work / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "diana-test-client",
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "DicomAet": ORTHANC_AE,
                "DicomPort": DICOM_PORT,
                "HttpPort": HTTP_PORT,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomCheckCalledAet": False,
                "DicomModalities": modalities,
                "Plugins": [str(PLUGIN)],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers},
            }
            | (settings or {})
        )
    )
    log = open(work / "orthanc.log", "ab")
    proc = subprocess.Popen(
        [binary, *(["--verbose"] if verbose else []), str(config)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV
    )
    url = f"http://127.0.0.1:{HTTP_PORT}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(url + "/system", timeout=2).ok:
                return Orthanc(proc, url)
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"Orthanc did not start: {(work / 'orthanc.log').read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)


def stop_orthanc(orthanc: Orthanc) -> None:
    orthanc.proc.terminate()
    try:
        orthanc.proc.wait(30)
    except subprocess.TimeoutExpired:
        orthanc.proc.kill()
        orthanc.proc.wait()
