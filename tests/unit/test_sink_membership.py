"""When a sink counts its consumer as lost by its group (sinks/membership.py): outside, the broker
answering, for the whole limit; an unanswered check or one that finds it inside starts the count again."""

from __future__ import annotations

from types import SimpleNamespace

from diana.sinks.membership import OutsideTimer, member_in_group


def _group(*member_ids: str) -> SimpleNamespace:
    return SimpleNamespace(members=[SimpleNamespace(member_id=member_id) for member_id in member_ids])


def test_outside_for_the_whole_limit_is_lost_once_then_counted_again() -> None:
    timer = OutsideTimer(limit_s=30)
    assert [timer.observe(False, t) for t in (0, 10, 29.9)] == [False, False, False]
    assert timer.observe(False, 30) is True
    # The caller replaced the consumer; a new count starts.
    assert timer.observe(False, 31) is False
    assert timer.observe(False, 61) is True


def test_a_check_finding_it_inside_starts_the_count_again() -> None:
    timer = OutsideTimer(limit_s=30)
    timer.observe(False, 0)
    timer.observe(True, 20)
    assert timer.observe(False, 35) is False
    assert timer.observe(False, 64.9) is False
    assert timer.observe(False, 65) is True


def test_an_unanswered_check_starts_the_count_again() -> None:
    """A broker outage: the consumer rejoins after the broker's return, and that moment is not counted."""
    timer = OutsideTimer(limit_s=30)
    timer.observe(False, 0)
    timer.observe(None, 25)  # the broker is down
    assert timer.observe(False, 40) is False
    assert timer.observe(False, 69) is False
    assert timer.observe(False, 70) is True


def test_a_member_is_inside_only_when_the_group_lists_its_id() -> None:
    group = _group("rdkafka-a", "rdkafka-b")
    assert member_in_group(group, "rdkafka-b") is True
    assert member_in_group(group, "rdkafka-c") is False
    assert member_in_group(_group(), "rdkafka-a") is False  # the group EMPTY, as on CI
    assert member_in_group(group, None) is False  # never joined
    assert member_in_group(group, "") is False
