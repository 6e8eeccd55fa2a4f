"""Objects whose pixels or payload often carry identifying text the header profile cannot clean.

A research export refuses them unless the user opts in (then they are exported, marked
PatientIdentityRemoved NO, and listed in the report): BurnedInAnnotation YES,
RecognizableVisualFeatures YES, an overlay stored in the pixel data's unused bits (its plane
cannot be told from the image by the header profile), and the classes where names are commonly
in the pixels or the payload: ultrasound, secondary capture, encapsulated documents (PDF, CDA,
STL...), video and other visible-light photographs.
"""

from __future__ import annotations

from pydicom import Dataset

__all__ = ["risk_of"]

# SOP Class UID prefixes (PS3.4 B.5) and why each is risky
_CLASS_PREFIXES = (
    ("1.2.840.10008.5.1.4.1.1.6.", "ultrasound (text in the pixels is common)"),
    ("1.2.840.10008.5.1.4.1.1.3.", "ultrasound multi-frame (text in the pixels is common)"),
    ("1.2.840.10008.5.1.4.1.1.7.", "secondary capture (screenshots often show names)"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document (its payload is not examined)"),
    ("1.2.840.10008.5.1.4.1.1.77.1.", "visible light / video (faces and text in the pixels)"),
)
_MODALITIES = {
    "US": "ultrasound (text in the pixels is common)",
    "XC": "external camera photograph",
    "ES": "endoscopy video or photograph",
    "DOC": "encapsulated document (its payload is not examined)",
}


def risk_of(ds: Dataset) -> str | None:
    """Why ``ds`` may carry identity outside its header, or None."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "BurnedInAnnotation is YES (identifying text in the pixels)"
    if str(ds.get("RecognizableVisualFeatures", "")).strip().upper() == "YES":
        return "RecognizableVisualFeatures is YES (a face or other feature that identifies the patient)"
    overlays = [e for e in ds if (e.tag.group & 0xFF01) == 0x6000 and e.tag.element == 0x0102 and e.value]
    if overlays:  # (60xx,0102) Overlay Bit Position: an overlay plane in the pixel data's unused bits
        return "an overlay is stored in the pixel data's unused bits (60xx,0102), which the profile cannot clean"
    sop_class = str(ds.get("SOPClassUID", "")).strip()
    for prefix, why in _CLASS_PREFIXES:
        if sop_class.startswith(prefix) or sop_class == prefix.rstrip("."):
            return why
    return _MODALITIES.get(str(ds.get("Modality", "")).strip().upper())
