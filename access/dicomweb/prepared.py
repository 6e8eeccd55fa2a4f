"""WADO-RS study and series metadata from the files the metadata sink prepared (sinks/metadata.py).

A request is answered from the prepared files only when every series it covers has one and each
file was prepared from the index state the index still holds (same number of instance documents,
same latest ``received_at``: schemas/series_metadata.py). Otherwise the caller answers as before,
one index document per instance. A study's answer is its series' files merged by SOP Instance
UID, the order of the per-instance answer, so both are the same bytes.

The study's metadata is not a file of its own: a study file would be rewritten whole each time one
of its series completes or is amended (a 5,000-instance study, once per series), while the index
already says which series a study has, in the one request the currency check needs anyway.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from contextlib import ExitStack

from opensearchpy import OpenSearch

from diana.schemas.layout import series_metadata_path
from diana.schemas.series_metadata import index_state, index_state_request, read_entries, read_header, with_base
from diana.schemas.uid import is_valid_uid
from diana.storage import ObjectStore

__all__ = ["current_files", "prepared_body"]


def current_files(
    client: OpenSearch, index: str, archive: ObjectStore, study: str, series: str | None = None
) -> list[str] | None:
    """The prepared files answering the study's (or one series') metadata, or None if any is missing or stale.

    Raises what the OpenSearch client raises when the index does not answer."""
    if not is_valid_uid(study) or (series is not None and not is_valid_uid(series)):
        return None
    state = index_state(client.search(index=index, body=index_state_request(study)))
    if series is not None:
        if series not in state:
            return None
        state = {series: state[series]}
    if not state:
        return None
    files = []
    for uid, (count, last) in state.items():
        key = series_metadata_path(study, uid)
        try:
            with archive.open(key) as fh:
                if not read_header(fh).same_index_state(count, last):
                    return None
        except (FileNotFoundError, ValueError):
            return None
        files.append(key)
    return files


def prepared_body(archive: ObjectStore, files: list[str], base: str) -> Iterator[bytes]:
    """The JSON array of the files' instances, merged by SOP Instance UID, BulkDataURIs under ``base``."""
    opened = ExitStack()  # closed in the finally below, after the last chunk
    try:
        handles = [opened.enter_context(archive.open(key)) for key in files]
        for fh in handles:
            read_header(fh)
        merged = heapq.merge(*(read_entries(fh) for fh in handles), key=lambda entry: entry[0])
        yield b"["
        for number, model in enumerate(with_base((model for _, model in merged), base)):
            yield model if number == 0 else b"," + model
        yield b"]"
    finally:
        opened.close()
