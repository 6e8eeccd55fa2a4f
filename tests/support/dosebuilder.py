"""Builds Radiation Dose SRs (TID 10011 CT, TID 10001 projection) in tests, with chosen values."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.dicomgen import part10_dataset

XRAY_RDSR = "1.2.840.10008.5.1.4.1.1.88.67"


def code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _item(rel: str, vt: str, concept: tuple[str, str, str]) -> Dataset:
    it = Dataset()
    it.RelationshipType, it.ValueType = rel, vt
    it.ConceptNameCodeSequence = [code(*concept)]
    return it


def num(value: str, concept_code: str, unit: str, meaning: str = "", scheme: str = "DCM") -> Dataset:
    it = _item("CONTAINS", "NUM", (concept_code, scheme, meaning or concept_code))
    mv = Dataset()
    mv.NumericValue = value
    mv.MeasurementUnitsCodeSequence = [code(unit, "UCUM", unit)]
    it.MeasuredValueSequence = [mv]
    return it


def coded(concept_code: str, value: tuple[str, str, str], rel: str = "CONTAINS", scheme: str = "DCM") -> Dataset:
    it = _item(rel, "CODE", (concept_code, scheme, concept_code))
    it.ConceptCodeSequence = [code(*value)]
    return it


def text(concept_code: str, value: str) -> Dataset:
    it = _item("CONTAINS", "TEXT", (concept_code, "DCM", concept_code))
    it.TextValue = value
    return it


def uidref(concept_code: str, value: str) -> Dataset:
    it = _item("CONTAINS", "UIDREF", (concept_code, "DCM", concept_code))
    it.UID = value
    return it


def container(concept_code: str, children: list[Dataset]) -> Dataset:
    it = _item("CONTAINS", "CONTAINER", (concept_code, "DCM", concept_code))
    it.ContinuityOfContent = "SEPARATE"
    it.ContentSequence = children
    return it


SPIRAL = ("P5-08001", "SRT", "Spiral Acquisition")
SPIRAL_SCT = ("116152004", "SCT", "Spiral Acquisition")
STATIONARY = ("113806", "DCM", "Stationary Acquisition")
CONSTANT_ANGLE = ("113805", "DCM", "Constant Angle Acquisition")
ABDOMEN = ("T-D4000", "SRT", "Abdomen")


def ct_event(
    uid: str,
    *,
    ctdivol: str,
    dlp: str,
    protocol: str = "Abdomen",
    kind=SPIRAL,
    region=ABDOMEN,
    dlp_unit: str = "mGy.cm",
    notification_ctdivol: str | None = None,
) -> Dataset:
    dose = [num(ctdivol, "113830", "mGy"), num(dlp, "113838", dlp_unit)]
    if notification_ctdivol:
        dose.append(
            container(
                "113908", [coded("113910", ("R-0038D", "SRT", "Yes")), num(notification_ctdivol, "113912", "mGy")]
            )
        )
    return container(
        "113819",
        [
            text("125203", protocol),
            coded("123014", region),
            coded("113820", kind),
            uidref("113769", uid),
            container(
                "113822",
                [
                    num("5.0", "113824", "s"),
                    num("400", "113825", "mm"),
                    num("1", "113823", "{X-Ray sources}"),
                    container("113831", [num("120", "113733", "kV"), num("200", "113734", "mA")]),
                ],
            ),
            container("113829", dose),
        ],
    )


def projection_event(
    uid: str,
    *,
    dap: str,
    dap_unit: str = "Gy.m2",
    dose_rp: str | None = None,
    plane: tuple[str, str, str] | None = None,
    fluoro: bool = False,
    agd: str | None = None,
    laterality: tuple[str, str, str] | None = None,
    protocol: str = "Chest PA",
) -> Dataset:
    children = [
        uidref("113769", uid),
        coded("113721", ("P5-06000", "SRT", "Fluoroscopy") if fluoro else ("113611", "DCM", "Stationary Acquisition")),
        text("125203", protocol),
        num(dap, "122130", dap_unit),
    ]
    if plane:
        children.append(coded("113764", plane))
    if dose_rp:
        children.append(num(dose_rp, "113738", "mGy"))
    if agd:
        anatomy = coded("T-D0005", ("T-04000", "SRT", "Breast"), scheme="SRT")
        anatomy.ContentSequence = [coded("G-C171", laterality, rel="HAS CONCEPT MOD", scheme="SRT")]
        children += [anatomy, num(agd, "111631", "mGy")]
    return container("113706", children)


def accumulated_plane(plane: tuple[str, str, str], values: dict[str, tuple[str, str]]) -> Dataset:
    codes = {"dap": "113722", "dose_rp": "113725", "fluoro_dap": "113726", "fluoro_time": "113730"}
    return container(
        "113702",
        [coded("113764", plane, rel="HAS CONCEPT MOD")] + [num(v, codes[k], unit) for k, (v, unit) in values.items()],
    )


def dose_report(
    content: list[Dataset],
    *,
    study_uid: str,
    procedure: tuple[str, str, str],
    patient_id: str = "DOSE1",
    study_date: str = "20240315",
    sop_uid: str | None = None,
    modality_hint: str = "CT",
) -> Dataset:
    ds = part10_dataset(XRAY_RDSR, sop_uid)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID, ds.PatientName, ds.PatientSex = patient_id, "Dose^Test", "F"
    ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19800315", study_date, "101500"
    ds.AccessionNumber, ds.Manufacturer, ds.StationName = "ACCDOSE", "DianaTest", f"{modality_hint}STATION"
    ds.SeriesNumber, ds.InstanceNumber = 999, 1
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code("113701", "DCM", "X-Ray Radiation Dose Report")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = [coded("121058", procedure, rel="HAS CONCEPT MOD")] + content
    return ds


CT_PROCEDURE = ("P5-08000", "SRT", "Computed Tomography X-Ray")
PROJECTION_PROCEDURE = ("113704", "DCM", "Projection X-Ray")
MAMMO_PROCEDURE = ("P5-40010", "SRT", "Mammography")


def ct_report(events: list[Dataset], total_dlp: str | None, **kw) -> Dataset:
    accumulated = [num(str(len(events)), "113812", "{events}")]
    if total_dlp is not None:
        accumulated.append(num(total_dlp, "113813", "mGy.cm"))
    return dose_report([container("113811", accumulated), *events], procedure=CT_PROCEDURE, **kw)


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ---- dual-source CT and size (TID 10013/10014, CP-1525)
def ct_source(source_id: str, kvp: str, ma: str, max_ma: str, rotation_s: str) -> Dataset:
    return container(
        "113831",
        [
            text("113832", source_id),
            num(kvp, "113733", "kV"),
            num(max_ma, "113833", "mA"),
            num(ma, "113734", "mA"),
            num(rotation_s, "113834", "s"),
        ],
    )


def ct_event_with(
    uid: str,
    *,
    ctdivol: str,
    dlp: str,
    sources: list[Dataset],
    size_items: list[Dataset] | None = None,
    phantom: tuple[str, str, str] = ("113691", "DCM", "IEC Body Dosimetry Phantom"),
) -> Dataset:
    """A CT acquisition with the given source containers and, inside CT Dose, the given size items."""
    return container(
        "113819",
        [
            text("125203", "Dual Energy Abdomen"),
            coded("113820", SPIRAL),
            uidref("113769", uid),
            container("113822", [num("2", "113823", "{X-Ray sources}"), num("3.2", "113824", "s"), *sources]),
            container(
                "113829",
                [num(ctdivol, "113830", "mGy"), num(dlp, "113838", "mGy.cm"), coded("113835", phantom)]
                + (size_items or []),
            ),
        ],
    )


def with_method(item: Dataset, method: tuple[str, str, str]) -> Dataset:
    """A NUM item with a Measurement Method (370129005, SCT) modifier from CID 10023."""
    item.ContentSequence = [coded("370129005", method, rel="HAS CONCEPT MOD", scheme="SCT")]
    return item
