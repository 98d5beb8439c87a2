"""Nothing lost, nothing overwritten: odd files, later batches, wrong maps and wrong options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from prep_helpers import axial_positions, bundled, write_series

from preprocessing.cli import main
from preprocessing.deid import deidentify as deid_module
from preprocessing.deid.deidentify import DeidOptions, deidentify_tree
from preprocessing.dicom.convert import convert_tree
from preprocessing.errors import DeidentificationError, PrepConfigError


def _odd_tree(root: Path) -> Path:
    """Good instances beside a DICOMDIR, a header-truncated file and a big-endian file."""
    root.mkdir(parents=True)
    shutil.copy(bundled("MR_small.dcm"), root / "mr.dcm")
    shutil.copy(bundled("CT_small.dcm"), root / "ct.dcm")
    shutil.copy(bundled("DICOMDIR"), root / "DICOMDIR")
    shutil.copy(bundled("MR_small_bigendian.dcm"), root / "big.dcm")
    (root / "cut.dcm").write_bytes(bundled("CT_small.dcm").read_bytes()[:600])  # header cut short
    return root


def test_deid_reports_odd_files_by_name_and_keeps_the_map(tmp_path):
    src = _odd_tree(tmp_path / "in")
    summary = deidentify_tree(src, tmp_path / "out", tmp_path / "map.json")
    reasons = {Path(s["source"]).name: s["reason"] for s in summary["skipped"]}
    assert summary["counts"]["written"] == 2
    assert reasons["DICOMDIR"].startswith("DICOMDIR (media directory)")
    assert "Big Endian" in reasons["big.dcm"]
    assert set(reasons) == {"DICOMDIR", "big.dcm", "cut.dcm"}
    saved = json.loads((tmp_path / "map.json").read_text())
    assert len(saved["files"]) == 2 and len(saved["skipped"]) == 3


def test_interrupted_deid_still_saves_the_map(tmp_path, monkeypatch):
    src = _odd_tree(tmp_path / "in")
    real, calls = deid_module._write_one, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(deid_module, "_write_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        deidentify_tree(src, tmp_path / "out", tmp_path / "map.json")
    saved = json.loads((tmp_path / "map.json").read_text())
    assert len(saved["files"]) == 1  # the one written file can still be re-identified
    assert (tmp_path / "out" / saved["files"][0]["output"]).is_file()
    assert not list((tmp_path / "out").rglob("*.part"))


def test_second_batch_joins_its_study_and_overwrites_nothing(tmp_path):
    positions = axial_positions(4)
    paths = write_series(tmp_path / "all", positions)
    for k, p in enumerate(paths):
        batch = tmp_path / ("batch1" if k < 2 else "batch2")
        batch.mkdir(exist_ok=True)
        shutil.move(p, batch / p.name)
    out, reid = tmp_path / "out", tmp_path / "map.json"
    first = deidentify_tree(tmp_path / "batch1", out, reid)
    before = {p: p.read_bytes() for p in out.rglob("*.dcm")}
    second = deidentify_tree(tmp_path / "batch2", out, reid)
    assert first["counts"]["written"] == second["counts"]["written"] == 2
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing overwritten
    folders = {str(Path(o).parent) for o in first["outputs"] + second["outputs"]}
    assert len(folders) == 1 and folders.pop().startswith("P0001/study-1/")
    assert len(list(out.rglob("*.dcm"))) == 4
    again = deidentify_tree(tmp_path / "batch2", out, reid)  # a re-run resumes, adds no copy
    assert again["counts"]["written"] == 0 and again["counts"]["already_done"] == 2
    assert len(list(out.rglob("*.dcm"))) == 4
    conversion = convert_tree(out, tmp_path / "nifti")
    assert conversion["counts"]["converted"] == 1 and conversion["converted"][0]["shape"][2] == 4


def test_output_of_another_map_is_refused(tmp_path):
    src = _odd_tree(tmp_path / "in")
    deidentify_tree(src, tmp_path / "out", tmp_path / "map.json")
    with pytest.raises(DeidentificationError, match="P0001.*does not\\s+know"):
        deidentify_tree(src, tmp_path / "out", tmp_path / "other_map.json")


def test_burned_in_prone_modality_needs_an_explicit_no(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name, flag in (("flagged_no.dcm", "NO"), ("unflagged.dcm", None)):
        ds = pydicom.dcmread(bundled("CT_small.dcm"))
        ds.Modality, ds.SOPInstanceUID = "US", pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if flag:
            ds.BurnedInAnnotation = flag
        ds.save_as(src / name, enforce_file_format=True)
    summary = deidentify_tree(src, tmp_path / "out", tmp_path / "map.json")
    assert summary["counts"]["written"] == 1
    [skip] = summary["skipped"]
    assert Path(skip["source"]).name == "unflagged.dcm" and "modality US" in skip["reason"]
    allowed = deidentify_tree(src, tmp_path / "out2", tmp_path / "map2.json", DeidOptions(allow_burned_in=True))
    assert allowed["counts"]["written"] == 2


def test_intact_copy_stands_in_for_a_truncated_one(tmp_path):
    paths = write_series(tmp_path / "in", axial_positions(3))
    data = paths[1].read_bytes()
    (tmp_path / "in" / "a_truncated_copy.dcm").write_bytes(data[: len(data) - 500])  # sorts first
    conversion = convert_tree(tmp_path / "in", tmp_path / "out")
    assert conversion["counts"]["converted"] == 1 and conversion["converted"][0]["shape"][2] == 3
    notes = {n["path"]: n["kind"] for n in conversion["files_not_converted"]}
    assert notes == {"a_truncated_copy.dcm": "unreadable"}  # still reported by name


def test_convert_refuses_an_output_holding_another_input(tmp_path):
    write_series(tmp_path / "a", axial_positions(2))
    write_series(tmp_path / "b", axial_positions(2))
    convert_tree(tmp_path / "a", tmp_path / "out")
    convert_tree(tmp_path / "a", tmp_path / "out")  # the same input may be converted again
    with pytest.raises(PrepConfigError, match="holds the conversion of"):
        convert_tree(tmp_path / "b", tmp_path / "out")


def test_prep_all_refuses_a_map_inside_the_shared_output(tmp_path, capsys):
    src = _odd_tree(tmp_path / "in")
    code = main(["all", str(src), "-o", str(tmp_path / "site"), "--reid-map", str(tmp_path / "site" / "m.json")])
    assert code == 2 and "lies inside --out" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()


def test_prep_all_on_a_folder_without_dicom_says_so(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    code = main(["all", str(tmp_path / "in"), "-o", str(tmp_path / "site"), "--reid-map", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2 and "no DICOM instance under" in err and "1 not DICOM" in err


def test_prep_all_reports_files_left_behind_by_deid(tmp_path, capsys):
    src = _odd_tree(tmp_path / "in")
    code = main(["all", str(src), "-o", str(tmp_path / "site"), "--reid-map", str(tmp_path / "m.json")])
    assert code == 0
    quality = json.loads((tmp_path / "site" / "quality.json").read_text())
    [finding] = [f for f in quality["findings"] if f["code"] == "not_deidentified"]
    assert finding["message"].startswith("3 original file(s) were not de-identified")
    assert "big.dcm" not in json.dumps(quality)  # original names stay in the site-private map


def test_label_series_that_pairs_nothing_is_an_error_with_a_hint(tmp_path, dicom_study, capsys):
    out = tmp_path / "site"
    code = main(["all", str(dicom_study), "-o", str(out), "--reid-map", str(tmp_path / "m.json"), "--label-series", "Mask"])
    err = capsys.readouterr().err
    assert code == 2 and "paired no image" in err and "--keep SeriesDescription" in err
    assert (out / "conversion.json").is_file()  # the converted images are kept for a re-run
