"""What a destination with study or alert rules was sent of each study, so that it gets each instance once.

A ``whole_study`` rule sends a study once it is complete. Instances that arrive after that make the
study AMENDED; once it is complete again, the destination gets the study's instances it was not sent
before (delivered or dead-lettered), not the whole study again. The aggregate cannot say which those
are: it keeps the first completion's time only, event times may arrive out of order, and a compacted
``dicom.studies`` may hold an amended study's latest record alone. So each destination keeps its own
record: one JSON file per study, ``<[routing] state_dir>/<destination>/<StudyInstanceUID>.json``, the
SOP Instance UIDs sent, written once a batch is delivered and before its offsets are committed (a crash
in between sends nothing again). A record lost, unreadable or removed makes the study's next complete
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
the flag), and one the record lists is not sent on its arrival, so the destination gets it once whichever
rule matched first. A destination with plain rules only keeps no record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import structlog

from diana.durable import makedirs_durable, write_atomic
from diana.schemas.uid import is_valid_uid

__all__ = ["StudiesSent"]

log = structlog.get_logger("diana.route")


class StudiesSent:
    """One destination's record of the instances sent of each study routed whole or on a dose alert.

    ``folder`` None keeps the record in memory only (lost at a restart). Instances planned for a batch
    are claimed first, so that a second record of the same study in the batch does not plan them again,
    and written only once the batch is delivered (``write_claimed``) or forgotten if it is not.
    """

    def __init__(self, destination: str, folder: Path | None) -> None:
        self.destination, self.folder = destination, folder
        self._in_memory: dict[str, tuple[set[str], bool]] = {}
        self._claimed: dict[str, set[str]] = {}
        self._alerts_claimed: set[str] = set()  # studies whose alert the batch being delivered plans
        # The records read while a batch is planned, read once each (a plain rule's instances of one
        # study ask for its record once each); forgotten with the claims, after each write.
        self._read: dict[str, tuple[set[str], bool]] = {}

    def sent(self, study_uid: str) -> set[str]:
        """The SOP Instance UIDs of the study sent before, or claimed by the batch being delivered."""
        return self._recorded(study_uid)[0] | self._claimed.get(study_uid, set())

    def alerted(self, study_uid: str) -> bool:
        """Whether a dose alert of the study was delivered (or is, by the batch being delivered)."""
        return study_uid in self._alerts_claimed or self._recorded(study_uid)[1]

    def claim(self, study_uid: str, sop_instance_uids: Iterable[str]) -> None:
        self._claimed.setdefault(study_uid, set()).update(sop_instance_uids)

    def claim_alert(self, study_uid: str) -> None:
        """The batch delivers an alert of the study (whatever it sends of it: perhaps nothing new)."""
        self._alerts_claimed.add(study_uid)

    def write_claimed(self) -> None:
        """Record what the delivered batch claimed. A record that cannot be written is logged, not
        retried: its study's next completion sends those instances again (at least once)."""
        for study_uid in set(self._claimed) | self._alerts_claimed:
            if not is_valid_uid(study_uid):  # its file name would be no UID of ours (an index's answer)
                log.warning("route.sent_record_not_written", destination=self.destination, error="not a UID")
                continue
            claimed = self._claimed.get(study_uid, set())
            recorded, was_alerted = self._recorded(study_uid)
            alerted = was_alerted or study_uid in self._alerts_claimed
            if claimed <= recorded and alerted == was_alerted:
                continue  # nothing new to record
            sent = recorded | claimed
            if self.folder is None:
                self._in_memory[study_uid] = (sent, alerted)
                continue
            record: dict[str, object] = {"sop_instance_uids": sorted(sent)}
            if alerted:
                record["alerted"] = True
            try:
                write_atomic(self._path(study_uid), json.dumps(record).encode())
            except OSError as exc:
                log.warning("route.sent_record_not_written", destination=self.destination, error=type(exc).__name__)
        self.forget_claimed()

    def check_folder(self) -> None:
        """Create the folder and write a file in it: OSError now, at start, rather than a record lost
        (logged only) with every batch."""
        if self.folder is None:
            return
        makedirs_durable(self.folder)
        probe = self.folder / ".writable"
        write_atomic(probe, b"")
        probe.unlink()

    def forget_claimed(self) -> None:
        """Before a batch: what an earlier one claimed and did not deliver was not sent for sure."""
        self._claimed.clear()
        self._alerts_claimed.clear()
        self._read.clear()

    def _path(self, study_uid: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{study_uid}.json"

    def _recorded(self, study_uid: str) -> tuple[set[str], bool]:
        """(the SOP Instance UIDs recorded as sent, whether the study was alerted)."""
        if study_uid not in self._read:
            self._read[study_uid] = self._read_record(study_uid)
        return self._read[study_uid]

    def _read_record(self, study_uid: str) -> tuple[set[str], bool]:
        if self.folder is None:
            sops, alerted = self._in_memory.get(study_uid, (set(), False))
            return set(sops), alerted
        if not is_valid_uid(study_uid):  # never a path of ours; such a study has no archived files either
            return set(), False
        try:
            record = json.loads(self._path(study_uid).read_bytes())
            sops = {s for s in record["sop_instance_uids"] if isinstance(s, str)}
            return sops, record.get("alerted") is True
        except FileNotFoundError:
            return set(), False
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Unreadable or not ours: the study is sent whole again rather than not at all.
            log.warning("route.sent_record_unreadable", destination=self.destination, error=type(exc).__name__)
            return set(), False
