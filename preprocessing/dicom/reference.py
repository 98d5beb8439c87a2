"""Compare our NIfTI geometry with the reference converter dcm2niix.

Two converters may store the same voxels with different axis directions (dcm2niix flips the
row axis so that images display in radiological convention); the affine accounts for that.
We therefore bring both images to their closest canonical (RAS+) orientation before comparing
voxels and affines, and report which axes were flipped or permuted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from preprocessing.errors import PrepConfigError


@dataclass(frozen=True)
class Agreement:
    """How two images of the same series agree.

    Attributes:
        same_shape: shapes equal after reorientation.
        voxels_equal: every voxel equal (after reorientation).
        max_abs_diff: largest voxel difference (0 when equal; nan when shapes differ).
        max_affine_diff: largest element difference of the canonical affines.
        max_corner_mm: largest distance between the world positions of the 8 corner voxels.
        axis_transform: per axis of ours, (reference axis, +1/-1), i.e. permutation and flips.
    """

    same_shape: bool
    voxels_equal: bool
    max_abs_diff: float
    max_affine_diff: float
    max_corner_mm: float
    axis_transform: list[list[int]]

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ornt = nio.io_orientation(affine)
    data3 = np.asarray(data)
    out = nio.apply_orientation(data3, ornt)
    new_affine = affine @ nio.inv_ornt_aff(ornt, data3.shape[:3])
    return out, new_affine


def _corners(shape: Sequence[int]) -> np.ndarray:
    lo_hi = [(0, max(int(n) - 1, 0)) for n in shape[:3]]
    return np.array([[i, j, k, 1.0] for i in lo_hi[0] for j in lo_hi[1] for k in lo_hi[2]]).T


def compare_images(
    data: np.ndarray, affine: np.ndarray, ref_data: np.ndarray, ref_affine: np.ndarray
) -> Agreement:
    """Compare voxels and geometry of two images, up to axis flips/permutations.

    Args:
        data: our array (3-D, or 4-D with volumes last).
        affine: our RAS affine.
        ref_data: the reference array.
        ref_affine: the reference RAS affine.

    Returns:
        An :class:`Agreement`.
    """
    ours, ours_aff = _canonical(data, affine)
    ref, ref_aff = _canonical(ref_data, ref_affine)
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.io_orientation(ref_affine))
    same_shape = ours.shape == ref.shape
    if same_shape:
        diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        corners = _corners(ours.shape)
        corner_mm = float(np.linalg.norm((ours_aff @ corners - ref_aff @ corners)[:3], axis=0).max())
    else:
        max_abs, corner_mm = float("nan"), float("nan")
    return Agreement(
        same_shape=same_shape,
        voxels_equal=same_shape and max_abs == 0.0,
        max_abs_diff=max_abs,
        max_affine_diff=float(np.abs(ours_aff - ref_aff).max()),
        max_corner_mm=corner_mm,
        axis_transform=[[int(a), int(f)] for a, f in transform],
    )


def dcm2niix_binary() -> str:
    """Path of the dcm2niix executable (PyPI ``dcm2niix`` package, then PATH).

    Raises:
        PrepConfigError: dcm2niix is not installed.
    """
    try:
        import dcm2niix  # the PyPI wheel ships the binary next to its __init__

        if Path(dcm2niix.bin).is_file():
            return str(dcm2niix.bin)
    except ImportError:
        pass
    for candidate in (shutil.which("dcm2niix"), str(Path(sys.executable).parent / "dcm2niix")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise PrepConfigError(
        "dcm2niix is not installed; install it with `pip install dcm2niix` to verify geometry"
    )


def run_dcm2niix(files: Sequence[Path], work_dir: Path | None = None) -> list[Path]:
    """Convert exactly the given files with dcm2niix.

    The files are linked into a private folder first, so other series that share the
    original folder are not converted along with them.

    Args:
        files: the DICOM files of one series.
        work_dir: where to put links and output (a temporary folder if None; the caller then
            must read the outputs before the folder is removed, see :func:`dcm2niix_reference`).

    Returns:
        The NIfTI files written (usually one).

    Raises:
        PrepConfigError: dcm2niix is missing or fails.
    """
    binary = dcm2niix_binary()
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="dcm2niix_"))
    src, out = work / "in", work / "out"
    src.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        link = src / f"{i:06d}.dcm"
        if not link.exists():
            link.symlink_to(Path(f).resolve())
    proc = subprocess.run(
        [binary, "-z", "n", "-b", "n", "-f", "ref_%s", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    niftis = sorted(out.glob("*.nii"))
    if proc.returncode != 0 or not niftis:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        raise PrepConfigError(f"dcm2niix failed on {files[0]} and others: {tail[0]}")
    return niftis


def dcm2niix_reference(
    files: Sequence[Path], data: np.ndarray, affine: np.ndarray
) -> dict:
    """Convert a series with dcm2niix and compare it with our array and affine.

    Args:
        files: the series' files.
        data: our voxel array.
        affine: our RAS affine.

    Returns:
        ``{"dcm2niix": version string, "outputs": n, **Agreement}``; when dcm2niix writes
        several files the best-agreeing one is reported.
    """
    with tempfile.TemporaryDirectory(prefix="dcm2niix_") as tmp:
        niftis = run_dcm2niix(files, Path(tmp))
        results = []
        for path in niftis:
            img = nib.load(path)
            ref = np.asanyarray(img.dataobj)  # nibabel applies dcm2niix's scl_slope/scl_inter
            results.append(compare_images(data, affine, ref, img.affine))
        best = min(
            results,
            key=lambda a: (not a.same_shape, np.nan_to_num(a.max_corner_mm, nan=np.inf)),
        )
        version = subprocess.run(
            [dcm2niix_binary(), "-v"], capture_output=True, text=True, check=False
        ).stdout.strip().splitlines()[-1:]
    return {"dcm2niix": version[0] if version else "?", "outputs": len(niftis), **best.as_dict()}
