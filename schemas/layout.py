"""Where the sinks put what they write: the contract between writers and readers of the stores.

``topics.py`` names the topics; this module names the rest of what is shared: the OpenSearch
aliases each kind of record is indexed under (from the configured prefix), the field that is each
document's id, and the archive's path for an instance. Sinks write by these names; cohort, export,
report, dashboards, status and query/retrieve read by them.
"""

from __future__ import annotations

from diana.schemas.topics import DEADLETTER, DOSE_ALERTS, DOSE_EVENTS, DOSE_STUDIES, INSTANCES, SERIES, STUDIES
from diana.schemas.uid import is_valid_uid

__all__ = ["IndexLayout", "INDEX_KINDS", "INDEX_VERSION", "archive_path", "series_metadata_path"]

# The version of the index mappings the code writes; `diana reindex` creates the next one.
INDEX_VERSION = 1

# topic -> index kind
INDEX_KINDS = {
    INSTANCES.name: "instances",
    SERIES.name: "series",
    STUDIES.name: "studies",
    DOSE_EVENTS.name: "dose-events",
    DOSE_STUDIES.name: "dose-studies",
    DOSE_ALERTS.name: "dose-alerts",
    DEADLETTER.name: "deadletters",
}


class IndexLayout:
    """Alias and versioned index names for one prefix: ``<prefix>-<kind>`` → ``<prefix>-<kind>-vN``."""

    kinds = INDEX_KINDS
    # The document id of each kind: a deterministic id makes every write an idempotent upsert.
    id_fields = {
        "instances": "sop_instance_uid",
        "series": "series_instance_uid",
        "studies": "study_instance_uid",
        "dose-events": "event_id",
        "dose-studies": "study_instance_uid",
        "dose-alerts": "alert_id",
        "deadletters": "deadletter_offset",
    }

    # Indices written outside the OpenSearch sink (which creates only those of id_fields).
    written_elsewhere = {
        "dose-alert-state": "alert_id",  # access/alerts: the acknowledgment workflow's current state
    }

    def __init__(self, prefix: str):
        self.prefix = prefix

    def alias(self, kind: str) -> str:
        if kind not in self.id_fields and kind not in self.written_elsewhere:
            raise KeyError(f"no index kind {kind!r}; kinds: {', '.join([*self.id_fields, *self.written_elsewhere])}")
        return f"{self.prefix}-{kind}"

    def index(self, kind: str, version: int = INDEX_VERSION) -> str:
        return f"{self.alias(kind)}-v{version}"


def archive_path(study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> str:
    """The archive's relative path of one instance, ``<Study>/<Series>/<SOP>.dcm``.

    Only valid UIDs name files (digits and dots, no empty component: uid.py), so no path can leave the archive root.
    """
    uids = (study_instance_uid, series_instance_uid, sop_instance_uid)
    if not all(is_valid_uid(u) for u in uids):
        raise ValueError("an object with an invalid UID cannot be named in the archive")
    return "{}/{}/{}.dcm".format(*uids)


def series_metadata_path(study_instance_uid: str, series_instance_uid: str) -> str:
    """The archive's relative path of a series' prepared WADO-RS metadata, ``<Study>/<Series>/.wado-metadata``.

    A dot-file in the series' folder: whatever walks the archive for objects (``*.dcm``) never takes
    it for one, and it lives and goes with the series.
    """
    if not (is_valid_uid(study_instance_uid) and is_valid_uid(series_instance_uid)):
        raise ValueError("a series with an invalid UID cannot be named in the archive")
    return f"{study_instance_uid}/{series_instance_uid}/.wado-metadata"
