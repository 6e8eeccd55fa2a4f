"""Unit: the index templates the OpenSearch sink installs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest

TEMPLATES = sorted((resources.files("diana.sinks") / "templates").iterdir(), key=lambda p: p.name)
# Lucene refuses a term over 32,766 bytes, and with it the whole document; ignore_above counts
# characters, of up to 4 UTF-8 bytes each.
MOST_CHARACTERS = 32_766 // 4


def _keyword_fields(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get("type") == "keyword":
            yield path, node
        for key, value in node.items():
            yield from _keyword_fields(value, f"{path}.{key}" if path else key)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_no_keyword_value_can_make_its_document_refused(template) -> None:
    fields = list(_keyword_fields(json.loads(template.read_text())))
    assert fields
    too_long = [path for path, field in fields if not 0 < field.get("ignore_above", 0) <= MOST_CHARACTERS]
    assert not too_long, f"{template.name}: keyword fields without ignore_above <= {MOST_CHARACTERS}: {too_long}"
