"""Pseudonyms, replacement UIDs and date offsets, keyed per project.

The project key is HMAC-SHA256(site secret, project name): two projects exported from the same
archive cannot be linked by pseudonym, UID or date offset, and nobody without the secret can
recompute them. Within a project:
- the subject of a study is its patient (the smallest non-empty PatientID among its objects, so a
  study whose objects disagree is never split), or the study itself when no object has a PatientID
  (patients with an empty ID are not merged into one);
- a subject has one pseudonym and one date offset (62..730 days back);
- a UID maps to the same new UID wherever it occurs, whoever the subject: a study stays one study.
Pseudonyms are letters only, so they never contain a digit run of an original ID or date.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from pydicom import config
from pydicom.uid import UID

__all__ = ["ProjectKeys", "StudySubjects"]

_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
_MIN_SHIFT, _MAX_SHIFT = 62, 730


def _letters(digest: bytes, n: int) -> str:
    number = int.from_bytes(digest, "big")
    out = []
    for _ in range(n):
        number, rest = divmod(number, len(_LETTERS))
        out.append(_LETTERS[rest])
    return "".join(out)


class ProjectKeys:
    def __init__(self, site_secret: bytes, project: str):
        if len(site_secret) < 16:
            raise ValueError("the site secret must be at least 16 bytes")
        if not project.strip():
            raise ValueError("a research export needs a project name (pseudonyms are salted per project)")
        self.project = project
        self._key = hmac.new(site_secret, b"diana-project\0" + project.encode(), hashlib.sha256).digest()

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, kind.encode() + b"\0" + value.encode(), hashlib.sha256).digest()

    def patient_id(self, subject: str) -> str:
        return "ANON" + _letters(self._mac("id", subject), 12)

    def patient_name(self, subject: str) -> str:
        return "ANON^" + _letters(self._mac("name", subject), 10)

    def date_shift_days(self, subject: str) -> int:
        return _MIN_SHIFT + int.from_bytes(self._mac("shift", subject)[:8], "big") % (_MAX_SHIFT - _MIN_SHIFT + 1)

    def uid(self, original: str) -> str:
        """A 2.25 UID (an integer of 128 bits) derived from the original UID: one original, one new UID.

        The standard's own UIDs (SOP classes, coding schemes) identify nobody and are kept."""
        if UID(original.strip(), validation_mode=config.IGNORE).name != original.strip():
            return original.strip()
        return "2.25." + str(int.from_bytes(self._mac("uid", original.strip())[:16], "big"))


@dataclass
class StudySubjects:
    """Study UID -> the subject whose pseudonym and offset every object of the study gets."""

    _by_study: dict[str, str] = field(default_factory=dict)
    mixed: dict[str, int] = field(default_factory=dict)  # study UID -> number of distinct PatientIDs

    def plan(self, study_uid: str, patient_ids: set[str]) -> str:
        """Decide a study's subject from every PatientID its objects carry (call before exporting)."""
        ids = {p.strip() for p in patient_ids} - {""}
        if len(ids) > 1:
            self.mixed[study_uid] = len(ids)
        subject = "patient:" + min(ids) if ids else "study:" + study_uid
        self._by_study[study_uid] = subject
        return subject

    def subject(self, study_uid: str, patient_id: str) -> str:
        """The planned subject, or (a study nobody planned) the first object's patient decides."""
        if study_uid not in self._by_study:
            return self.plan(study_uid, {patient_id})
        return self._by_study[study_uid]
