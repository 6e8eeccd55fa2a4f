"""Builds synthetic but valid DICOM studies with pydicom, for tests and benchmarks."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass
class SeriesSpec:
    modality: str
    description: str
    count: int
    body_part: str = "CHEST"


@dataclass
class GeneratedStudy:
    study_uid: str
    patient_id: str
    study_date: str
    files: list[Path] = field(default_factory=list)
    series: dict[str, dict] = field(default_factory=dict)  # series uid -> {description, modality, count}


def part10_dataset(sop_class_uid: str, sop_uid: str | None = None) -> Dataset:
    """An empty data set with its file meta (explicit VR little endian) and SOP identity set."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    return ds


def make_instance(
    study_uid: str,
    series_uid: str,
    number: int,
    *,
    patient_id: str,
    study_date: str,
    modality: str = "CT",
    series_description: str = "AXIAL",
    series_number: int = 1,
    body_part: str = "CHEST",
    rows: int = 64,
    sop_uid: str | None = None,
) -> Dataset:
    ds = part10_dataset(CTImageStorage, sop_uid)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = f"ACC{patient_id[-6:]}"
    ds.StudyDescription = "CT CHEST ABDOMEN"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part
    ds.InstanceNumber = number
    ds.StationName = "CTSTATION1"
    ds.Manufacturer = "DianaTest"
    ds.ManufacturerModelName = "Synthetic"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    # 12-bit noise, reproducible per instance number
    ds.PixelData = random.Random(number).randbytes(rows * rows * 2)
    return ds


def make_study(
    out_dir: Path,
    series: list[SeriesSpec] | None = None,
    patient_id: str | None = None,
    study_date: str = "20240315",
    rows: int = 64,
) -> GeneratedStudy:
    """Write one study (default: 3 series, 40 instances) as Part-10 files under ``out_dir``."""
    series = series or [
        SeriesSpec("CT", "AXIAL 5mm", 20),
        SeriesSpec("CT", "CORONAL", 12),
        SeriesSpec("CT", "SCOUT", 8),
    ]
    study_uid = generate_uid()
    patient_id = patient_id or f"PID{study_uid[-8:]}"
    study = GeneratedStudy(study_uid, patient_id, study_date)
    out_dir.mkdir(parents=True, exist_ok=True)
    for s_index, spec in enumerate(series, start=1):
        series_uid = generate_uid()
        study.series[series_uid] = {"description": spec.description, "modality": spec.modality, "count": spec.count}
        for number in range(1, spec.count + 1):
            ds = make_instance(
                study_uid,
                series_uid,
                number,
                patient_id=patient_id,
                study_date=study_date,
                modality=spec.modality,
                series_description=spec.description,
                series_number=s_index,
                body_part=spec.body_part,
                rows=rows,
            )
            path = out_dir / f"s{s_index:02d}_i{number:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            study.files.append(path)
    return study


# ---------------------------------------------------------------- objects real devices send
def write_misfit_length_instance(path: Path, patient_id: str = "MISFIT1") -> Dataset:
    """A CT image with one element whose length does not fit its VR, as some devices send.

    (0028,0106) Smallest Image Pixel Value, VR US (2 bytes a value), carries 3 bytes: pydicom
    raises BytesLengthException on decoding it; dcmtk and Orthanc store such objects.
    """
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id=patient_id, study_date="20240601")
    ds.SmallestImagePixelValue = 0x0102
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    good = b"\x28\x00\x06\x01US\x02\x00\x02\x01"
    assert raw.count(good) == 1
    path.write_bytes(raw.replace(good, b"\x28\x00\x06\x01US\x03\x00\x02\x01\x00"))
    return ds


def write_large_rdsr(path: Path, events: int = 900, patient_id: str = "BIGRDSR1") -> tuple[Dataset, int]:
    """A projection X-Ray Radiation Dose SR with ``events`` irradiation events, about 1.3 MB at 900.

    Each event carries what an interventional system reports (DAP, dose at the reference point,
    plane, fluoroscopy or acquisition, and a long protocol name). Returns the data set and its size.
    """
    from tests.support import dosebuilder as b

    planes = (("113622", "DCM", "Single Plane"),)
    content = [
        b.projection_event(
            generate_uid(),
            dap=f"{0.00001 * (i + 1):.6f}",
            dose_rp=f"{0.01 * (i + 1):.3f}",
            plane=planes[0],
            fluoro=i % 2 == 0,
            protocol=f"Cardiac {'fluoroscopy' if i % 2 == 0 else 'acquisition'} run {i:04d} " + "x" * 300,
        )
        for i in range(events)
    ]
    ds = b.dose_report(content, study_uid=generate_uid(), procedure=b.PROJECTION_PROCEDURE, patient_id=patient_id)
    ds.save_as(path, enforce_file_format=True)
    return ds, path.stat().st_size


def _explicit_le(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (values padded to even length by the caller)."""
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    if vr in (b"SQ", b"OB", b"OW", b"UN", b"UT", b"UC"):
        return head + vr + b"\x00\x00" + len(value).to_bytes(4, "little") + value
    return head + vr + len(value).to_bytes(2, "little") + value


def _item(body: bytes) -> bytes:
    return b"\xfe\xff\x00\xe0" + len(body).to_bytes(4, "little") + body


def write_rt_structure_set(path: Path, points: int = 1_000_000, per_contour: int = 500) -> tuple[str, int]:
    """An RT Structure Set whose ROI Contour Sequence holds ``points`` contour points (~25 MB at 1M).

    The contour sequence is encoded directly (pydicom would build millions of DS objects):
    CLOSED_PLANAR contours of ``per_contour`` points on a ring. Returns (SOP Instance UID, size).
    """
    ds = part10_dataset("1.2.840.10008.5.1.4.1.1.481.3")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyDate = "Struct^Test", "RTSTRUCT1", "20240602"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "RTSTRUCT", 1, 1
    ds.StructureSetLabel = "BIG"
    roi = Dataset()
    roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = 1, "BODY", generate_uid()
    ds.StructureSetROISequence = [roi]
    ds.save_as(path, enforce_file_format=True)
    import math

    ring = [
        (200.0 * math.cos(2 * math.pi * k / per_contour), 200.0 * math.sin(2 * math.pi * k / per_contour))
        for k in range(per_contour)
    ]
    contours = []
    for z in range(points // per_contour):
        text = "\\".join(f"{x:.4f}\\{y:.4f}\\{z * 1.5:.2f}" for x, y in ring).encode()
        text += b" " * (len(text) % 2)
        number = str(per_contour).encode()
        number += b" " * (len(number) % 2)
        contours.append(
            _item(
                _explicit_le(0x30060042, b"CS", b"CLOSED_PLANAR ")
                + _explicit_le(0x30060046, b"IS", number)
                + _explicit_le(0x30060050, b"DS", text)
            )
        )
    roi_contour = (
        _explicit_le(0x3006002A, b"IS", b"255\\0\\0 ")
        + _explicit_le(0x30060040, b"SQ", b"".join(contours))
        + _explicit_le(0x30060084, b"IS", b"1 ")
    )
    with open(path, "ab") as fh:
        fh.write(_explicit_le(0x30060039, b"SQ", _item(roi_contour)))
    return ds.SOPInstanceUID, path.stat().st_size


def write_enhanced_multiframe(path: Path, frames: int = 400, rows: int = 512) -> tuple[str, int]:
    """An Enhanced CT image of ``frames`` frames (200 MB at 400 of 512x512x2 bytes) with per-frame
    functional groups for every frame; the pixel data is streamed to disk, never built in memory."""
    ds = part10_dataset("1.2.840.10008.5.1.4.1.1.2.1")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyDate = "Enhanced^Test", "ENHANCED1", "20240603"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
    ds.Rows = ds.Columns = rows
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.7, 0.7], 1.0
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for n in range(frames):
        group = Dataset()
        content = Dataset()
        content.FrameAcquisitionNumber, content.InStackPositionNumber = n + 1, n + 1
        content.DimensionIndexValues = [1, n + 1]
        group.FrameContentSequence = [content]
        position = Dataset()
        position.ImagePositionPatient = [-180.0, -180.0, -0.5 * n]
        group.PlanePositionSequence = [position]
        orientation = Dataset()
        orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        group.PlaneOrientationSequence = [orientation]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (rows * rows * 2 // 256)
    with open(path, "ab") as fh:
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (frames * len(frame)).to_bytes(4, "little"))
        for _ in range(frames):
            fh.write(frame)
    return ds.SOPInstanceUID, path.stat().st_size


def rle_literal(frame: bytes, bytes_per_sample: int = 2) -> bytes:
    """One frame of native little-endian pixels (one sample a pixel) as RLE Lossless (PS3.5 G.3) in literal
    runs only: a segment a byte of the sample, the most significant first, each in runs of 128 bytes.
    Valid RLE that does not shrink (random pixels stay as large as they are: a large object, unlike an
    encoder's), and built in no time. Each segment's bytes are a multiple of 256, so its runs are even."""
    segments = []
    for byte in reversed(range(bytes_per_sample)):
        plane = frame[byte::bytes_per_sample]
        assert len(plane) % 256 == 0, "pixels a frame: a multiple of 256"
        runs = bytearray()
        for start in range(0, len(plane), 128):
            runs.append(127)
            runs += plane[start : start + 128]
        segments.append(bytes(runs))
    offsets = [64 + sum(len(s) for s in segments[:i]) for i in range(len(segments))]
    header = struct.pack("<16L", len(segments), *offsets, *[0] * (15 - len(offsets)))
    return header + b"".join(segments)


# ---------------------------------------------------------------- deflated transfer syntax
def write_deflated(ds: Dataset, path: Path) -> Path:
    """``ds`` saved as Deflated Explicit VR Little Endian (pydicom deflates the data set)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def write_deflate_bomb(path: Path, inflated_bytes: int = 4 << 30) -> tuple[str, int]:
    """A deflated CT image whose pixel data is ``inflated_bytes`` of zeros: a few MB on the wire,
    gigabytes once inflated. The header is valid; streamed, never built in memory.

    Returns (SOP Instance UID, file size).
    """
    import zlib
    from io import BytesIO

    from pydicom.filewriter import write_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="BOMB1", study_date="20240607")
    del ds.PixelData
    ds.NumberOfFrames = inflated_bytes // (ds.Rows * ds.Columns * 2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)  # file meta and a deflated header without pixel data
    plain = BytesIO()
    ds_plain = Dataset(ds)
    ds_plain.file_meta = FileMetaDataset(ds.file_meta)
    ds_plain.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    from pydicom.filebase import DicomFileLike

    fp = DicomFileLike(plain)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds_plain)
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        import pydicom.filereader as reader

        reader.read_preamble(fh, False)
        reader._read_file_meta_info(fh)
        meta_end = fh.tell()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with open(path, "wb") as out:
        out.write(raw[:meta_end])
        out.write(deflater.compress(plain.getvalue()))
        out.write(
            deflater.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + min(inflated_bytes, 0xFFFFFFFE).to_bytes(4, "little"))
        )
        out.write(deflater.flush(zlib.Z_FULL_FLUSH))
        # After a full flush the compressor starts afresh: every MiB of zeros deflates to the same
        # bytes, so one block written many times is a valid stream (and takes no time to build).
        block = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
        for _ in range(inflated_bytes // len(zeros)):
            out.write(block)
        out.write(deflater.flush())
    return ds.SOPInstanceUID, path.stat().st_size
