"""What a destination with study or alert rules was sent of each study, so that it gets each instance once.

A ``whole_study`` rule sends a study once it is complete. Instances that arrive after that make the
study AMENDED; once it is complete again, the destination gets the study's instances it was not sent
before, not the whole study again. The aggregate cannot say which those are: it keeps the first
completion's time only, event times may arrive out of order, and a compacted ``dicom.studies`` may hold
an amended study's latest record alone. So each destination keeps its own record: one file per study,
``<[routing] state_dir>/<destination>/<StudyInstanceUID>.json``, the SOP Instance UIDs the destination
accepted (delivered: an instance dead-lettered is not recorded, so the study's next completion or alert
tries it again), appended once a batch is delivered and before its offsets are committed (a crash in
between sends nothing again). A record lost, unreadable or removed makes the study's next complete
record, or its next alert, send every matching instance again: at least once, never fewer.

A ``dose_alert`` rule uses the same record: a study raises several alerts (CTDIvol and DLP, several
events) and the dose worker publishes them again after a crash or in a replay; each sends only the
instances not sent before, so the first (once the study is complete) sends the study and a later one
what arrived since. The record also says that the study was alerted (``"alerted": true``): its late
instances follow at its next complete record, as a whole_study rule's do, without waiting for another
alert (a dose report that comes late raises none; a late image never does). A record written before
that flag existed counts as not alerted: its late instances wait for an alert. The record is the
destination's, not a rule's: its whole_study and dose_alert rules send the same objects to the same
place, so what one sent the other does not send again. So do its plain (instance) rules when it has a
whole_study or a dose_alert rule: an instance sent on its arrival is recorded (a study's record without
the flag), and one the record lists with the SHA-256 its arrival event carries is not sent on its
arrival, so the destination gets it once whichever rule matched first, and a corrected copy (other
bytes under the same SOP Instance UID, archived under REPLACE) is sent on its own arrival. A destination
with plain rules only keeps no record.

The file is JSON lines, appended (and fsync'd) once a delivered batch sent something of the study: each
line ``{"sent": {"<SOP Instance UID>": "<SHA-256>" or null}, "alerted": true}`` (the flag only when it
is set); a file is read as the union of its lines, a later line's digest for a SOP replacing an earlier
one. A file written before these lines (one object ``{"sop_instance_uids": [...]}``, no digests) is a
record of one line whose digests are unknown (null), rewritten whole at its next write (it has no line end). A line that cannot be read (a write cut by a crash)
is left out, its instances sent again; the file is then rewritten whole (atomically), as it is once it
has ``COMPACT_AFTER_LINES`` lines. Records not written for ``retention_s`` are removed (``prune``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from diana.durable import PRIVATE_FILE_MODE, fsync_dir, makedirs_durable, write_atomic
from diana.schemas.uid import is_valid_uid

__all__ = ["COMPACT_AFTER_LINES", "StudiesSent"]

log = structlog.get_logger("diana.route")

# A record with this many lines is rewritten as one when the next is appended: a study sent in many
# small batches (one instance a batch) is read as a few lines, not thousands.
COMPACT_AFTER_LINES = 64


@dataclass
class _Record:
    """A study's record as read: SOP Instance UID -> the SHA-256 sent (None: not known), the alerted flag,
    its lines, and whether its file is to be rewritten whole rather than appended to (a line that could
    not be read, or a last line without its end: a file of an earlier version, or a write cut by a crash)."""

    sent: dict[str, str | None] = field(default_factory=dict)
    alerted: bool = False
    lines: int = 0
    rewrite: bool = False


class StudiesSent:
    """One destination's record of the instances it was sent of each study, by its whole_study, dose_alert
    and (beside those) plain rules.

    ``folder`` None keeps the record in memory only (lost at a restart). Instances planned for a batch
    are claimed first (with the SHA-256 of what is sent, when known), so that another message of the
    batch does not plan them again; each the destination accepts is marked ``delivered``, and only those
    are written once the batch is done (``write_delivered``); claims and deliveries of a batch that is
    not done are forgotten."""

    def __init__(self, destination: str, folder: Path | None, retention_s: float = 0.0) -> None:
        """``retention_s``: ``prune`` removes the records not written for that long; 0 keeps them for ever."""
        self.destination, self.folder, self.retention_s = destination, folder, retention_s
        self._in_memory: dict[str, _Record] = {}
        self._claimed: dict[str, dict[str, str | None]] = {}
        self._delivered: dict[str, dict[str, str | None]] = {}
        self._alerts_claimed: set[str] = set()  # studies whose alert the batch being delivered plans
        # The records read while a batch is planned, read once each (a plain rule's instances of one
        # study ask for its record once each); forgotten with the claims, after each write.
        self._read: dict[str, _Record] = {}

    def sent(self, study_uid: str) -> dict[str, str | None]:
        """SOP Instance UID -> SHA-256 (None: not known) of the study's instances sent before, or claimed
        by the batch being delivered."""
        return {**self._recorded(study_uid).sent, **self._claimed.get(study_uid, {})}

    def sent_as(self, study_uid: str, sop_instance_uid: str, sha256: str) -> bool:
        """Whether these bytes of the instance were sent before, or are claimed by the batch being delivered
        (a digest not known is not these bytes). ``sent`` without copying a study's whole record."""
        claimed = self._claimed.get(study_uid, {})
        if sop_instance_uid in claimed:
            return claimed[sop_instance_uid] == sha256
        return self._recorded(study_uid).sent.get(sop_instance_uid) == sha256

    def alerted(self, study_uid: str) -> bool:
        """Whether a dose alert of the study was delivered (or is, by the batch being delivered)."""
        return study_uid in self._alerts_claimed or self._recorded(study_uid).alerted

    def claim(self, study_uid: str, sent: Mapping[str, str | None]) -> None:
        """The batch plans these instances (SOP Instance UID -> SHA-256 of the object sent, None if not known)."""
        self._claimed.setdefault(study_uid, {}).update(sent)

    def delivered(self, study_uid: str, sop_instance_uid: str) -> None:
        """The destination accepted a claimed instance: recorded when the batch is done. An instance never
        claimed (a destination with plain rules only) is not recorded."""
        claimed = self._claimed.get(study_uid, {})
        if sop_instance_uid in claimed:
            self._delivered.setdefault(study_uid, {})[sop_instance_uid] = claimed[sop_instance_uid]

    def claim_alert(self, study_uid: str) -> None:
        """The batch delivers an alert of the study (whatever it sends of it: perhaps nothing new)."""
        self._alerts_claimed.add(study_uid)

    def write_delivered(self) -> None:
        """Record what the done batch delivered, and its studies alerted. A record that cannot be written is
        logged, not retried: its study's next completion or alert sends those instances again (at least once)."""
        for study_uid in set(self._delivered) | self._alerts_claimed:
            if not is_valid_uid(study_uid):  # its file name would be no UID of ours (an index's answer)
                log.warning("route.sent_record_not_written", destination=self.destination, error="not a UID")
                continue
            record = self._recorded(study_uid)
            new = {
                sop: digest
                for sop, digest in self._delivered.get(study_uid, {}).items()
                if sop not in record.sent or (digest is not None and record.sent[sop] != digest)
            }
            newly_alerted = study_uid in self._alerts_claimed and not record.alerted
            if not new and not newly_alerted:
                continue  # nothing new to record
            if self.folder is None:
                self._in_memory[study_uid] = _Record({**record.sent, **new}, record.alerted or newly_alerted)
                continue
            try:
                self._write(study_uid, record, new, newly_alerted)
            except OSError as exc:
                log.warning("route.sent_record_not_written", destination=self.destination, error=type(exc).__name__)
        self.forget_claimed()

    def _write(self, study_uid: str, record: _Record, new: dict[str, str | None], newly_alerted: bool) -> None:
        path = self._path(study_uid)
        if record.rewrite or record.lines >= COMPACT_AFTER_LINES:
            # Rewritten whole: a line not read is dropped (a cut last line would run into the appended one).
            whole = _line({**record.sent, **new}, record.alerted or newly_alerted)
            write_atomic(path, whole)
            return
        _append_durable(path, _line(new, newly_alerted))

    def check_folder(self) -> None:
        """Create the folder and write a file in it: OSError now, at start, rather than a record lost
        (logged only) with every batch."""
        if self.folder is None:
            return
        makedirs_durable(self.folder)
        probe = self.folder / ".writable"
        write_atomic(probe, b"")
        probe.unlink()

    def prune(self, now: float | None = None) -> int:
        """Remove the study records not written for ``retention_s`` (by their modification time, which
        each append sets); how many were removed. None with ``retention_s`` 0, or kept in memory."""
        if self.folder is None or self.retention_s <= 0:
            return 0
        oldest = (time.time() if now is None else now) - self.retention_s
        removed = 0
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("route.sent_records_not_pruned", destination=self.destination, error=type(exc).__name__)
            return 0
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < oldest:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("route.sent_records_not_pruned", destination=self.destination, error=type(exc).__name__)
                return removed
        if removed:
            log.info("route.sent_records_pruned", destination=self.destination, removed=removed)
        return removed

    def forget_claimed(self) -> None:
        """Before a batch: what an earlier one claimed and did not finish was not sent for sure."""
        self._claimed.clear()
        self._delivered.clear()
        self._alerts_claimed.clear()
        self._read.clear()

    def _path(self, study_uid: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{study_uid}.json"

    def _recorded(self, study_uid: str) -> _Record:
        """The study's record, read once a batch."""
        if study_uid not in self._read:
            self._read[study_uid] = self._read_record(study_uid)
        return self._read[study_uid]

    def _read_record(self, study_uid: str) -> _Record:
        if self.folder is None:
            kept = self._in_memory.get(study_uid, _Record())
            return _Record(dict(kept.sent), kept.alerted)
        if not is_valid_uid(study_uid):  # never a path of ours; such a study has no archived files either
            return _Record()
        try:
            data = self._path(study_uid).read_bytes()
        except FileNotFoundError:
            return _Record()
        except OSError as exc:
            # Unreadable: the study is sent whole again rather than not at all.
            log.warning("route.sent_record_unreadable", destination=self.destination, error=type(exc).__name__)
            return _Record(rewrite=True)
        record = _Record(rewrite=bool(data) and not data.endswith(b"\n"))
        for raw in data.splitlines():
            if not raw.strip():
                continue
            record.lines += 1
            try:
                sent, alerted = _parse_line(raw)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # Not ours, or cut by a crash: its instances are sent again rather than not at all.
                log.warning("route.sent_record_unreadable", destination=self.destination, error=type(exc).__name__)
                record.rewrite = True
                continue
            record.sent.update(sent)
            record.alerted = record.alerted or alerted
        return record


def _line(sent: Mapping[str, str | None], alerted: bool) -> bytes:
    entry: dict[str, object] = {"sent": dict(sorted(sent.items()))}
    if alerted:
        entry["alerted"] = True
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def _parse_line(raw: bytes) -> tuple[dict[str, str | None], bool]:
    """(SOP Instance UID -> SHA-256 or None, alerted) of one line; a line of an earlier version lists
    ``sop_instance_uids`` without digests."""
    entry = json.loads(raw)
    if "sent" in entry:
        sent = {
            sop: digest if isinstance(digest, str) else None
            for sop, digest in entry["sent"].items()
            if isinstance(sop, str)
        }
    else:
        sent = dict.fromkeys((s for s in entry["sop_instance_uids"] if isinstance(s, str)), None)
    return sent, entry.get("alerted") is True


def _append_durable(path: Path, line: bytes) -> None:
    """Append ``line`` and fsync it; a file created so is fsync'd in its folder too."""
    created = not path.exists()
    if created:
        makedirs_durable(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
