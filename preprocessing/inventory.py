"""The list of a site's images that the quality and datalist stages work on.

Images come either from the conversion summary (``conversion.json``, carrying DICOM facts:
patient, study, frame of reference, slice hashes) or from a folder of NIfTI files (a site
that already holds NIfTI, e.g. an MSD task's ``imagesTr``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preprocessing import artefacts
from preprocessing.errors import DataFormatError, DataNotFoundError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class ImageItem:
    """One image volume of the site.

    Attributes:
        id: unique name (file name without the NIfTI suffix).
        image: absolute path of the NIfTI file.
        meta: facts from conversion (patient_id, study_uid, frame_of_reference_uid,
            description, series_number, modality, slices...); empty for folder input.
    """

    id: str
    image: Path
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def match_text(self) -> str:
        """Text a label-series pattern is matched against (name, description, number...)."""
        m = self.meta
        return " ".join(
            str(v)
            for v in (self.id, m.get("description", ""), m.get("series_number", ""), m.get("modality", ""), m.get("sop_class", ""))
            if v not in (None, "")
        )

    @property
    def group_key(self) -> tuple[str, str, str]:
        """Images that can share a label: same patient, study and frame of reference."""
        m = self.meta
        return (str(m.get("patient_id", "")), str(m.get("study_uid", "")), str(m.get("frame_of_reference_uid", "")))


def strip_nifti_suffix(name: str) -> str:
    """``case_001.nii.gz`` -> ``case_001``."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def nifti_files(folder: str | os.PathLike) -> list[Path]:
    """NIfTI files directly in ``folder``, sorted, hidden files (``._x.nii.gz``) skipped.

    Raises:
        DataNotFoundError: the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder {folder} does not exist or is not a folder")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.endswith(NIFTI_SUFFIXES)
    )


def items_from_folder(folder: str | os.PathLike) -> list[ImageItem]:
    """Every NIfTI file of a folder as an item.

    Raises:
        DataNotFoundError: the folder does not exist or holds no NIfTI file.
    """
    files = nifti_files(folder)
    if not files:
        raise DataNotFoundError(f"no .nii or .nii.gz file in {folder}")
    return [ImageItem(strip_nifti_suffix(p.name), p.resolve()) for p in files]


def load_conversion(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read ``conversion.json`` (or the folder holding it).

    Returns:
        (summary, folder of the summary) - NIfTI paths in it are relative to that folder.

    Raises:
        DataNotFoundError: no summary there.
        DataFormatError: it is not a conversion summary.
    """
    path = Path(path)
    if path.is_dir():
        path = path / artefacts.CONVERSION_JSON
    summary = artefacts.read_json(path, "conversion summary")
    if not isinstance(summary, dict) or summary.get("stage") != "convert" or "converted" not in summary:
        raise DataFormatError(f"{path} is not a conversion summary written by `prep convert`")
    return summary, path.parent


def items_from_conversion(summary: dict[str, Any], base: Path) -> list[ImageItem]:
    """Converted series as items (absolute paths)."""
    items = []
    for entry in summary["converted"]:
        path = (base / entry["nifti"]).resolve()
        items.append(ImageItem(strip_nifti_suffix(path.name), path, dict(entry)))
    return items
