"""Geometry agreement with the reference converter dcm2niix on every real series.

dcm2niix stores the rows flipped (radiological display) and we store them as in DICOM, so
both images are brought to their closest canonical orientation before comparing voxels and
affines; the axis transform between them is checked explicitly.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
from prep_helpers import SERIES, bundled, make_enhanced

from preprocessing.dicom.convert import ConvertOptions, convert_tree
from preprocessing.dicom.discover import discover_series
from preprocessing.dicom.reference import compare_images, dcm2niix_binary, dcm2niix_reference
from preprocessing.errors import PrepConfigError

TOL_MM = 1e-3  # the bound; dcm2niix stores float32 affines (~1e-5 mm resolution)


@pytest.fixture(scope="module")
def dcm2niix() -> str:
    try:
        return dcm2niix_binary()
    except PrepConfigError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("series", sorted(SERIES))
def test_real_series_agree_with_dcm2niix(dcm2niix, series_dirs, series):
    disc = discover_series(series_dirs[series])
    (record,) = disc.series
    from preprocessing.dicom.convert import load_series

    volume = load_series(record)
    ref = dcm2niix_reference(record.files, volume.data, volume.affine)
    assert ref["outputs"] == 1 and ref["same_shape"]
    assert ref["voxels_equal"], f"{series}: voxel values differ by up to {ref['max_abs_diff']}"
    assert ref["max_affine_diff"] < TOL_MM and ref["max_corner_mm"] < TOL_MM
    # ours keeps DICOM row order; dcm2niix flips the row (j) axis: i -> i, j -> -j, k -> k
    assert ref["axis_transform"] == [[0, 1], [1, -1], [2, 1]]


def test_verify_option_records_agreement(dcm2niix, tmp_path):
    shutil.copy(bundled("CT_small.dcm"), tmp_path / "ct.dcm")
    summary = convert_tree(tmp_path, tmp_path.parent / f"{tmp_path.name}_out", ConvertOptions(verify_dcm2niix=True))
    ref = summary["converted"][0]["reference"]
    assert ref["dcm2niix"].startswith("v1.0") and ref["voxels_equal"] and ref["max_corner_mm"] < TOL_MM


def test_enhanced_multiframe_agrees_with_dcm2niix(dcm2niix, tmp_path, series_dirs):
    path = make_enhanced(series_dirs["T1post"], tmp_path / "enh")
    (record,) = discover_series(tmp_path / "enh").series
    from preprocessing.dicom.convert import load_series

    volume = load_series(record)
    ref = dcm2niix_reference([path], volume.data, volume.affine)
    assert ref["voxels_equal"] and ref["max_corner_mm"] < TOL_MM


def test_secondary_capture_mask_lies_on_the_t1post_grid(converted_study):
    """MaskTumor is Secondary Capture: its geometry tags are not part of that IOD but present
    (written by OsiriX, orientation rounded to 6 decimals); it lands on T1post's grid."""
    summary, out = converted_study
    by_desc = {e["description"]: e for e in summary["converted"]}
    mask, t1 = by_desc["Mask_Tumor"], by_desc["T1post"]
    assert mask["sop_class"] == "Secondary Capture Image Storage"
    a, b = nib.load(out / mask["nifti"]), nib.load(out / t1["nifti"])
    agreement = compare_images(np.asanyarray(a.dataobj), a.affine, np.asanyarray(b.dataobj), b.affine)
    assert agreement.same_shape and agreement.max_corner_mm < 1e-3
    assert mask["frame_of_reference_uid"] == t1["frame_of_reference_uid"]


def test_compare_images_detects_a_shift():
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    agreement = compare_images(data, np.eye(4), data, shifted)
    assert agreement.voxels_equal and agreement.max_corner_mm == pytest.approx(0.5)
    flipped = np.diag([1.0, -1.0, 1.0, 1.0])
    flipped[1, 3] = 2.0  # j flipped; same world positions
    agreement = compare_images(data, np.eye(4), data[:, ::-1, :], flipped)
    assert agreement.voxels_equal and agreement.max_corner_mm == pytest.approx(0.0)
    assert agreement.axis_transform == [[0, 1], [1, -1], [2, 1]]
