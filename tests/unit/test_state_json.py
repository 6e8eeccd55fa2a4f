"""state_json gives the text json.dumps(value, separators=(",", ":")) gives, for every kind of state value."""

from __future__ import annotations

import json
import math

from diana.stream_apps.state_json import state_json

VALUES = [
    [123456, "0123456789abcdef", 526000, "1.2.826.0.1.3680043.10.1234.2.12345"],  # a ``seen`` entry
    1_764_400_000_000,
    -3,
    0.1,
    1e300,
    math.inf,
    -math.inf,
    True,
    None,
    "plain",
    'quote " backslash \\ tab \t newline \n',
    "Müller^Zoë 漢字 \u2028 \x00",
    {"series_verdicts": {"1.2": "COMPLETE", "1.3": None}, "instance_numbers": [1, 2, 3], "quiet_seconds": 30.0},
    {"nested": [[1, [2, [3, {"a": []}]]], {}], "unicode key é": "v"},
    [],
    {},
]


def test_state_json_is_json_dumps_compact_byte_for_byte():
    for value in VALUES:
        assert state_json(value) == json.dumps(value, separators=(",", ":")), value
    nan = state_json(math.nan)
    assert nan == json.dumps(math.nan, separators=(",", ":")) == "NaN"
