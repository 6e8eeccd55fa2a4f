"""Patient size and size-specific dose estimates (SSDE) for CT: AAPM Reports 204 and 220.

SSDE = f(D) × CTDIvol, with f the AAPM Report 204 conversion factor for the phantom CTDIvol was
stated in, fitted there (Appendix A; the fits behind Tables 1B and 1D) as f = a·exp(−b·D), D in cm:

    32 cm (body) phantom: a = 3.704369, b = 0.03671937
    16 cm (head) phantom: a = 1.874799, b = 0.03871313

AAPM Report 220 defines the water-equivalent diameter D_w (used for D in place of the effective
diameter of Report 204) from an axial CT image: A_w = Σ_ROI (HU(x,y)/1000 + 1) · A_pixel and
D_w = 2·√(A_w/π), the ROI being the patient. Here the ROI is every pixel above −500 HU (air and
most of the air around the patient excluded; a table in the field adds to it, as Report 220 warns).

Where D comes from, in this order (the method is recorded with each value):
  1. the dose report's own SSDE (TID 10013 113930) — taken as reported, with its method;
  2. the report's Water Equivalent Diameter (113980), else its Derived Effective Diameter (113933);
  3. the arithmetic average of D_w(z) over the study's axial CT images that reached the dose worker
     (Report 220 section 3; DICOM 113990 "Arithmetic Average of Dw(z)").
No localizer-based estimate is made: it needs a per-scanner calibration (Report 220 section 4).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable

from pydicom import Dataset

__all__ = [
    "AAPM_204_FITS",
    "conversion_factor",
    "water_equivalent_diameter_mm",
    "image_water_equivalent_diameter_mm",
    "event_ssde",
]

AAPM_204_FITS: dict[int, tuple[float, float]] = {32: (3.704369, 0.03671937), 16: (1.874799, 0.03871313)}
ROI_THRESHOLD_HU = -500.0


def conversion_factor(diameter_cm: float, phantom_cm: int) -> float:
    """AAPM 204 conversion factor f for a patient of this (water-equivalent or effective) diameter."""
    if phantom_cm not in AAPM_204_FITS:
        raise ValueError(f"no AAPM 204 fit for a {phantom_cm} cm phantom; fits: 16, 32")
    if not diameter_cm > 0:
        raise ValueError(f"diameter must be positive, not {diameter_cm}")
    a, b = AAPM_204_FITS[phantom_cm]
    return a * math.exp(-b * diameter_cm)


def water_equivalent_diameter_mm(hu: Iterable[float], pixel_area_mm2: float) -> float | None:
    """AAPM 220 D_w in mm from the HU values of one axial image; None when no pixel is inside the patient."""
    inside = [v for v in hu if v > ROI_THRESHOLD_HU]
    if not inside:
        return None
    area = (len(inside) + sum(inside) / 1000.0) * pixel_area_mm2
    return 2.0 * math.sqrt(area / math.pi) if area > 0 else None


def image_water_equivalent_diameter_mm(ds: Dataset) -> float | None:
    """D_w of an uncompressed, 16-bit, little-endian axial CT image; None for anything else (localizers too)."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type or (len(image_type) > 2 and image_type[2] not in ("AXIAL", "")):
        return None
    if ds.get("BitsAllocated") != 16 or ds.get("SamplesPerPixel", 1) != 1 or "PixelData" not in ds:
        return None
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or syntax.is_compressed or not syntax.is_little_endian:
        return None
    spacing = ds.get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        return None
    pixels = array("h" if ds.get("PixelRepresentation") == 1 else "H")
    raw = ds.PixelData
    pixels.frombytes(raw[: len(raw) - len(raw) % 2])
    if len(pixels) != int(ds.Rows) * int(ds.Columns):
        return None
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return water_equivalent_diameter_mm((p * slope + intercept for p in pixels), float(spacing[0]) * float(spacing[1]))


def _phantom_cm(event: dict) -> int:
    return int(event.get("phantom_cm") or 32)


def event_ssde(event: dict, study_dw_mm: float | None, study_dw_images: int = 0, scope: str = "the study") -> dict:
    """SSDE fields for one CT event: the value, its method, the diameter and factor used; {} when none can be made."""
    if event.get("report_ssde_mGy") is not None:
        return {
            "ssde_mGy": event["report_ssde_mGy"],
            "ssde_method": f"reported ({event.get('report_ssde_method') or 'method not stated'})",
        }
    ctdivol = event.get("ctdivol_mGy")
    if ctdivol is None:
        return {}
    # A reported size of 0 (or less) is no size: a report that fills the field with 0 said nothing.
    if (event.get("report_water_equivalent_diameter_mm") or 0) > 0:
        diameter, how = event["report_water_equivalent_diameter_mm"], "AAPM 220 Dw from the dose report"
    elif (event.get("report_effective_diameter_mm") or 0) > 0:
        diameter, how = event["report_effective_diameter_mm"], "AAPM 204 effective diameter from the dose report"
    elif study_dw_mm is not None:
        diameter, how = study_dw_mm, f"AAPM 220 mean Dw(z) of {study_dw_images} axial images of {scope}"
    else:
        return {}
    phantom = _phantom_cm(event)
    factor = conversion_factor(diameter / 10.0, phantom)
    return {
        "ssde_mGy": round(ctdivol * factor, 4),
        "ssde_conversion_factor": round(factor, 4),
        "size_diameter_mm": round(diameter, 2),
        "ssde_method": f"{how}; AAPM 204 fit, {phantom} cm phantom",
    }
