"""Helpers shared by the preprocessing tests: derived DICOM series built at test time.

Everything is generated from pydicom's bundled test files or from the real study; nothing is
committed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

STUDY = "brain_tumor_progression_PGBM-001_1991-11-19"
SERIES = {
    "T1prereg": "10008-T1prereg-91470",
    "T1post": "11-T1post-03326",
    "FLAIRreg": "35637-FLAIRreg-16386",
    "T2reg": "37910-T2reg-84816",
    "MaskTumor": "5364-MaskTumor-94345",
}


def bundled(name: str) -> Path:
    """A file bundled with pydicom (no download: only bundled names are used)."""
    return Path(get_testdata_file(name))


def copy_series(src: Path, dst: Path, skip: Sequence[str] = ()) -> Path:
    """Copy a series folder's .dcm files, leaving out the named files."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.dcm")):
        if f.name not in skip:
            shutil.copy2(f, dst / f.name)
    return dst


def write_series(
    folder: Path,
    positions: Sequence[Sequence[float]],
    base: str = "CT_small.dcm",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    edit: Callable[[int, Dataset], None] | None = None,
) -> list[Path]:
    """Write a derived single-frame series: ``base`` copied once per position.

    Each copy gets its own SOPInstanceUID and InstanceNumber, a shared new SeriesInstanceUID,
    the given ImagePositionPatient, and pixel values offset by the slice index so slices differ.

    Args:
        folder: output folder.
        positions: one IPP per slice.
        base: pydicom test file to derive from.
        orientation: IOP for all slices.
        edit: optional ``edit(index, dataset)`` applied before saving (to break one slice).

    Returns:
        Written paths.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    paths = []
    for k, pos in enumerate(positions):
        ds = pydicom.dcmread(bundled(base))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        arr = ds.pixel_array.copy()
        arr = (arr + k).astype(arr.dtype)
        ds.PixelData = arr.tobytes()
        if edit:
            edit(k, ds)
        path = folder / f"slice{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def axial_positions(n: int, step: float = 5.0, start=(-158.135803, -179.035797, -75.699997)) -> list[list[float]]:
    """IPPs of ``n`` axial slices ``step`` mm apart."""
    return [[start[0], start[1], start[2] + k * step] for k in range(n)]


def make_enhanced(series_dir: Path, out: Path, shuffle_seed: int | None = None) -> Path:
    """Build an Enhanced MR Image Storage object (one file, N frames) from a single-frame series.

    Geometry moves into the functional groups: shared Pixel Measures and Plane Orientation,
    per-frame Plane Position. With ``shuffle_seed`` the frames are stored in random order.
    """
    dss = sorted((pydicom.dcmread(f) for f in series_dir.glob("*.dcm")), key=lambda d: int(d.InstanceNumber))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(dss))
        dss = [dss[i] for i in order]
    first = dss[0]
    ds = Dataset()
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "Modality", "Rows",
               "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
               "PhotometricInterpretation", "SeriesNumber", "StudyDate"):
        if kw in first:
            setattr(ds, kw, first.data_element(kw).value)
    ds.SOPClassUID = pydicom.uid.EnhancedMRImageStorage
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SeriesDescription = "enhanced"
    ds.NumberOfFrames = len(dss)
    measures, plane = Dataset(), Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    plane.ImageOrientationPatient = first.ImageOrientationPatient
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([plane])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for d in dss:
        frame, pos, content = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = d.ImagePositionPatient
        content.InStackPositionNumber = int(d.InstanceNumber)
        content.DimensionIndexValues = [1, int(d.InstanceNumber)]
        frame.PlanePositionSequence = DicomSequence([pos])
        frame.FrameContentSequence = DicomSequence([content])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.stack([d.pixel_array for d in dss]).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out.mkdir(parents=True, exist_ok=True)
    path = out / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
