"""Bulk import (backfill): publish existing files as if they had been received.

Sources: folder trees, zip files and DICOMDIR file-sets. Each Part-10 object goes through the
same Ingest as a C-STORE (validate, land durably, publish, wait for the acknowledgement), so
deduplication downstream is the same. Files are copied into the landing store, never moved or
linked: the user's files stay untouched. A summary says what was imported, skipped as
non-DICOM, or rejected and why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from diana.producers.header import HeaderError, InvalidIdentifiers
from diana.producers.ingest import Ingest
from diana.producers.publisher import PublishError, PublishRefused

__all__ = ["ImportSummary", "Importer", "find_sources"]

log = structlog.get_logger("diana.import")


@dataclass
class ImportSummary:
    imported: int = 0
    skipped_non_dicom: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    failed: Counter = field(default_factory=Counter)  # reason -> count (retry later)
    # (outcome, reason, file) of each file not imported: for the report, never for the log (a file's
    # path often holds the patient's name: exports name their folders so).
    not_imported: list[tuple[str, str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"imported:            {self.imported}",
            f"skipped (not DICOM): {self.skipped_non_dicom}",
            f"rejected:            {sum(self.rejected.values())}",
        ]
        out += [f"  {n:>6}  {reason}" for reason, n in self.rejected.most_common()]
        out.append(f"failed (retry):      {sum(self.failed.values())}")
        out += [f"  {n:>6}  {reason}" for reason, n in self.failed.most_common()]
        return out

    def write_report(self, path: Path) -> None:
        """The files not imported as CSV (outcome, reason, file), readable by its owner only."""
        import csv

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when the file was there before
        with os.fdopen(fd, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(("outcome", "reason", "file"))
            writer.writerows(self.not_imported)


@dataclass(frozen=True)
class Source:
    """One candidate object: where it is for people, and how to open it."""

    label: str
    path: Path | None = None  # a plain file
    archive: Path | None = None  # a zip holding ``member``
    member: str | None = None


def _is_part10(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def find_sources(paths: list[Path]) -> Iterator[Source]:
    """Every file under the given folders, zips and DICOMDIRs, in a stable order."""
    for root in paths:
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    yield from _file_sources(Path(dirpath) / name)
        elif root.exists():
            yield from _file_sources(root, explicit=True)
        else:
            raise FileNotFoundError(f"{root} does not exist")


def _file_sources(path: Path, explicit: bool = False) -> Iterator[Source]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield Source(f"{path}:{info.filename}", archive=path, member=info.filename)
    elif path.name.upper() == "DICOMDIR" and explicit:
        # Named on its own: the file-set's records say where its instances are.
        from pydicom.fileset import FileSet

        for instance in FileSet(path):
            yield Source(str(instance.path), path=Path(instance.path))
    else:
        yield Source(str(path), path=path)


class Importer:
    def __init__(self, ingest: Ingest, workers: int = 8):
        self.ingest = ingest
        self.workers = workers

    @contextmanager
    def _opened(self, source: Source) -> Iterator[Path]:
        if source.path is not None:
            yield source.path
            return
        # A zip member is extracted next to the landing store, then copied in like any file.
        assert source.archive is not None and source.member is not None, "a source is a path or a zip member"
        fd, tmp = tempfile.mkstemp(dir=self.ingest.landing.incoming, suffix=".import")
        try:
            with zipfile.ZipFile(source.archive) as zf, zf.open(source.member) as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _one(self, source: Source) -> tuple[str, str | None]:
        """('imported' | 'skipped' | 'rejected' | 'failed', reason)."""
        try:
            with self._opened(source) as path:
                with open(path, "rb") as fh:
                    if not _is_part10(fh.read(132)):
                        return "skipped", None
                self.ingest.accept_file(path, "IMPORT", owned=False)
            return "imported", None
        except InvalidIdentifiers as exc:
            return "rejected", f"invalid identifiers: {exc}"
        except HeaderError as exc:
            return "rejected", f"unreadable: {exc}"
        except PublishRefused as exc:  # permanent: running the import again cannot help
            return "rejected", f"broker refuses the event for good: {exc.code}"
        except PublishError as exc:
            return "failed", f"broker: {exc}"
        except (OSError, zipfile.BadZipFile) as exc:
            return "failed", f"storage: {getattr(exc, 'strerror', None) or exc}"

    def run(self, sources: list[Source], progress: Callable[[int], None] | None = None) -> ImportSummary:
        summary = ImportSummary()
        with ThreadPoolExecutor(self.workers) as pool:
            for source, (outcome, reason) in zip(sources, pool.map(self._one, sources), strict=True):
                if outcome == "imported":
                    summary.imported += 1
                elif outcome == "skipped":
                    summary.skipped_non_dicom += 1
                else:
                    reason = reason or "no reason given"
                    getattr(summary, outcome)[reason] += 1
                    summary.not_imported.append((outcome, reason, source.label))
                    log.warning(f"import.{outcome}", reason=reason)  # which file: the report (--report)
                if progress:
                    progress(1)
        return summary
