"""An open series' sorted, distinct instance numbers, to which a new one is added without copying them all.

The fold is pure (aggregate_fold.py): each instance gives a new series value, and the state a
transaction holds must not change. With the numbers in one list, each instance copied the list:
the fold's cost per instance grew with the series (8.3 µs at 1,000 instances, 236 µs over the last
1,000 of 40,000: an fMRI or perfusion series cost 3.2 s of fold; 0.26 s now, stream_apps/README.md
has the measurement). ``InstanceNumbers`` keeps them
in immutable chunks: adding a number copies one chunk and the chunk index, which the old and the
new value then share.

The state keeps its stored form: a JSON list of the numbers (``state_json`` writes an
``InstanceNumbers`` as that list), and a list read back from the changelog or a local file is taken
as it is (``InstanceNumbers.of``, once per series and batch).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["InstanceNumbers"]

# Numbers per chunk when built; a chunk splits in two past twice this. Adding a number copies about
# a chunk and the index (a 40,000-instance series: about 80 chunks).
_CHUNK = 512


class InstanceNumbers:
    """Sorted distinct ints, immutable. Iterates, compares equal to a list of the same numbers."""

    __slots__ = ("_chunks", "_lasts", "_length")

    def __init__(self, chunks: tuple[tuple[int, ...], ...], lasts: tuple[int, ...], length: int) -> None:
        self._chunks, self._lasts, self._length = chunks, lasts, length

    @classmethod
    def of(cls, numbers: Iterable[int]) -> InstanceNumbers:
        """From numbers already sorted and distinct (the stored list), or an InstanceNumbers as it is."""
        if isinstance(numbers, InstanceNumbers):
            return numbers
        values = tuple(numbers)
        chunks = tuple(values[i : i + _CHUNK] for i in range(0, len(values), _CHUNK))
        return cls(chunks, tuple(c[-1] for c in chunks), len(values))

    def with_number(self, number: int) -> InstanceNumbers:
        """These numbers and ``number`` (self when it is among them already)."""
        chunks = self._chunks
        if not chunks:
            return InstanceNumbers(((number,),), (number,), 1)
        index = min(bisect.bisect_left(self._lasts, number), len(chunks) - 1)
        chunk = chunks[index]
        where = bisect.bisect_left(chunk, number)
        if where < len(chunk) and chunk[where] == number:
            return self
        grown = chunk + (number,) if where == len(chunk) else chunk[:where] + (number,) + chunk[where:]
        parts = (grown,) if len(grown) <= 2 * _CHUNK else (grown[: len(grown) // 2], grown[len(grown) // 2 :])
        return InstanceNumbers(
            (*chunks[:index], *parts, *chunks[index + 1 :]),
            (*self._lasts[:index], *(p[-1] for p in parts), *self._lasts[index + 1 :]),
            self._length + 1,
        )

    @property
    def first(self) -> int:
        return self._chunks[0][0]

    @property
    def last(self) -> int:
        return self._chunks[-1][-1]

    def __iter__(self) -> Iterator[int]:
        for chunk in self._chunks:
            yield from chunk

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, InstanceNumbers | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to a list, so no hash either

    def __repr__(self) -> str:
        return f"InstanceNumbers({list(self)!r})"

    def as_list(self) -> list[Any]:
        """The stored form: a plain list (what state_json writes)."""
        return list(self)
