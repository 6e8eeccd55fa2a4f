"""The state's JSON text: what ``json.dumps(value, separators=(",", ":"))`` gives, cheaper per call.

The changelog records and the local state file hold each state value as compact JSON, one encode
per changed key per transaction, a few per instance (the ``seen`` entry, the series' deadline).
``json.dumps`` and ``JSONEncoder.encode`` build a new C encoder on every call, which cost more
than the encoding of a small list or a number itself (3.1 µs against 0.85 µs for a ``seen``
entry); this module builds it once. Same text, byte for byte: the encoder is the one
``JSONEncoder.encode`` builds (ASCII, NaN allowed, keys unsorted), without the circular-reference
check, which state values (trees of dicts, lists, strings and numbers) never need. An open
series' ``InstanceNumbers`` (instance_numbers.py) is written as the list of its numbers.
"""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from diana.stream_apps.instance_numbers import InstanceNumbers

__all__ = ["state_json"]


def _as_json(value: Any) -> Any:
    if isinstance(value, InstanceNumbers):
        return value.as_list()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_PLAIN = json.JSONEncoder(separators=(",", ":"), default=_as_json)
# c_make_encoder is None where the C accelerator is missing: the stock encoder then, same text.
_C = (
    None
    if c_make_encoder is None
    else c_make_encoder(None, _PLAIN.default, encode_basestring_ascii, None, ":", ",", False, False, True)
)


def state_json(value: Any) -> str:
    """Compact JSON text of a state value (``json.dumps(value, separators=(",", ":"))``)."""
    if _C is None or isinstance(value, str):  # a str is quicker through encode()'s own shortcut
        return _PLAIN.encode(value)
    return "".join(_C(value, 0))
