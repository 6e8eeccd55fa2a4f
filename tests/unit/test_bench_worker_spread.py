"""bench.worker_spread counts how connections opened at once are split over worker processes."""

from __future__ import annotations

from bench.worker_spread import receiver_splits, reuseport_splits
from tests.support.paths import port


def test_so_reuseport_splits_are_counted_for_every_trial():
    splits = reuseport_splits(workers=2, connections=4, trials=20, port=port(21183))
    assert sum(splits.values()) == 20
    assert set(splits) <= {"2/2", "3/1", "4/0"}


def test_the_receivers_workers_take_two_each_of_four_opened_at_once():
    splits = receiver_splits(workers=2, connections=4, trials=5, port=port(21184))
    # One miss allowed: a worker that gets no core within DEFER_S leaves its share to the other.
    assert splits["2/2"] >= 4, splits
