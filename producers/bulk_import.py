"""Bulk import (backfill): publish existing files as if they had been received.

Sources: folder trees, zip files and DICOMDIR file-sets. Each Part-10 object goes through the
same Ingest as a C-STORE (validate, land durably, publish, wait for the acknowledgement), so
deduplication downstream is the same. Files are copied into the landing store, never moved or
linked: the user's files stay untouched. A summary says what was imported, skipped as
non-DICOM, or rejected and why. Files are imported as they are listed, a few per worker in flight.

Nothing stops the run but a path that does not exist, Ctrl-C and the broker down (publish failures in
a row): a folder that cannot be read, an archive or DICOMDIR that cannot be opened, a zip member that
cannot be read and any unexpected error are each counted and reported for that file or folder, and
the rest is imported. Reasons name no file (a path often holds the patient's name); the --report file
does.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import stat
import struct
import threading
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from diana.producers.header import HeaderError, InvalidIdentifiers, Truncated
from diana.producers.ingest import Ingest
from diana.producers.publisher import PublishError, PublishRefused
from diana.scratch import ScratchFile

__all__ = ["ImportSummary", "Importer", "Report", "find_sources"]

log = structlog.get_logger("diana.import")

# Sources handed to the pool ahead of the workers, per worker: enough that none waits for the listing,
# few enough that memory does not grow with the number of files.
_IN_FLIGHT_PER_WORKER = 4
# Preamble and "DICM": what a Part-10 file starts with, all that is read before a member is extracted.
_PART10_HEAD = 132
_ZIP_MAGIC = b"PK\x03\x04"  # a zip's first local header
_ZIP_EMPTY = b"PK\x05\x06"  # an empty zip: its end record alone
_ZIP_ENCRYPTED = 0x1  # general purpose flag bit 0
# A member whose bytes do not decode: a damaged header, a bad CRC, a truncated or damaged deflate stream.
_CORRUPT_MEMBER = (zipfile.BadZipFile, zlib.error, EOFError)
# The first two bytes of a data set without preamble: group 0008 (or 0002, a file meta without preamble),
# little or big endian. Only such files are parsed to tell a bare data set from what is not DICOM.
_BARE_GROUPS = (b"\x08\x00", b"\x00\x08", b"\x02\x00", b"\x00\x02")
_NOT_DICOM = "not DICOM (no preamble and DICM)"
_BARE_OTHER = (
    "no DICM preamble: a bare data set not in Implicit VR Little Endian (its transfer syntax is not known: "
    "write it as a Part-10 file with its syntax, then import that)"
)
_WRAPPED = "bare data sets (no preamble: Implicit VR Little Endian) imported with a file meta added"
# Broker failures in a row (nothing acknowledged between them) after which the import stops: with the
# broker down, each file waited [kafka] publish_timeout_s and failed (a million files: days).
_BROKER_DOWN_AFTER = 3
_BROKER = "broker: "  # the reason of a failure to publish that may pass
# An ISO 9660 name's version (";1") and the dot of a name without extension ("IM0001.;1"), as a disc
# mounted with map=off or copied raw shows them.
_ISO_VERSION = re.compile(r"\.?;\d+$")


def _name_key(name: str) -> str:
    """A file name as a file-set means it: no ISO 9660 version or trailing dot, in any case
    (``IM0001.;1``, ``im0001;1``, ``IM0001`` are one name)."""
    return _ISO_VERSION.sub("", name).rstrip(".").casefold()


def _is_dicomdir(name: str) -> bool:
    """A file-set's index by its name: DICOMDIR in any case, with an ISO 9660 version or not (DICOMDIR.;1)."""
    return _name_key(name) == "dicomdir"


@dataclass
class ImportSummary:
    imported: int = 0
    wrapped: int = 0  # of those imported, bare data sets given a file meta
    skipped: Counter = field(default_factory=Counter)  # reason -> count (not DICOM)
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    failed: Counter = field(default_factory=Counter)  # reason -> count (retry later)
    # (outcome, reason, file) of each file not imported (skipped too), when no report takes them: for the
    # report, never for the log (a file's path often holds the patient's name: exports name folders so).
    not_imported: list[tuple[str, str, str]] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C: the files listed after it were not looked at
    # Stopped after _BROKER_DOWN_AFTER publish failures in a row: the files after them were not looked at.
    broker_down: bool = False
    # The report's row could not be written (ENOSPC, EIO): the run stopped like Ctrl-C, the files counted
    # after its last row are not listed in it. The error only: its text names the report, not a patient.
    report_error: OSError | None = None
    _broker_failures: int = field(default=0, repr=False)  # in a row, in the order outcomes come

    @property
    def stopped(self) -> bool:
        """Stopped before the end, Ctrl-C aside: the files after those in flight were not looked at."""
        return self.broker_down or self.report_error is not None

    @property
    def failed_not_broker(self) -> int:
        """The failures for another reason than the broker's (the disk, a folder unreadable...)."""
        return sum(n for reason, n in self.failed.items() if not reason.startswith(_BROKER))

    @property
    def skipped_non_dicom(self) -> int:
        return sum(self.skipped.values())

    def lines(self) -> list[str]:
        out = [f"imported:            {self.imported}"]
        if self.wrapped:
            out.append(f"  {self.wrapped:>6}  {_WRAPPED}")
        out.append(f"skipped (not DICOM): {self.skipped_non_dicom}")
        out += [f"  {n:>6}  {reason}" for reason, n in self.skipped.most_common() if reason != _NOT_DICOM]
        out.append(f"rejected:            {sum(self.rejected.values())}")
        out += [f"  {n:>6}  {reason}" for reason, n in self.rejected.most_common()]
        out.append(f"failed (retry):      {sum(self.failed.values())}")
        out += [f"  {n:>6}  {reason}" for reason, n in self.failed.most_common()]
        return out

    @property
    def not_imported_count(self) -> int:
        return self.skipped_non_dicom + sum(self.rejected.values()) + sum(self.failed.values())


class Report:
    """The --report file: the files not imported as CSV (outcome, reason, file), readable by its owner
    only. Written a row at a time, flushed: a run interrupted or crashed keeps the rows of what it saw
    (it was written at the end only, and emptied at the start).

    Raises OSError when it cannot be opened or its first row written; ``row`` raises the OSError of a
    write that failed (a full disk), which stops the import (Importer.run). ``close`` never raises: its
    error, or the first row's that failed, is ``failure``."""

    def __init__(self, path: Path) -> None:
        import csv

        self.failure: OSError | None = None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):  # not a device (/dev/stdout): its mode is not ours to change
                os.fchmod(fd, 0o600)  # also when the file was there before
            # surrogateescape: a name that is not UTF-8 (a CD copied on Windows, Latin-1) is written as the
            # bytes it has on disk; strict, its row raised UnicodeEncodeError and the run went down with it.
            self._file = os.fdopen(fd, "w", newline="", encoding="utf-8", errors="surrogateescape")
        except BaseException:
            os.close(fd)
            raise
        self._writer = csv.writer(self._file)
        try:
            self.row("outcome", "reason", "file")
        except BaseException:
            self.close()
            raise

    def row(self, outcome: str, reason: str, file: str) -> None:
        try:
            self._writer.writerow((outcome, reason, file))
            self._file.flush()
        except OSError as exc:
            self.failure = self.failure or exc
            raise

    def close(self) -> None:
        try:
            # After a failed write the rest of the row is still buffered: closing tries it again, fails
            # again, and closes the descriptor all the same (CPython's buffered close).
            self._file.close()
        except OSError as exc:
            self.failure = self.failure or exc

    def __enter__(self) -> Report:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Source:
    """One candidate object: where it is for people, and how to open it."""

    label: str
    path: Path | None = None  # a plain file
    archive: Path | None = None  # a zip holding ``member``
    member: zipfile.ZipInfo | None = None
    # Decided while listing (outcome, reason): a folder that cannot be read, an archive or a DICOMDIR
    # that cannot be opened, a file a DICOMDIR names that is missing. Counted and reported like a file.
    verdict: tuple[str, str] | None = None


class _Skipped(Exception):
    """Not DICOM, or DICOM in a form not imported; ``reason`` names no file."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Refused(Exception):
    """An input that cannot be imported as it is; ``reason`` names no file."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _is_part10(head: bytes) -> bool:
    return len(head) >= _PART10_HEAD and head[128:132] == b"DICM"


def _os_reason(exc: OSError) -> str:
    # strerror, not str(exc): the latter names the file.
    return exc.strerror or type(exc).__name__


def find_sources(paths: list[Path], say: Callable[[str], None] | None = None) -> Iterator[Source]:
    """Every file under the given folders, zips and DICOMDIRs, in a stable order, listed as it is iterated.

    Raises FileNotFoundError, when called, for a path that does not exist (nothing is imported then);
    anything else that cannot be read becomes a Source with its verdict. A path inside another one given
    (or the same) is dropped, its files are the other's (they were imported and counted twice), and
    ``say`` hears it once, naming the paths by their place on the command line (a path often holds a
    patient's name).
    """
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
    roots, dropped = _distinct_roots(paths)
    if dropped and say is not None:
        said = ", ".join(dropped)
        say(f"paths given inside another one (or twice), by their place: {said}; their files are imported once")
    return _sources(roots, _Routes(roots), say)


def _distinct_roots(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """The paths none of which lies inside (or is) another one, as given; and the dropped ones by their
    place, counted from 1 ("3 (inside 1)"). Compared by (device, inode), of each path and of the folders
    above it resolved (a symlink, ``..``): on a filesystem blind to case (a vfat or exFAT stick, CIFS, a
    disc mounted check=relaxed) ``/usb/PT1`` and ``/usb/pt1`` are one folder, which compared as strings
    was imported twice. Walked as given (the report names files as the user wrote them)."""
    keys = [_key(os.stat(path)) for path in paths]
    above = [_ancestor_keys(path.resolve()) for path in paths]
    kept: list[Path] = []
    dropped: list[str] = []
    for n, path in enumerate(paths):
        inside = next((m for m, key in enumerate(keys) if key in above[n]), None)
        same = next((m for m in range(n) if keys[m] == keys[n]), None)
        if inside is not None:
            dropped.append(f"{n + 1} (inside {inside + 1})")
        elif same is not None:
            dropped.append(f"{n + 1} (the same as {same + 1})")
        else:
            kept.append(path)
    return kept, dropped


def _key(entry: os.stat_result) -> tuple[int, int]:
    return entry.st_dev, entry.st_ino


def _ancestor_keys(real: Path) -> set[tuple[int, int]]:
    """(device, inode) of each folder above ``real`` (those that can be looked at)."""
    keys = set()
    for folder in real.parents:
        try:
            keys.add(_key(os.stat(folder)))
        except OSError:
            continue
    return keys


class _Routes:
    """Every file once per run, whatever route names it: a folder walked, a DICOMDIR's record, a symlink,
    a hard link, a path given. ``diana import /cd/DICOMDIR /cd/SERIES`` imported the series twice.

    Without a set of every file seen (a million files: 120 MB): a file reached by its own directory
    entry in a folder walked is met once by that walk (folders are walked once by inode, and the roots do
    not overlap: _distinct_roots). Any other route to a file inside a folder given (a DICOMDIR's record,
    a symlink) is left to that folder's walk, and a route to a path given as a file to that path. What
    remains is kept by (device, inode): a file with several hard links, a DICOMDIR's record or a symlink
    outside every root, a file given by its path. The ones passed over are counted (``twice``).

    Folders and files given are compared by (device, inode), not by path: on a filesystem blind to case
    (vfat, exFAT, CIFS, isofs check=relaxed) a DICOMDIR's record ``PT0/ST0/IM0`` names the file the walk
    of ``pt0`` meets as ``pt0/st0/im0``, and was imported twice. The folders above a route's file are
    looked at once each (``_inside``: one entry per folder, not per file)."""

    def __init__(self, roots: list[Path]) -> None:
        self._folders = {_key(os.stat(root)) for root in roots if root.is_dir()}
        self._files = {_key(os.stat(root)) for root in roots if not root.is_dir()}
        self._inside: dict[Path, bool] = {}  # folder -> whether a folder given holds it
        self._seen: set[tuple[int, int]] = set()
        self.twice = 0

    def walked(self, real: Path) -> bool:
        """A folder given holds this real path: its walk meets the file by its own entry."""
        chain: list[Path] = []
        folder, answer = real.parent, False
        while True:
            if folder in self._inside:
                answer = self._inside[folder]
                break
            chain.append(folder)
            try:
                if _key(os.stat(folder)) in self._folders:
                    answer = True
                    break
            except OSError:
                pass
            if folder.parent == folder:
                break
            folder = folder.parent
        for below in chain:
            self._inside[below] = answer
        return answer

    def first(self, path: Path, entry: os.stat_result, *, walk: bool, explicit: bool = False) -> bool:
        """Whether ``path`` (stat ``entry``, its link not followed) is the first route to its file; counts
        the others. ``walk``: met by a folder's walk (else named by a DICOMDIR, or given)."""
        if stat.S_ISLNK(entry.st_mode) or not walk:
            try:
                entry = os.stat(path)
            except OSError:
                return True  # reading it says why, counted for that file
            if not explicit and (self.walked(Path(os.path.realpath(path))) or _key(entry) in self._files):
                self.twice += 1
                return False
        elif entry.st_nlink < 2:
            return True  # its own entry, its only one: met once by its walk
        key = _key(entry)
        if key in self._seen:
            self.twice += 1
            return False
        self._seen.add(key)
        return True


def _sources(roots: list[Path], routes: _Routes, say: Callable[[str], None] | None = None) -> Iterator[Source]:
    for root in roots:
        if root.is_dir():
            yield from _folder_sources(root, routes)
        else:
            yield from _file_sources(root, routes, explicit=True)
    # Said as what happened to these names, not "imported": the route left to may fail (a folder the walk
    # cannot list is counted as that one folder failed, its files not looked at).
    if routes.twice and say is not None:
        say(
            f"{routes.twice} files named again by another route (a DICOMDIR and a folder given, a symlink, "
            "a hard link) were passed over: each is looked at once, by its other route, and counted there"
        )


def _folder_sources(root: Path, routes: _Routes) -> Iterator[Source]:
    """The files of a folder tree. Symlinked folders inside it are followed, as a copied CD or an export
    that links its series expects; each folder (device, inode) is walked once, so a link back up the
    tree or a second link to a folder already walked adds nothing. A link to a folder outside the tree
    is rejected, said in the summary: followed, one link to / or a home folder imported the whole disk
    (and reached pipes that hang a read). A folder that cannot be read is failed."""
    unreadable: list[OSError] = []
    walked: set[tuple[int, int]] = set()
    inside = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable.append, followlinks=True):
        yield from _unreadable_folders(unreadable)
        try:
            folder = os.stat(dirpath)
        except OSError as exc:  # gone since it was listed
            unreadable.append(exc)
            dirnames.clear()
            continue
        if (folder.st_dev, folder.st_ino) in walked:
            dirnames.clear()
            continue
        walked.add((folder.st_dev, folder.st_ino))
        for name in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            target = Path(os.path.join(dirpath, name)).resolve()
            if target != inside and inside not in target.parents:
                dirnames.remove(name)
                yield Source(
                    os.path.join(dirpath, name),
                    verdict=("rejected", "symlinked folder outside the imported one (import it by its own path)"),
                )
        dirnames.sort()
        for name in sorted(filenames):
            if not _is_dicomdir(name):  # the file-set's index: the files it names are in this tree
                yield from _file_sources(Path(dirpath) / name, routes)
    yield from _unreadable_folders(unreadable)


def _unreadable_folders(errors: list[OSError]) -> Iterator[Source]:
    while errors:
        exc = errors.pop(0)
        yield Source(str(exc.filename), verdict=("failed", f"folder unreadable: {_os_reason(exc)}"))


def _file_sources(path: Path, routes: _Routes, explicit: bool = False) -> Iterator[Source]:
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
        if regular and not routes.first(path, os.lstat(path), walk=not explicit, explicit=explicit):
            return  # imported by another route (a folder given, a DICOMDIR, another link)
    except OSError as exc:  # a broken link, or gone since it was listed
        yield Source(str(path), verdict=("failed", f"storage: {_os_reason(exc)}"))
        return
    if not regular:  # a pipe or a device: reading it could wait for ever, or never end
        yield Source(str(path), verdict=("rejected", "not a regular file (a pipe, socket or device)"))
    elif _is_dicomdir(path.name) and explicit:
        yield from _fileset_sources(path, routes)
    elif _is_zip(path):
        yield from _zip_sources(path)
    else:
        yield Source(str(path), path=path)


def _is_zip(path: Path) -> bool:
    """A zip by its first bytes, and only when it is not Part-10. Not zipfile.is_zipfile alone: it looks for
    an end record in the last 64 KiB, which DICOM pixel data may hold (such a file was opened as a zip of
    no members, and vanished from the counts); and a Part-10 preamble may begin with a zip's signature.
    A file that may be a bare data set is never a zip (its pixel data may hold a whole one). Any other file
    is one when its end record points at a central directory of at least one entry (_zip_directory): a
    self-extracting archive (``export.exe``), a zip saved without its name (it was skipped as not DICOM,
    its images never seen), a ``.zip`` with data before its first header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_PART10_HEAD)
    except OSError:
        return False  # reading it as a file says why, counted for that file
    if _is_part10(head):
        return False
    if head[:4] in (_ZIP_MAGIC, _ZIP_EMPTY):
        return True
    if _may_be_bare(head):  # before the name: a bare data set named .zip is a data set
        return False
    try:
        directory = _zip_directory(path)
    except OSError:
        return False  # reading it as a file says why
    return directory is not None and directory[0] > 0


# The end of central directory record (22 bytes and a comment of up to 64 KiB), the zip64 end record's
# locator just before it, and the zip64 end record before that (APPNOTE 4.3.14-16).
_END = struct.Struct("<4s4H2LH")
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_DIRECTORY_ENTRY = b"PK\x01\x02"
# A zip whose central directory is larger is not opened (rejected with _TOO_MANY_ENTRIES): zipfile reads
# the whole directory into a ZipInfo per entry, about 1 KiB each (200,000 entries: 1.5 s, 215 MB), once
# at the listing and once per worker thread that reads a member (_OpenArchives); a crafted directory
# claiming millions of entries took gigabytes. A DICOM export holds far fewer files than this.
_MAX_ZIP_ENTRIES = 100_000
_MAX_ZIP_DIRECTORY_BYTES = 32 << 20
_TOO_MANY_ENTRIES = (
    f"zip of more than {_MAX_ZIP_ENTRIES} entries or a central directory over {_MAX_ZIP_DIRECTORY_BYTES >> 20} MiB "
    "(unzip it with another tool, import the folder)"
)


def _zip_directory(path: Path) -> tuple[int, int] | None:
    """(entries, size in bytes) of the central directory that the file's end record points at, read from the
    end record (or the zip64 one) alone, without the directory: None unless a directory entry's signature
    is where the directory begins (bytes that only look like an end record point at nothing). The
    directory is placed by its size, back from the end record, as zipfile places it: a zip after a stub
    (a self-extracting archive) has offsets counted from the zip's start."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        tail_at = max(0, size - _END.size - 0xFFFF)
        fh.seek(tail_at)
        tail = fh.read()
        at = tail.rfind(b"PK\x05\x06")
        while at >= 0 and (at + _END.size > len(tail) or at + _END.size + _END.unpack_from(tail, at)[7] > len(tail)):
            at = tail.rfind(b"PK\x05\x06", 0, at)  # a comment longer than what follows: not the record
        if at < 0:
            return None
        entries, directory_size = _END.unpack_from(tail, at)[4:6]
        directory_end = tail_at + at
        # A zip64 end record and its locator before it, as zipfile looks for them (whatever the values of
        # the end record, which a writer may leave below their 0xFFFF... markers).
        record_at = directory_end - _END64_LOCATOR.size - _END64.size
        if record_at >= 0:
            fh.seek(record_at)
            record = fh.read(_END64.size + _END64_LOCATOR.size)
            if record[:4] == b"PK\x06\x06" and record[_END64.size : _END64.size + 4] == b"PK\x06\x07":
                entries, directory_size = _END64.unpack_from(record)[7:9]
                directory_end = record_at
        if directory_size > directory_end:
            return None
        if entries == 0:
            return (0, 0) if directory_size == 0 else None
        fh.seek(directory_end - directory_size)
        if fh.read(4) != _DIRECTORY_ENTRY:
            return None
        return entries, directory_size


def _unopened(path: Path, kind: str, exc: Exception) -> Source:
    """An archive or a DICOMDIR that cannot be opened: failed when the disk says so, else rejected."""
    if isinstance(exc, OSError):
        return Source(str(path), verdict=("failed", f"storage: {_os_reason(exc)}"))
    return Source(str(path), verdict=("rejected", f"{kind} unreadable ({type(exc).__name__})"))


def _zip_sources(path: Path) -> Iterator[Source]:
    try:
        directory = _zip_directory(path)
    except OSError as exc:
        yield _unopened(path, "zip", exc)
        return
    if directory is not None and (directory[0] > _MAX_ZIP_ENTRIES or directory[1] > _MAX_ZIP_DIRECTORY_BYTES):
        yield Source(str(path), verdict=("rejected", _TOO_MANY_ENTRIES))  # not parsed: its size alone is known
        return
    try:
        with zipfile.ZipFile(path) as zf:
            entries = zf.infolist()
    except Exception as exc:  # a damaged central directory raises more than BadZipFile (names undecodable...)
        yield _unopened(path, "zip", exc)
        return
    members = [info for info in entries if not info.is_dir()]
    if entries and not members:  # counted: a zip of folders alone vanished from the counts
        yield Source(str(path), verdict=("skipped", "zip of folders only, no file in it"))
    for info in members:
        yield Source(f"{path}:{info.filename}", archive=path, member=info)


def _fileset_sources(dicomdir: Path, routes: _Routes) -> Iterator[Source]:
    """The files a DICOMDIR names (its records' Referenced File IDs), in its folder.

    Read here rather than with pydicom's FileSet, which drops a record whose file is missing with a
    warning naming the file's path: such a record is failed here, like a file that cannot be read.
    A name not there as written is looked up regardless of case and ISO 9660 version (_CaseBlindNames):
    Linux mounts an ISO 9660 disc without Rock Ridge lower-cased (``images/im0001`` for
    ``IMAGES\\IM0001``), with map=off or copied raw as ``IM0001.;1``.
    """
    import pydicom

    try:
        records = pydicom.dcmread(dicomdir).DirectoryRecordSequence
        file_ids = [record.ReferencedFileID for record in records if record.get("ReferencedFileID")]
    except Exception as exc:  # not DICOM, or not a directory: pydicom raises many kinds
        yield _unopened(dicomdir, "DICOMDIR", exc)
        return
    folder = dicomdir.parent
    inside = folder.resolve()
    outside = ("rejected", "DICOMDIR record names a file outside its folder")
    case_blind = _CaseBlindNames(folder)
    # A Referenced File ID is the path's components (one value: a file in the DICOMDIR's folder).
    for components in dict.fromkeys((i,) if isinstance(i, str) else tuple(i) for i in file_ids):
        relative = Path(*components)
        path = folder / relative
        if relative.anchor or not Path(os.path.realpath(inside / relative)).is_relative_to(inside):
            yield Source(str(path), verdict=outside)
            continue
        try:
            path.stat()
        except FileNotFoundError:
            try:
                found = case_blind.find(relative.parts)
            except _Refused as exc:
                yield Source(str(path), verdict=("failed", exc.reason))
                continue
            if not Path(os.path.realpath(found)).is_relative_to(inside):  # a symlink out, named in other case
                yield Source(str(found), verdict=outside)
                continue
            path = found
        except OSError:
            pass  # opening it says why
        try:
            if not routes.first(path, os.lstat(path), walk=False):
                continue  # a folder given holds it, or another route named it already
        except OSError:
            pass  # opening it says why
        yield Source(str(path), path=path)


class _CaseBlindNames:
    """A file-set's files found by their names in any case and with or without an ISO 9660 version
    (``IM0001.;1``, ``IM0001;1``: _name_key): each folder is listed once, when a name in it is not there
    as written (a file there as written costs no listing). In each folder the name as written wins, else
    the one name equal to it but for case and version; several such names are not guessed between.
    """

    _MISSING = "file named by the DICOMDIR missing (renamed? import its folder instead)"
    _AMBIGUOUS = (
        "file named by the DICOMDIR ambiguous: several names differ from it only in case or ISO 9660 version "
        "(import its folder instead)"
    )

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._listings: dict[Path, dict[str, list[str]] | OSError] = {}  # folder -> _name_key -> names

    def find(self, parts: tuple[str, ...]) -> Path:
        """The path of ``parts`` under the folder; raises _Refused (its reason) when there is not one."""
        path = self._folder
        for part in parts:
            listing = self._listing(path)
            if isinstance(listing, OSError):
                if isinstance(listing, (FileNotFoundError, NotADirectoryError)):
                    raise _Refused(self._MISSING)
                raise _Refused(f"storage: {_os_reason(listing)}")
            names = listing.get(_name_key(part), [])
            if part in names:
                path /= part
            elif len(names) == 1:
                path /= names[0]
            else:
                raise _Refused(self._AMBIGUOUS if names else self._MISSING)
        return path

    def _listing(self, folder: Path) -> dict[str, list[str]] | OSError:
        if folder not in self._listings:
            try:
                names = os.listdir(folder)
            except OSError as exc:
                self._listings[folder] = exc
            else:
                listing: dict[str, list[str]] = {}
                for name in names:
                    listing.setdefault(_name_key(name), []).append(name)
                self._listings[folder] = listing
        return self._listings[folder]


class _OpenArchives:
    """Each worker thread's open zip, kept while its next members come from the same archive.

    Opening a zip parses its central directory (185 ms for 20,000 members), once per member before.
    One per thread, not one per archive: a folder of many zips holds at most one open per worker,
    and no thread closes a zip another is reading (members are handed out in order, so a thread
    reopens only on moving to the next archive)."""

    def __init__(self) -> None:
        self._held = threading.local()
        self._lock = threading.Lock()
        self._open: set[zipfile.ZipFile] = set()

    def get(self, path: Path) -> zipfile.ZipFile:
        held: tuple[Path, zipfile.ZipFile] | None = getattr(self._held, "zip", None)
        if held is not None and held[0] == path:
            return held[1]
        self._held.zip = None
        if held is not None:
            self._close(held[1])
        zf = zipfile.ZipFile(path)
        with self._lock:
            self._open.add(zf)
        self._held.zip = (path, zf)
        return zf

    def _close(self, zf: zipfile.ZipFile) -> None:
        with self._lock:
            self._open.discard(zf)
        zf.close()

    def close_all(self) -> None:
        with self._lock:
            left, self._open = self._open, set()
        for zf in left:
            zf.close()


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, folder: Path, max_bytes: int) -> tuple[ScratchFile, bool]:
    """The member as a temporary file in ``folder``, and whether it is Part-10 (else it may be a bare data
    set): its first 132 bytes are read from the stream, so a non-DICOM member (an installer, a viewer) is
    never written. Raises _Skipped for such a member, _Refused for one that cannot be read, or larger
    than ``max_bytes``."""
    if info.flag_bits & _ZIP_ENCRYPTED:
        raise _Refused("zip member encrypted")
    try:
        with zf.open(info) as src:
            head = src.read(_PART10_HEAD)
            part10 = _is_part10(head)
            if not part10 and not _may_be_bare(head):
                # A .zip member that is a zip: said (it was counted "not DICOM", exit status 0); a viewer's
                # .jar or a .docx is a zip too, and is not DICOM.
                if head.startswith(_ZIP_MAGIC) and info.filename.lower().endswith(".zip"):
                    raise _Refused("zip inside a zip: unzip the outer one and import its folder")
                raise _Skipped(_NOT_DICOM)
            # zipfile reads no more than the size the directory declares: checking it bounds the file.
            if info.file_size > max_bytes:
                raise _Refused(f"zip member larger than [receiver] max_inflated_bytes ({max_bytes})")
            made = ScratchFile(folder, suffix=".import")  # locked while it exists: the receiver's sweep leaves it
            try:
                with made.open("wb") as dst:
                    dst.write(head)
                    shutil.copyfileobj(src, dst, 1 << 20)
            except BaseException:
                made.remove()
                raise
            return made, part10
    except (NotImplementedError, RuntimeError) as exc:  # Deflate64 (Windows Explorer), or no bz2/lzma here
        raise _Refused(
            f"zip member: unsupported compression method {info.compress_type} (unzip it with another tool, "
            "import the folder)"
        ) from exc
    except _CORRUPT_MEMBER as exc:
        raise _Refused("zip member corrupt") from exc


def _may_be_bare(head: bytes) -> bool:
    """Not Part-10, but it may be a data set without preamble and file meta: it begins with group 0008
    (or 0002, a file meta without preamble) in either byte order. Only such files are parsed to tell."""
    return not _is_part10(head) and head[:2] in _BARE_GROUPS


def _wrap_bare(path: Path, folder: Path) -> ScratchFile:
    """``path``, a bare data set (no preamble, no file meta: what old modalities and archives wrote), as a
    temporary Part-10 file in ``folder``: preamble, ``DICM`` and a file meta before its bytes, which are
    unchanged. Only in Implicit VR Little Endian, DICOM's default transfer syntax and the one a data
    set's bytes fully determine; explicit VR may hold compressed pixel data of a syntax the bytes do not
    name. The file meta is the same for the same data set (a second import lands the same bytes).
    Raises _Skipped: not DICOM, or a bare data set in another encoding."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ImplicitVRLittleEndian

    try:
        # Opened by descriptor: the file object's name is then a number, and pydicom's warnings about
        # the file ("... found in file <name>") cannot carry a path that names a patient.
        with open(os.open(path, os.O_RDONLY), "rb") as fh:
            try:
                ds = pydicom.dcmread(fh, force=True, stop_before_pixels=True, defer_size=1024)
                uids = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
                encoding = ds.original_encoding
            except OSError as exc:
                if exc.errno is not None:  # the disk's (EIO...): failed, to try again
                    raise
                raise _Skipped(_NOT_DICOM) from exc  # pydicom's, without an errno: a value cut short
            except Exception as exc:  # pydicom raises many kinds on what is not DICOM
                raise _Skipped(_NOT_DICOM) from exc
    except OSError:  # the file itself could not be opened or read
        raise
    if not all(uids):  # read "with force", much that is not DICOM passes as a data set of nothing useful
        raise _Skipped(_NOT_DICOM)
    if ds.file_meta or encoding != (True, True):
        raise _Skipped(_BARE_OTHER)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(uids[0]), UID(uids[1])
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DIANA_IMPORT"  # not pydicom's default, which names its version
    made = ScratchFile(folder, suffix=".import")  # locked while it exists: the receiver's sweep leaves it
    try:
        with made.open("wb") as out, open(path, "rb") as src:
            out.write(b"\0" * 128 + b"DICM")
            writer = DicomFileLike(out)
            writer.is_little_endian, writer.is_implicit_VR = True, False
            write_file_meta_info(writer, meta, enforce_standard=True)
            shutil.copyfileobj(src, out, 1 << 20)
    except BaseException:
        made.remove()
        raise
    return made


class Importer:
    def __init__(self, ingest: Ingest, workers: int = 8):
        self.ingest = ingest
        self.workers = workers

    @contextmanager
    def _part10_file(self, source: Source, archives: _OpenArchives) -> Iterator[tuple[Path, bool, bool]]:
        """The source as a local Part-10 file for the block: (path, ours, wrapped). Ours: a temporary file
        made here (a zip member, a bare data set given a file meta), which may land by a hard link.
        Raises _Skipped when it is not DICOM."""
        folder = self.ingest.landing.incoming
        if source.path is not None:
            with open(source.path, "rb") as fh:
                head = fh.read(_PART10_HEAD)
            if _is_part10(head):
                yield source.path, False, False
                return
            if not _may_be_bare(head):
                raise _Skipped(_NOT_DICOM)
            made, part10 = _wrap_bare(source.path, folder), False
        else:
            # A zip member is extracted next to the landing store, then landed like any file.
            assert source.archive is not None and source.member is not None, "a source is a path or a zip member"
            made, part10 = _extract(archives.get(source.archive), source.member, folder, self.ingest.max_inflated_bytes)
            if not part10:
                with made as bare:
                    made = _wrap_bare(bare.path, folder)
        with made:
            yield made.path, True, not part10

    def _one(self, archives: _OpenArchives, source: Source) -> tuple[str, str | None]:
        """('imported' | 'skipped' | 'rejected' | 'failed', reason)."""
        if source.verdict is not None:
            return source.verdict
        try:
            with self._part10_file(source, archives) as (path, ours, wrapped):
                self.ingest.accept_file(path, "IMPORT", owned=ours)
            return "imported", _WRAPPED if wrapped else None
        except _Skipped as exc:
            return "skipped", exc.reason
        except _Refused as exc:
            return "rejected", exc.reason
        except InvalidIdentifiers as exc:
            return "rejected", f"invalid identifiers: {exc}"
        except Truncated as exc:  # shorter than it says: a copy cut short (a CD still copying) may pass once whole
            return "failed", f"truncated: {exc}"
        except HeaderError as exc:
            return "rejected", f"unreadable: {exc}"
        except PublishRefused as exc:  # permanent: running the import again cannot help
            return "rejected", f"broker refuses the event for good: {exc.code}"
        except PublishError as exc:
            return "failed", f"{_BROKER}{exc}"
        except OSError as exc:
            return "failed", f"storage: {_os_reason(exc)}"
        except zipfile.BadZipFile:  # the archive, changed since it was listed, no longer opens
            return "rejected", "zip unreadable (BadZipFile)"
        except Exception as exc:  # one file no branch expects must not stop the others; its text may name it
            return "failed", f"unexpected error ({type(exc).__name__})"

    def run(
        self,
        sources: Iterable[Source],
        progress: Callable[[int], None] | None = None,
        report: Callable[[str, str, str], None] | None = None,
    ) -> ImportSummary:
        """Import the sources as they are listed: at most ``_IN_FLIGHT_PER_WORKER`` per worker are handed
        to the pool at once, so memory does not grow with the number of files and the first ones are
        imported while the tree is still walked (a list of a million sources, and pool.map's million
        futures, took 2 GiB before anything was imported). Outcomes are counted as they complete.

        ``report``: takes (outcome, reason, file) of each file not imported as it comes, instead of
        ``summary.not_imported`` (which then stays empty). On Ctrl-C the files in flight are finished and
        counted, the rest is not looked at, and the summary says ``interrupted``; so too after
        ``_BROKER_DOWN_AFTER`` publish failures in a row (``broker_down``), and when ``report`` raises an
        OSError (``report_error``: the disk of the report full; going on would import files whose failure
        nobody could find, and the same command run again imports the rest without duplicates)."""
        summary = ImportSummary()
        archives = _OpenArchives()
        window = self.workers * _IN_FLIGHT_PER_WORKER
        running: dict[Future[tuple[str, str | None]], Source] = {}
        finished: queue.SimpleQueue[Future[tuple[str, str | None]]] = queue.SimpleQueue()

        def settle(future: Future[tuple[str, str | None]]) -> None:
            source = running.pop(future, None)
            if source is not None:  # not one cancelled, nor one counted already
                # Taken out first: a Ctrl-C inside the count (its report row) must not leave it to be
                # waited for again (it hung) or counted twice; at worst that one row is cut.
                stopped = summary.stopped
                self._count(summary, source, *future.result(), report)
                if progress:
                    progress(1)
                if summary.stopped and not stopped:
                    if summary.broker_down:
                        log.error("import.broker_down", failures_in_a_row=_BROKER_DOWN_AFTER)
                    else:
                        error = summary.report_error
                        log.error(
                            "import.report_failed", error=type(error).__name__, errno=getattr(error, "errno", None)
                        )
                    drop_waiting()

        def drop_waiting() -> None:
            """The files handed out but not started are not looked at (those started finish)."""
            for future in [f for f in running if f.cancel()]:
                del running[future]

        try:
            with ThreadPoolExecutor(self.workers) as pool:
                try:
                    for source in sources:
                        while len(running) >= window and not summary.stopped:
                            settle(finished.get())
                        if summary.stopped:
                            break
                        future = pool.submit(self._one, archives, source)
                        running[future] = source
                        future.add_done_callback(finished.put)
                        while not finished.empty():  # counted and reported as they finish, not a window later
                            settle(finished.get())
                    while running:
                        settle(finished.get())
                except KeyboardInterrupt:
                    summary.interrupted = True
                    drop_waiting()
                    # Started: finished (each within the publish timeout) and counted. Waited for
                    # themselves, not through the queue: one the Ctrl-C caught between its submit and
                    # its callback, or already taken off the queue, would never come again.
                    for future in list(running):
                        future.exception()
                        settle(future)
        finally:
            archives.close_all()
        return summary

    @staticmethod
    def _count(
        summary: ImportSummary,
        source: Source,
        outcome: str,
        reason: str | None,
        report: Callable[[str, str, str], None] | None,
    ) -> None:
        if outcome == "imported":
            summary.imported += 1
            summary.wrapped += reason == _WRAPPED
            summary._broker_failures = 0
            return
        reason = reason or "no reason given"
        if outcome == "failed" and reason.startswith(_BROKER):
            summary._broker_failures += 1
            summary.broker_down |= summary._broker_failures >= _BROKER_DOWN_AFTER
        getattr(summary, outcome)[reason] += 1
        if report is not None:
            if summary.report_error is None:  # after a failed row, the next one would be cut or misplaced
                try:
                    report(outcome, reason, source.label)
                except OSError as exc:
                    summary.report_error = exc
        else:
            summary.not_imported.append((outcome, reason, source.label))
        if outcome != "skipped":  # a folder of a viewer's files is not worth a warning each
            log.warning(f"import.{outcome}", reason=reason)  # which file: the report (--report)
