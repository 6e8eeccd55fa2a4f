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


class _Indices:
    """An OpenSearch whose aliases all exist (an install upgraded in place); refuses the mapping of ``refused``."""

    def __init__(self, refused: str = "") -> None:
        self.refused, self.mappings, self.created = refused, {}, []

    def put_index_template(self, name: str, body: dict) -> None:
        pass

    def exists_alias(self, name: str) -> bool:
        return True

    def create(self, index: str) -> None:
        self.created.append(index)

    def put_mapping(self, index: str, body: dict) -> None:
        from opensearchpy.exceptions import RequestError

        if index == self.refused:
            error = {"type": "illegal_argument_exception", "reason": "mapper [x] cannot be changed from type [keyword]"}
            raise RequestError(400, error["type"], {"error": error, "status": 400})
        self.mappings[index] = body


class _Client:
    def __init__(self, indices: _Indices) -> None:
        self.indices = indices


def test_an_index_already_there_is_given_the_fields_its_template_added() -> None:
    from diana.schemas.layout import IndexLayout
    from diana.sinks.opensearch import ensure_indices

    indices = _Indices()
    ensure_indices(_Client(indices), IndexLayout("diana"))
    studies = indices.mappings["diana-dose-studies"]["properties"]
    assert {"drl_standard_name", "drl_parts"} <= set(studies)
    assert len(indices.mappings) == len(IndexLayout.id_fields)  # one request per kind
    assert indices.created == []


def test_a_mapping_opensearch_refuses_is_logged_with_the_fix_and_the_others_are_put(capsys) -> None:
    from diana.schemas.layout import IndexLayout
    from diana.sinks.opensearch import ensure_indices

    indices = _Indices(refused="diana-dose-studies")
    ensure_indices(_Client(indices), IndexLayout("diana"))
    assert "diana-dose-studies" not in indices.mappings
    assert "diana-dose-alerts" in indices.mappings  # a kind after the refused one
    logged = capsys.readouterr()
    text = logged.out + logged.err
    assert "opensearch.mapping_not_updated" in text and "diana reindex --kinds dose-studies" in text


def test_the_live_sink_maps_new_fields_at_start_and_a_reindex_writer_leaves_the_indices_alone() -> None:
    from diana.schemas.layout import IndexLayout
    from diana.sinks.opensearch import OpenSearchSink

    live, rebuilding = _Indices(), _Indices()
    assert OpenSearchSink(_Client(live), IndexLayout("diana")).prepare_indices()
    assert "diana-dose-studies" in live.mappings
    # A reindex writes into the version it created from the template: never the live aliases' mappings.
    assert OpenSearchSink(_Client(rebuilding), IndexLayout("diana"), index_version=2).prepare_indices()
    assert rebuilding.mappings == {}
