"""The stream workers refuse a partition count that disagrees with the topics', with the fix, on the real broker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO


def _diana(pipeline, *args: str, partitions: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env.update(DIANA_CONFIG=str(pipeline.config_file), DIANA_KAFKA_PARTITIONS=str(partitions))
    return subprocess.run(
        [sys.executable, "-m", "diana.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )


@pytest.mark.parametrize("worker", ["aggregate", "dose"])
def test_a_worker_with_another_partition_count_refuses_to_start_and_says_why(pipeline, worker):
    topics = pipeline.cfg.kafka.partitions
    result = _diana(pipeline, worker, partitions=topics * 2)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"[kafka] partitions is {topics * 2}, but dicom.instances has {topics}" in result.stderr, result.stderr
    assert "docs/OPERATIONS.md" in result.stderr
    # The session's own workers go on.
    assert pipeline.procs["aggregates"].poll() is None and pipeline.procs["dose"].poll() is None


def test_topics_says_that_existing_topics_keep_their_count(pipeline):
    topics = pipeline.cfg.kafka.partitions
    result = _diana(pipeline, "topics", partitions=topics + 1)
    assert result.returncode == 0, result.stderr
    assert f"dicom.instances has {topics} partitions, [kafka] partitions is {topics + 1}" in result.stderr
