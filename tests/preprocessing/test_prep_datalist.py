"""dataset.json: MSD format that the segmentation task's reader and MONAI accept."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from monai_fl.data.msd import read_datalist
from preprocessing.datalist import build_datalist
from preprocessing.errors import PrepConfigError
from preprocessing.inventory import items_from_conversion, items_from_folder
from preprocessing.labels import LabelSpec, pair_labels
from preprocessing.quality import assess_site

TUMOUR = {0: "background", 1: "tumour"}


def _pairing(converted_study, **spec):
    summary, out = converted_study
    return pair_labels(items_from_conversion(summary, out), LabelSpec(**spec))


def test_real_study_datalist_is_read_by_the_task_reader(tmp_path, converted_study):
    pairing = _pairing(converted_study, series_pattern="Mask", names=TUMOUR)
    payload = build_datalist(pairing, tmp_path / "site" / "dataset.json", assess_site(pairing), name="PGBM")
    assert payload["numTraining"] == 4 and payload["labels"] == {"0": "background", "1": "tumour"}
    assert payload["modality"] == {"0": "MR"} and payload["tensorImageSize"] == "3D"
    data = read_datalist(tmp_path / "site" / "dataset.json", validate=True)  # shapes, affines, label values
    assert len(data.cases) == 4 and list(data.label_names) == ["background", "tumour"]
    assert {c.label.name for c in data.cases} == {"PGBM-001_s5364_Mask-Tumor.nii.gz"}
    monai_list = load_decathlon_datalist(str(tmp_path / "site" / "dataset.json"), True, "training")
    assert all(Path(d["image"]).is_file() and Path(d["label"]).is_file() for d in monai_list)


def test_channels_are_stacked_into_4d(tmp_path, converted_study):
    pairing = _pairing(converted_study, series_pattern="Mask", names=TUMOUR)
    path = tmp_path / "dataset.json"
    payload = build_datalist(pairing, path, channels=["T1post", "T1pre", "FLAIR", "T2"])
    assert payload["numTraining"] == 1 and payload["modality"] == {"0": "T1post", "1": "T1pre", "2": "FLAIR", "3": "T2"}
    img = nib.load(tmp_path / payload["training"][0]["image"])
    assert img.shape == (260, 320, 25, 4)
    summary, out = converted_study
    flair = next(e for e in summary["converted"] if e["description"] == "FLAIR_reg")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj)[..., 2], np.asanyarray(nib.load(out / flair["nifti"]).dataobj))
    data = read_datalist(path, validate=True)
    assert data.n_channels == 4


def test_missing_channel_excludes_the_study(tmp_path, converted_study):
    pairing = _pairing(converted_study, series_pattern="Mask", names=TUMOUR)
    path = tmp_path / "dataset.json"
    path.write_text("{}")  # an earlier datalist is not replaced by an empty one
    with pytest.raises(PrepConfigError, match=r"no labelled image is left .*1 excluded.*no series matches channel\(s\) \['DWI'\]"):
        build_datalist(pairing, path, channels=["T1post", "DWI"])
    assert path.read_text() == "{}"


def _folder_site(tmp_path: Path, label_values=(0, 1)) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(np.full((4, 4, 4), float(i), np.float32), np.eye(4)), tmp_path / "img" / f"c{i}.nii.gz")
        lab = np.zeros((4, 4, 4), np.uint8)
        lab[0, 0, : len(label_values)] = label_values
        if i < 2:
            nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "lab" / f"c{i}_seg.nii.gz")
    return tmp_path


def test_unlabelled_images_go_to_test_and_quality_errors_are_excluded(tmp_path):
    site = _folder_site(tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.uint8), np.eye(4)), site / "lab" / "c1_seg.nii.gz")  # wrong shape
    pairing = pair_labels(items_from_folder(site / "img"), LabelSpec(directory=site / "lab"))
    payload = build_datalist(pairing, site / "out" / "dataset.json", assess_site(pairing))
    assert payload["training"] == [{"image": "../img/c0.nii.gz", "label": "../lab/c0_seg.nii.gz"}]
    assert payload["test"] == ["../img/c2.nii.gz"] and payload["numTest"] == 1
    (excluded,) = payload["excluded"]
    assert excluded["image"] == "../img/c1.nii.gz" and "c1_seg.nii.gz is (4, 4, 3)" in excluded["reason"]


def test_non_contiguous_label_values_are_refused(tmp_path):
    site = _folder_site(tmp_path, label_values=(0, 2))
    pairing = pair_labels(items_from_folder(site / "img"), LabelSpec(directory=site / "lab"))
    with pytest.raises(PrepConfigError, match=r"label values \[0, 2\] do not number the classes"):
        build_datalist(pairing, site / "dataset.json")


def test_classification_datalist(tmp_path):
    site = _folder_site(tmp_path)
    (site / "classes.csv").write_text("image,label\nc0.nii.gz,1\nc1,0\nc2,1\n")
    pairing = pair_labels(items_from_folder(site / "img"), LabelSpec(csv=site / "classes.csv", names={0: "normal", 1: "pneumonia"}))
    payload = build_datalist(pairing, site / "dataset.json", name="cls")
    assert payload["labels"] == {"0": "normal", "1": "pneumonia"}
    assert [t["label"] for t in payload["training"]] == [1, 0, 1]
    on_disk = json.loads((site / "dataset.json").read_text())
    assert on_disk["training"][0] == {"image": "./img/c0.nii.gz", "label": 1}
    monai_list = load_decathlon_datalist(str(site / "dataset.json"), True, "training")
    assert [d["label"] for d in monai_list] == [1, 0, 1]  # class indices pass through as ints
    assert all(Path(d["image"]).is_file() for d in monai_list)
