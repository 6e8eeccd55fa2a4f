"""Shared by the unit tests that run the command line in this process."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration file whose Kafka and OpenSearch answer nowhere (a test stands in for them)."""
    path = tmp_path / "diana.toml"
    path.write_text('[kafka]\nbootstrap = "127.0.0.1:1"\n[opensearch]\nurl = "http://127.0.0.1:2"\n')
    return path
