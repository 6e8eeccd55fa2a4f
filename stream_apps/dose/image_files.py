"""Where the dose worker finds an image's pixels: the landing store, else the archive.

The instance event carries only the header; the water-equivalent diameter (size.py) needs the
pixels. The receiver lands the bytes at ``landing_uri`` (``landing_path`` in events before
InstanceArrived v4) and the archive sink later moves them to
``<Study>/<Series>/<SOP>.dcm`` (the archive's layout, restated here because stream processors do
not import the sinks); the file is looked for in both, and a missing one only means no size sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset

from diana.schemas.uid import is_valid_uid
from diana.storage import FilesystemStore, key_in_store

__all__ = ["ImageFiles"]


@dataclass(frozen=True)
class ImageFiles:
    landing_dir: Path
    archive_dir: Path

    def candidates(self, instance: dict) -> list[Path]:
        paths = []
        landed = _local_landing_path(self.landing_dir, instance)
        if landed is not None:
            paths.append(landed)
        uids = (instance["study_instance_uid"], instance["series_instance_uid"], instance["sop_instance_uid"])
        if all(is_valid_uid(u) for u in uids):
            paths.append(self.archive_dir.joinpath(*uids[:2], f"{uids[2]}.dcm"))
        return paths

    def read(self, instance: dict) -> Dataset | None:
        """The whole object, pixels included; None when neither copy can be read."""
        for path in self.candidates(instance):
            try:
                return pydicom.dcmread(path)
            except FileNotFoundError:
                continue  # moved between the two places, or not there yet
            except Exception:  # pydicom raises many kinds on a damaged file: no size sample, no crash
                return None
        return None


def _local_landing_path(landing_dir: Path, instance: dict) -> Path | None:
    """The landed file in this host's landing folder, if the event names one there (an object
    landed on S3 is read from the archive once archived: the size sample is optional)."""
    store = FilesystemStore(landing_dir)
    try:
        if instance.get("landing_uri"):
            return store.path(key_in_store(store, instance["landing_uri"]))
        if instance.get("landing_path"):
            return store.path(instance["landing_path"])
    except ValueError:
        return None
    return None
