"""De-identification for research export: PS3.15 Annex E Basic Application Level Confidentiality
Profile, with consistent pseudonyms.

dicognito replaces identifiers, names, addresses and UIDs and shifts dates; it is seeded per patient
with a keyed hash of the site secret and the PatientID, so the same patient gets the same pseudonym,
the same UIDs and the same date offset in every export, and nobody without the secret can compute
them. On top, what Annex E removes and dicognito keeps: private tags, free-text comments and
descriptions (unless retained), device serial numbers, other institution and physician data.
Burned-in text in pixel data is not examined.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from dicognito.anonymizer import Anonymizer
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset

__all__ = ["Deidentifier", "PseudonymKey"]

# Annex E Table E.1-1 attributes with action X (remove) that dicognito leaves in place.
_REMOVE = (
    "AcquisitionComments",
    "AdditionalPatientHistory",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "Arbitrary",
    "AuthorObserverSequence",
    "ContentCreatorName",
    "ContributionDescription",
    "CurrentPatientLocation",
    "DeviceSerialNumber",
    "DerivationDescription",
    "ImageComments",
    "InstitutionalDepartmentName",
    "InterpretationRecorder",
    "MedicalAlerts",
    "ModifiedAttributesSequence",
    "NamesOfIntendedRecipientsOfResults",
    "OperatorsName",
    "OriginalAttributesSequence",
    "PatientComments",
    "PatientState",
    "PerformedProcedureStepDescription",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "PregnancyStatus",
    "ReasonForStudy",
    "ReferringPhysicianName",
    "RequestAttributesSequence",
    "RequestingPhysician",
    "ScheduledPerformingPhysicianName",
    "SmokingStatus",
    "StudyComments",
    "TextComments",
    "TopicAuthor",
    "TopicKeywords",
    "TopicSubject",
    "TopicTitle",
    "VerifyingObserverSequence",
    "CountryOfResidence",
    "RegionOfResidence",
    "EthnicGroup",
    "PatientBirthName",
    "PatientMotherBirthName",
    "OtherPatientNames",
    "PatientAddress",
    "InstitutionAddress",
    "InstitutionName",
    "ResponsiblePerson",
)
# Descriptions Annex E removes unless the Retain Description option is chosen.
_DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName")


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


@dataclass
class PseudonymKey:
    """Original identity -> pseudonym, for the key file the user asked for (and only then)."""

    rows: dict[str, dict] = field(default_factory=dict)

    def add(self, original_id: str, original_name: str, pseudonymous: Dataset) -> None:
        self.rows.setdefault(
            original_id,
            {
                "original_patient_id": original_id,
                "original_patient_name": original_name,
                "pseudonym_patient_id": str(pseudonymous.get("PatientID", "")),
                "pseudonym_patient_name": str(pseudonymous.get("PatientName", "")),
            },
        )


class Deidentifier:
    def __init__(self, site_secret: bytes, retain_descriptions: bool = False):
        if len(site_secret) < 16:
            raise ValueError("the site secret must be at least 16 bytes")
        self._secret = site_secret
        self._retain_descriptions = retain_descriptions
        self._by_patient: dict[str, Anonymizer] = {}

    def _anonymizer(self, patient_id: str) -> Anonymizer:
        if patient_id not in self._by_patient:
            seed = hmac.new(self._secret, patient_id.encode(), hashlib.sha256).hexdigest()
            self._by_patient[patient_id] = Anonymizer(seed=seed)
        return self._by_patient[patient_id]

    def deidentify(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (and its file meta) and return it."""
        patient_id = str(ds.get("PatientID", ""))
        ds.remove_private_tags()
        for keyword in _REMOVE + (() if self._retain_descriptions else _DESCRIPTIONS):
            self._remove_everywhere(ds, keyword)
        self._anonymizer(patient_id).anonymize(ds)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethodCodeSequence = [
            _code("113100", "Basic Application Confidentiality Profile"),
            _code("113107", "Retain Longitudinal With Modified Dates Option"),
        ]
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = meta
        return ds

    @staticmethod
    def _remove_everywhere(ds: Dataset, keyword: str) -> None:
        if keyword in ds:
            delattr(ds, keyword)
        for elem in list(ds):
            if elem.VR == "SQ":
                for item in elem.value:
                    Deidentifier._remove_everywhere(item, keyword)
