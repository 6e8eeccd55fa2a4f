"""Reading the YAML files sites edit by hand (dose rules, standard names, reference levels, alert routing).

Each is a mapping of a few known top-level keys. A file that cannot be read, is not YAML, is not a
mapping or has an unknown key raises the caller's own error type, naming the file and the fix,
instead of a traceback from deep in the loader.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_yaml_mapping"]


def read_yaml_mapping(
    path: Path, what: str, keys: Collection[str], error: type[Exception], noun: str = "section"
) -> dict[str, Any]:
    """The top-level mapping of ``path`` (``what`` names the file in messages); ``error`` otherwise."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from None
    allowed = ", ".join(keys)
    if not isinstance(raw, dict):
        raise error(f"{path}: {what} are a mapping of {noun}s at the top level ({allowed})")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise error(f"{path}: unknown {noun} {unknown[0]!r}; {noun}s: {allowed}")
    return raw
