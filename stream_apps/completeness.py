"""When is a series whole? Pure functions, no Faust, no clock: everything is event time.

A series is completed when its partition's event-time watermark has passed its last arrival by
the quiet time of its modality. The verdict uses the evidence the headers give: gaps in
InstanceNumber, and the expected count from ImagesInAcquisition or NumberOfTemporalPositions.
"""

from __future__ import annotations

from dataclasses import dataclass

from diana.config import parse_per_modality

__all__ = ["QuietTimes", "verdict", "expected_instances"]

COMPLETE, GAPS, UNKNOWN = "COMPLETE", "GAPS", "UNKNOWN"
# A gap list longer than this is cut: the count still says how many are missing.
MAX_LISTED_GAPS = 1000


@dataclass(frozen=True)
class QuietTimes:
    """Quiet time per modality, from a spec such as ``"CT=30,MR=60,CR=10,DX=10,*=30"``."""

    by_modality: dict[str, float]
    default: float

    @classmethod
    def parse(cls, spec: str) -> QuietTimes:
        """The ``[stream] quiet_seconds`` syntax, read where the configuration checks it."""
        by_modality, default = parse_per_modality(spec)
        return cls(by_modality, default)

    def for_modality(self, modality: str | None) -> float:
        return self.by_modality.get((modality or "").upper(), self.default)


def expected_instances(images_in_acquisition: int | None, temporal_positions: int | None) -> int | None:
    """The largest count a header promises (None when it promises nothing)."""
    candidates = [n for n in (images_in_acquisition, temporal_positions) if isinstance(n, int) and 0 < n < 1_000_000]
    return max(candidates) if candidates else None


def verdict(instance_numbers: list[int], instance_count: int, expected: int | None) -> tuple[str, list[int]]:
    """(COMPLETE | GAPS | UNKNOWN, missing instance numbers)."""
    if not instance_numbers:
        if expected is not None:
            return (COMPLETE, []) if instance_count >= expected else (GAPS, [])
        return UNKNOWN, []
    numbers = set(instance_numbers)
    low, high = min(numbers), max(numbers)
    starts_at_one = low in (0, 1)
    if expected is not None and starts_at_one:
        high = max(high, low + expected - 1)  # the promised count reaches past what arrived
    # Walk the gaps between the numbers present, not the whole range: one InstanceNumber of
    # 2**31 must not make this loop two billion times.
    missing = _first_missing(sorted(numbers), high, MAX_LISTED_GAPS)
    if missing:
        return GAPS, missing
    # Numbering that starts late (101, 102, ...) says nothing about what came before.
    return (COMPLETE, []) if starts_at_one else (UNKNOWN, [])


def _first_missing(present: list[int], high: int, limit: int) -> list[int]:
    """The first ``limit`` numbers missing between ``present[0]`` and ``high`` (``present`` sorted, unique)."""
    out: list[int] = []
    expected = present[0]
    for number in [*present, high + 1]:
        if number > expected:
            out.extend(range(expected, min(number, expected + limit - len(out))))
            if len(out) >= limit:
                break
        expected = max(expected, number + 1)
    return out
