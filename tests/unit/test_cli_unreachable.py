"""A command whose Kafka or OpenSearch does not answer says which, where, and where that is set, in one
line and with exit status 1: no traceback, no hang (`diana replay` waited for good before). `diana status`
shows what it could still read, with the problems first. Nothing listens on the ports used here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_COMMANDS = {
    "replay": (("replay", "--to-end", "diana-sink-archive", "--dry-run"), "Kafka"),
    "reindex": (("reindex", "--no-progress"), "OpenSearch"),  # OpenSearch is asked first
    "cohort": (("cohort", "find", "--modality", "CT"), "OpenSearch"),
    "report": (("report", "--out", "/dev/null"), "OpenSearch"),
    "status": (("status",), None),
}


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], int, int]]:
    """Each command run once against a configuration whose services do not answer, all at once."""
    folder = tmp_path_factory.mktemp("unreachable")
    kafka, opensearch = _closed_port(), _closed_port()
    config = folder / "diana.toml"
    config.write_text(
        f'[kafka]\nbootstrap = "127.0.0.1:{kafka}"\n[opensearch]\nurl = "http://127.0.0.1:{opensearch}"\n'
        f'[storage]\nlanding_dir = "{folder}/landing"\narchive_dir = "{folder}/archive"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "diana.cli", "--config", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for name, (args, _) in _COMMANDS.items()
    }
    results = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=90)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), kafka, opensearch)
    return results


@pytest.mark.parametrize("name", [n for n, (_, service) in _COMMANDS.items() if service])
def test_a_command_says_which_service_did_not_answer(ran, name) -> None:
    done, kafka, opensearch = ran[name]
    service = _COMMANDS[name][1]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith(f"diana {name}: ")]
    assert len(said) == 1, done.stderr
    port, setting = (kafka, "DIANA_KAFKA_BOOTSTRAP") if service == "Kafka" else (opensearch, "DIANA_OPENSEARCH_URL")
    assert f"{service} at " in said[0] and f"127.0.0.1:{port}" in said[0] and setting in said[0]
    assert "did not answer" in said[0] and ("refused" in said[0] or "Timed out" in said[0])  # what it said


def test_status_shows_the_problems_first_and_the_rest_after(ran) -> None:
    done, kafka, opensearch = ran["status"]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "PROBLEMS"
    assert lines[1].startswith(f"  ! kafka at 127.0.0.1:{kafka}: ")
    assert lines[2].startswith(f"  ! opensearch at http://127.0.0.1:{opensearch}: ")  # once, not per index
    assert lines[3] == "" and lines[4].startswith("TOPICS")
    assert "ARCHIVE  objects: 0" in done.stdout and "SERVICES" in done.stdout
    assert len(done.stderr.splitlines()) <= 4, done.stderr  # each client's failure once, not a flood
