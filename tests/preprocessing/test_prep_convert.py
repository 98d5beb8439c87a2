"""DICOM -> NIfTI on pydicom's bundled files, derived series and the real TCIA study."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from prep_helpers import axial_positions, bundled, copy_series, make_enhanced, write_series

from preprocessing.dicom.convert import ConvertOptions, convert_tree, format_summary
from preprocessing.dicom.discover import NoteKind, discover_series
from preprocessing.errors import DataNotFoundError, PrepConfigError


def _convert_one(tmp_path: Path, name: str) -> tuple[dict, nib.Nifti1Image]:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(bundled(name), src / name)
    summary = convert_tree(src, tmp_path / "out")
    (entry,) = summary["converted"]
    return entry, nib.load(tmp_path / "out" / entry["nifti"])


@pytest.mark.parametrize(
    "name, shape, spacing, origin_ras, dtype",
    [
        # CT_small: IPP (-158.135803, -179.035797, -75.699997), 0.661468 mm pixels, 5 mm thick
        ("CT_small.dcm", (128, 128, 1), (0.661468, 0.661468, 5.0), (158.135803, 179.035797, -75.699997), "int16"),
        # MR_small: IPP (-83.9063, -91.2, 6.6406), 0.3125 mm pixels, 0.8 mm thick
        ("MR_small.dcm", (64, 64, 1), (0.3125, 0.3125, 0.8), (83.9063, 91.2, 6.6406), "int16"),
        # RT Dose: 15 frames placed by GridFrameOffsetVector 0..70 mm, 10 mm pixels, float (Gy)
        ("rtdose.dcm", (10, 10, 15), (10.0, 10.0, 5.0), (-189.43125, -199.43125, -761.87), "float32"),
    ],
)
def test_known_geometry_of_bundled_files(tmp_path, name, shape, spacing, origin_ras, dtype):
    entry, img = _convert_one(tmp_path, name)
    assert img.shape == shape and entry["dtype"] == dtype
    np.testing.assert_allclose(img.header.get_zooms(), spacing, atol=1e-6)
    np.testing.assert_allclose(img.affine[:3, 3], origin_ras, atol=1e-6)
    assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1


def test_rescale_intercept_is_applied(tmp_path):
    entry, img = _convert_one(tmp_path, "CT_small.dcm")
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    expected = ds.pixel_array.T.astype(np.int32) - 1024
    np.testing.assert_array_equal(np.asanyarray(img.dataobj)[..., 0], expected)


def test_dose_grid_scaling_is_applied(tmp_path):
    entry, img = _convert_one(tmp_path, "rtdose.dcm")
    ds = pydicom.dcmread(bundled("rtdose.dcm"))
    expected = ds.pixel_array[7].T * float(ds.DoseGridScaling)
    np.testing.assert_allclose(np.asanyarray(img.dataobj)[..., 7], expected, rtol=1e-6)


def test_fractional_rescale_gives_float32(tmp_path):
    def halve(_k, ds):
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "0"

    write_series(tmp_path / "in", axial_positions(3), edit=halve)
    summary = convert_tree(tmp_path / "in", tmp_path / "out")
    (entry,) = summary["converted"]
    img = nib.load(tmp_path / "out" / entry["nifti"])
    raw = pydicom.dcmread(sorted((tmp_path / "in").glob("*.dcm"))[1]).pixel_array
    assert entry["dtype"] == "float32"
    np.testing.assert_allclose(np.asanyarray(img.dataobj)[..., 1], raw.T * 0.5)


@pytest.mark.parametrize(
    "positions, orientation, edit, reason",
    [
        ([p for k, p in enumerate(axial_positions(6)) if k != 3], (1, 0, 0, 0, 1, 0), None, "missing slices: 1 slice(s)"),
        (axial_positions(4), (1, 0, 0, 0, 1, 0), lambda k, ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9, 0.43589]) if k == 2 else None, "mixed orientations"),
        (axial_positions(4), (1, 0, 0, 0, 1, 0), lambda k, ds: setattr(ds, "PixelSpacing", [0.7, 0.7]) if k == 1 else None, "inconsistent PixelSpacing"),
        ([[0, 0, 0], [0, 0, 5], [0, 0, 10], [0, 0, 16.5]], (1, 0, 0, 0, 1, 0), None, "uneven slice spacing"),
    ],
    ids=["missing-slice", "mixed-orientation", "inconsistent-spacing", "uneven"],
)
def test_bad_series_are_skipped_with_reason(tmp_path, positions, orientation, edit, reason):
    write_series(tmp_path / "in" / "bad", positions, orientation=orientation, edit=edit)
    write_series(tmp_path / "in" / "good", axial_positions(3, start=(0, 0, 200)), base="MR_small.dcm")
    summary = convert_tree(tmp_path / "in", tmp_path / "out")
    assert summary["counts"]["converted"] == 1 and summary["counts"]["skipped"] == 1
    assert reason in summary["skipped"][0]["reason"]
    assert summary["skipped"][0]["first_file"].startswith("bad/")


def test_inconsistent_matrix_size_is_skipped(tmp_path):
    def crop(k, ds):
        if k == 1:
            arr = ds.pixel_array[:64, :64].copy()
            ds.Rows, ds.Columns, ds.PixelData = 64, 64, arr.tobytes()

    write_series(tmp_path / "in", axial_positions(3), edit=crop)
    summary = convert_tree(tmp_path / "in", tmp_path / "out")
    assert "inconsistent image sizes" in summary["skipped"][0]["reason"]
    assert "slice001.dcm is 64x64" in summary["skipped"][0]["reason"]


def test_gantry_tilt_is_converted_with_sheared_affine(tmp_path):
    tilt = np.tan(np.radians(20))
    positions = [[-158.1, -179.0 + 5 * k * tilt, -75.7 + 5 * k] for k in range(4)]
    write_series(tmp_path / "in", positions)
    summary = convert_tree(tmp_path / "in", tmp_path / "out")
    (entry,) = summary["converted"]
    assert entry["tilt_deg"] == pytest.approx(20.0, abs=1e-3)
    assert [i["code"] for i in entry["issues"]] == ["gantry_tilt"]
    img = nib.load(tmp_path / "out" / entry["nifti"])
    assert img.header["qform_code"] == 0 and img.header["sform_code"] == 1
    # voxel (0, 0, 3) lies exactly at the 4th slice's IPP (RAS)
    np.testing.assert_allclose(img.affine @ [0, 0, 3, 1], [158.1, 179.0 - 15 * tilt, -75.7 + 15, 1], atol=1e-4)


def test_multiframe_enhanced_equals_single_frame(tmp_path, series_dirs, converted_study):
    summary, out = converted_study
    (ref,) = [e for e in summary["converted"] if e["description"] == "T1post"]
    make_enhanced(series_dirs["T1post"], tmp_path / "enh", shuffle_seed=0)  # frames stored shuffled
    (entry,) = convert_tree(tmp_path / "enh", tmp_path / "out")["converted"]
    a, b = nib.load(tmp_path / "out" / entry["nifti"]), nib.load(out / ref["nifti"])
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-9)
    assert len(entry["slices"]) == 25 and entry["slices"][0]["source"].endswith("#frame 1") is False


def test_real_study_geometry(converted_study):
    summary, out = converted_study
    assert summary["counts"] == {
        "files": 126, "series": 5, "converted": 5, "skipped": 0,
        "unreadable": 0, "non_image": 0, "duplicate": 0, "ignored": 1,  # MD5SUMS
    }
    for entry in summary["converted"]:
        img = nib.load(out / entry["nifti"])
        assert img.shape == (260, 320, 25) and entry["orientation"] == "LPS"
        np.testing.assert_allclose(img.header.get_zooms(), (0.6875, 0.6875, 6.5), atol=1e-5)
    (mask,) = [e for e in summary["converted"] if "Mask" in e["description"]]
    data = np.asanyarray(nib.load(out / mask["nifti"]).dataobj)
    # PROVENANCE.md: binary mask, 2641 voxels on slices 14-20 (0-based; InstanceNumber 15-21)
    assert sorted(np.unique(data)) == [0, 1] and int(data.sum()) == 2641
    assert sorted(set(np.nonzero(data)[2])) == list(range(14, 21))


def test_slice_removed_from_real_series_is_reported(tmp_path, series_dirs):
    copy_series(series_dirs["T1post"], tmp_path / "in" / "t1post", skip=["000012.dcm"])
    copy_series(series_dirs["MaskTumor"], tmp_path / "in" / "mask")
    summary = convert_tree(tmp_path / "in", tmp_path / "out")
    assert [e["description"] for e in summary["converted"]] == ["Mask_Tumor"]
    (skipped,) = summary["skipped"]
    assert skipped["description"] == "T1post" and skipped["n_files"] == 24
    assert "missing slices: 1 slice(s) absent, typical step 6.500 mm" in skipped["reason"]
    assert "(step 13.000 mm)" in skipped["reason"]


def test_corrupt_files_are_named_and_the_rest_converts(tmp_path, series_dirs):
    src = tmp_path / "in"
    copy_series(series_dirs["T1post"], src / "t1post")
    flair = copy_series(series_dirs["FLAIRreg"], src / "flair")
    blob = (flair / "000007.dcm").read_bytes()
    (flair / "000007.dcm").write_bytes(blob[: len(blob) // 2])  # truncated copy inside a series
    (src / "broken.dcm").write_bytes(b"\x00" * 300 + b"not a dicom file")  # garbage with a DICOM name
    (src / "notes.txt").write_text("scanner export log")  # not DICOM, not meant to be
    shutil.copy(bundled("MR_truncated.dcm"), src / "MR_truncated.dcm")  # short pixel data element
    summary = convert_tree(src, tmp_path / "out")
    assert [e["description"] for e in summary["converted"]] == ["T1post"]
    reasons = {s["first_file"]: s["reason"] for s in summary["skipped"]}
    assert any("flair/000007.dcm: pixel data truncated" in r for r in reasons.values())
    assert "MR_truncated.dcm: pixel data truncated: 8130 bytes for 8192" in reasons["MR_truncated.dcm"]
    notes = {n["path"]: n for n in summary["files_not_converted"]}
    assert notes["broken.dcm"]["kind"] == NoteKind.UNREADABLE
    assert notes["notes.txt"]["kind"] == NoteKind.IGNORED
    text = format_summary(summary)
    assert "broken.dcm" in text and "flair/000007.dcm" in text and "MR_truncated.dcm" in text


@pytest.mark.parametrize(
    "name, kind, reason",
    [
        ("rtstruct.dcm", NoteKind.NON_IMAGE, "no pixel data (RT Structure Set Storage)"),
        ("rtplan.dcm", NoteKind.NON_IMAGE, "no pixel data (RT Plan Storage)"),
        ("test-SR.dcm", NoteKind.NON_IMAGE, "no pixel data (Comprehensive SR Storage)"),
    ],
)
def test_non_image_objects_are_noted(tmp_path, name, kind, reason):
    shutil.copy(bundled(name), tmp_path / name)
    disc = discover_series(tmp_path)
    assert disc.series == [] and [(n.kind, n.reason) for n in disc.notes] == [(kind, reason)]


@pytest.mark.parametrize(
    "name, reason",
    [
        ("SC_rgb_small_odd.dcm", "colour image"),
        ("liver_1frame.dcm", "DICOM SEG is not converted"),
    ],
)
def test_unsupported_images_are_skipped(tmp_path, name, reason):
    (tmp_path / "in").mkdir()
    shutil.copy(bundled(name), tmp_path / "in" / name)
    summary = convert_tree(tmp_path / "in", tmp_path / "out")
    assert summary["converted"] == [] and reason in summary["skipped"][0]["reason"]


def test_series_are_grouped_by_uid_and_duplicates_noted(tmp_path):
    a = write_series(tmp_path / "mixed", axial_positions(3))
    b = write_series(tmp_path / "mixed2", axial_positions(4, start=(0, 0, 50)), base="MR_small.dcm")
    # interleave both series in one folder, and store one instance twice
    for p in b:
        p.rename(tmp_path / "mixed" / f"mr_{p.name}")
    shutil.copy(a[0], tmp_path / "mixed" / "copy_of_slice000.dcm")
    disc = discover_series(tmp_path / "mixed")
    assert sorted(len(s.files) for s in disc.series) == [3, 4]
    (dup,) = disc.notes_of(NoteKind.DUPLICATE)
    assert dup.path.endswith("slice000.dcm") or dup.path.endswith("copy_of_slice000.dcm")


def test_output_inside_input_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(PrepConfigError, match="lies inside the input"):
        convert_tree(tmp_path / "in", tmp_path / "in" / "out")


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        convert_tree(tmp_path / "nope", tmp_path / "out")


def test_uncompressed_option(tmp_path):
    shutil.copy(bundled("MR_small.dcm"), tmp_path / "a.dcm")
    summary = convert_tree(tmp_path, tmp_path.parent / f"{tmp_path.name}_out", ConvertOptions(compress=False))
    assert summary["converted"][0]["nifti"].endswith(".nii")


def test_two_echoes_are_written_as_4d(tmp_path):
    positions = [p for p in axial_positions(3) for _ in range(2)]  # each position twice

    def echo(k, ds):
        ds.EchoNumbers, ds.EchoTime = k % 2 + 1, 10.0 if k % 2 == 0 else 80.0

    paths = write_series(tmp_path / "in", positions, edit=echo)
    (entry,) = convert_tree(tmp_path / "in", tmp_path / "out")["converted"]
    data = np.asanyarray(nib.load(tmp_path / "out" / entry["nifti"]).dataobj)
    assert data.shape == (128, 128, 3, 2)
    # slice 1 of echo 2 is the 4th written file (index 3): position 1, second echo
    second = pydicom.dcmread(paths[3])
    np.testing.assert_array_equal(data[:, :, 1, 1], second.pixel_array.T.astype(np.int32) - 1024)
