"""`diana status` counts the archive's objects by listing it (a walk of its folders, a request per
1,000 S3 keys): minutes for a large archive, which looked hung. At a terminal it first says so on
stderr; its help says what it shows: an object count (it said "archive size")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import diana.operations.status as status_module
from diana.cli import main


class EmptyOpenSearch:
    def __init__(self):
        self.indices = self

    def get_alias(self, name: str) -> dict:
        return {f"{name}-v1": {}}

    def count(self, index: str) -> dict:
        return {"count": 0}


@pytest.fixture
def events(monkeypatch) -> list[str]:
    """What happened, in order: the lines said on stderr and the archive listed."""
    happened: list[str] = []
    monkeypatch.setattr(status_module, "_collect_kafka", lambda *a: None)
    monkeypatch.setattr(status_module, "opensearch_client", lambda *a, **k: EmptyOpenSearch())
    monkeypatch.setattr(status_module, "_listening", lambda host, port: False)
    monkeypatch.setattr(status_module, "_count_archived", lambda store: happened.append("listed") or 7)
    return happened


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "diana.toml"
    config.write_text(f'[storage]\nlanding_dir = "{tmp_path}/landing"\narchive_dir = "{tmp_path}/archive"\n')
    return config


def test_at_a_terminal_status_says_it_is_counting_the_archive_before_it_lists_it(tmp_path, monkeypatch, capsys, events):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    written = sys.stderr.write

    def write(text: str) -> int:
        if text.strip():
            events.append(text.strip())
        return written(text)

    monkeypatch.setattr(sys.stderr, "write", write)
    assert main(["--config", str(_config(tmp_path)), "status"]) == 0
    assert events == ["diana status: counting the archive's objects…", "listed"]
    assert "ARCHIVE  objects: 7" in capsys.readouterr().out


def test_status_says_nothing_more_on_a_stderr_that_is_no_terminal(tmp_path, monkeypatch, capsys, events):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert main(["--config", str(_config(tmp_path)), "status"]) == 0
    assert capsys.readouterr().err == ""


def test_the_help_says_status_counts_objects(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "archive and landing object counts" in out
