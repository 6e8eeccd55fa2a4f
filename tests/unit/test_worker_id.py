"""Unit: the aggregates worker's stable id (static member id and transactional id)."""

from __future__ import annotations

import pytest

from diana.stream_apps.worker_id import WorkerIdError, stable_worker_id


def test_a_made_id_is_kept_in_the_data_dir_and_differs_per_port(tmp_path):
    first = stable_worker_id("", tmp_path, "diana-aggregates", 6066)
    assert stable_worker_id("", tmp_path, "diana-aggregates", 6066) == first  # a restart keeps it
    assert stable_worker_id("", tmp_path, "diana-aggregates", 6068) != first  # a second worker on this host
    assert stable_worker_id("", tmp_path / "other-disk", "diana-aggregates", 6066) != first  # another host


def test_a_configured_id_is_used_as_is_and_checked(tmp_path):
    assert stable_worker_id("aggregates-0", tmp_path, "diana-aggregates", 6066) == "aggregates-0"
    with pytest.raises(WorkerIdError, match="A-Z a-z 0-9"):
        stable_worker_id("worker one", tmp_path, "diana-aggregates", 6066)


def test_without_a_metrics_port_each_start_is_a_new_member(tmp_path):
    assert stable_worker_id("", tmp_path, "diana-aggregates", 0) != stable_worker_id(
        "", tmp_path, "diana-aggregates", 0
    )
