"""Data-quality report: each check on a small synthetic site with known defects, then real data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocessing.inventory import items_from_conversion, items_from_folder, load_conversion
from preprocessing.labels import LabelSpec, pair_labels
from preprocessing.quality import assess_site, render_html, robust_z, write_report

CODES_BY_ID = dict[str, set[str]]


def _write(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0), affine: np.ndarray | None = None) -> None:
    aff = np.diag([*zooms, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, aff), path)


@pytest.fixture
def defective_site(tmp_path) -> Path:
    """Eight 12x12x8 images with labels; defects planted in known cases."""
    rng = np.random.default_rng(0)
    img_dir, lab_dir = tmp_path / "imagesTr", tmp_path / "labelsTr"
    img_dir.mkdir()
    lab_dir.mkdir()
    for i in range(8):
        img = (rng.normal(100, 10, (12, 12, 8))).astype(np.float32)
        lab = np.zeros((12, 12, 8), np.uint8)
        lab[2:5, 2:5, 2:4] = 1  # 18 voxels of class 1
        lab[6:8, 6:8, 5] = 2  # 4 voxels of class 2
        zooms = (1.0, 1.0, 1.0)
        lab_aff = None
        if i == 1:
            zooms = (1.0, 1.0, 3.0)  # spacing outlier
        if i == 2:
            img *= 1000  # intensity outlier (another scanner's scale)
        if i == 3:
            lab = lab[:, :, :6]  # label with the wrong shape
        if i == 4:
            lab_aff = np.diag([1.0, 1.0, 1.0, 1.0])
            lab_aff[0, 3] = 0.5  # label half a voxel off
        if i == 5:
            lab = lab.astype(np.float32) + 0.5  # not class values
        _write(img_dir / f"case_{i}.nii.gz", img, zooms)
        if i != 6:  # case_6 has no label
            _write(lab_dir / f"case_{i}.nii.gz", lab, zooms, lab_aff)
    shutil.copy(img_dir / "case_0.nii.gz", img_dir / "case_7.nii.gz")  # exact duplicate of case_0
    _write(lab_dir / "stray.nii.gz", np.zeros((2, 2, 2), np.uint8))  # a label without image
    return tmp_path


def _codes(report) -> CODES_BY_ID:
    return {r["id"]: {i["code"] for i in r["issues"]} for r in report["items"]}


def test_each_planted_defect_is_found(defective_site):
    items = items_from_folder(defective_site / "imagesTr")
    pairing = pair_labels(items, LabelSpec(directory=defective_site / "labelsTr"))
    report = assess_site(pairing)
    codes = _codes(report)
    assert "spacing_outlier" in codes["case_1"]
    assert "intensity_outlier" in codes["case_2"]
    assert "label_shape_mismatch" in codes["case_3"]
    assert "label_affine_mismatch" in codes["case_4"]
    assert "label_not_classes" in codes["case_5"]
    assert codes["case_6"] == {"missing_label"}
    assert "duplicate_image" in codes["case_7"] and "duplicate_image" not in codes["case_0"]
    assert codes["case_0"] == set()
    s = report["summary"]
    assert s["status"] == "errors" and s["excluded_images"] == ["case_3", "case_4", "case_5", "case_7"]
    assert report["completeness"]["orphan_labels"] == [str((defective_site / "labelsTr" / "stray.nii.gz").resolve())]


def test_class_balance_counts_voxels(defective_site):
    items = [i for i in items_from_folder(defective_site / "imagesTr") if i.id in ("case_0", "case_1", "case_2")]
    report = assess_site(pair_labels(items, LabelSpec(directory=defective_site / "labelsTr")))
    classes = {c["value"]: c for c in report["labels"]["classes"]}
    assert classes[1]["voxels"] == 3 * 18 and classes[2]["voxels"] == 3 * 4
    assert classes[0]["voxels"] == 3 * (12 * 12 * 8 - 22)
    assert classes[1]["fraction_of_foreground"] == pytest.approx(18 / 22, abs=1e-6)
    assert classes[2]["images_with_class"] == 3 and report["labels"]["contiguous"]


def test_classification_balance(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(5):
        _write(tmp_path / "img" / f"x{i}.nii.gz", np.full((4, 4, 4), i, np.int16))
    (tmp_path / "labels.csv").write_text("image,label\nx0,normal\nx1,pneumonia\nx2,normal\nx3,normal\nghost,normal\n")
    pairing = pair_labels(items_from_folder(tmp_path / "img"), LabelSpec(csv=tmp_path / "labels.csv"))
    report = assess_site(pairing)
    assert report["labels"]["classes"] == [
        {"value": 0, "name": "normal", "images": 3},
        {"value": 1, "name": "pneumonia", "images": 1},
    ]
    assert report["labels"]["imbalance_ratio"] == 3.0
    assert _codes(report)["x4"] >= {"missing_label"} and report["completeness"]["orphan_labels"] == ["ghost"]


@pytest.mark.parametrize(
    "values, outliers",
    [([1, 1, 1, 1, 3], [4]), ([10, 11, 9, 10, 12, 10, 80], [6]), ([5, 5, 5, 5], [])],
)
def test_robust_z(values, outliers):
    assert list(np.nonzero(np.abs(robust_z(np.array(values))) > 3.5)[0]) == outliers


def test_dicom_site_report(tmp_path, converted_study, series_dirs):
    summary, out = converted_study
    pairing = pair_labels(items_from_conversion(summary, out), LabelSpec(series_pattern="mask", names={0: "background", 1: "tumour"}))
    assert len(pairing.images) == 4 and len(pairing.labels) == 4 and pairing.orphans == []
    report = assess_site(pairing, summary)
    assert report["summary"]["status"] == "ok" and report["summary"]["errors"] == 0
    tumour = report["labels"]["classes"][1]
    assert tumour["name"] == "tumour" and tumour["voxels"] == 4 * 2641 and tumour["images_with_class"] == 4
    assert report["completeness"]["dicom"]["converted"] == 5
    paths = write_report(report, tmp_path / "q")
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "## Class balance (segmentation)" in md and "| 1 | tumour | 10564 |" in md
    assert "<h2>Findings</h2>" in html and json.loads(paths["json"].read_text())["site"] == "site"


def test_dicom_duplicates_and_unreadable_files_are_reported(tmp_path, series_dirs):
    src = tmp_path / "in"
    shutil.copytree(series_dirs["T1post"], src / "t1post")
    shutil.copytree(series_dirs["T1post"], src / "again")  # same images exported twice, new UIDs
    import pydicom
    from pydicom.uid import generate_uid

    new_series = generate_uid()
    for f in (src / "again").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = new_series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f, enforce_file_format=True)
    (src / "broken.dcm").write_bytes(b"\x00" * 200)
    from preprocessing.dicom.convert import convert_tree

    summary = convert_tree(src, tmp_path / "out")
    conv, base = load_conversion(tmp_path / "out")
    report = assess_site(pair_labels(items_from_conversion(conv, base), LabelSpec()), conv)
    codes = {f["code"] for f in report["findings"]}
    assert {"duplicate_image", "duplicate_slices", "unreadable_file"} <= codes
    (unreadable,) = [f for f in report["findings"] if f["code"] == "unreadable_file"]
    assert unreadable["message"].startswith("broken.dcm:")
    assert len(report["summary"]["excluded_images"]) == 1 and summary["counts"]["converted"] == 2
    (dup,) = [f for f in report["findings"] if f["code"] == "duplicate_slices"]
    assert dup["message"].startswith("25 slice(s) with identical pixel data across series")


def test_msd_hippocampus(data_root):
    task = data_root / "msd" / "Task04_Hippocampus"
    if not (task / "imagesTr").is_dir():
        pytest.skip(f"{task} absent")
    pairing = pair_labels(items_from_folder(task / "imagesTr"), LabelSpec(directory=task / "labelsTr"))
    report = assess_site(pairing)
    s = report["summary"]
    # PROVENANCE.md: 260 pairs, same shape/affine, labels in {0,1,2}, 205 float32 + 55 uint8 images,
    # two labels stored as float32
    assert s["images"] == 260 and s["errors"] == 0 and report["completeness"]["labelled"] == 260
    assert report["consistency"]["dtypes"] == {"float32": 205, "uint8": 55}
    assert [c["value"] for c in report["labels"]["classes"]] == [0, 1, 2]
    assert sum(f["code"] == "float_label" for f in report["findings"]) == 2
    assert report["consistency"]["spacing_mm"]["max"] == [1.0, 1.0, 1.0]
    # intensity scales differ by orders of magnitude between subsets: reported, not hidden
    assert any(f["code"] == "intensity_outlier" for f in report["findings"])
    assert "<table>" in render_html(report)
