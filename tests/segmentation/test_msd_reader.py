"""The MSD datalist reader: a good task reads; each kind of bad input fails with a message naming
the file and the problem; the task folder is found via --data-root or $MONAI_FL_DATA."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_fl.data.msd import load_msd, locate_datalist, read_datalist, task_folder
from monai_fl.errors import DataFormatError, DataNotFoundError, MonaiFLError
from monai_fl.keys import DATA_ENV


def _label_path(js: Path, i: int = 1) -> Path:
    return js.parent / "labelsTr" / f"phantom_{i:03d}.nii.gz"


def _image_path(js: Path, i: int = 1) -> Path:
    return js.parent / "imagesTr" / f"phantom_{i:03d}.nii.gz"


def test_reads_a_good_task(phantom_task):
    data = read_datalist(phantom_task)
    assert data.labels == ("background", "sphere")
    assert data.modalities == ("MRI",)
    assert len(data.cases) == 4 and data.num_classes == 2 and data.n_channels == 1
    assert data.cases[1].image == _image_path(phantom_task).resolve()
    assert data.cases[1].name == "phantom_001"
    assert data.datalist([1])[0] == {"image": str(data.cases[1].image), "label": str(data.cases[1].label)}
    assert len(data.md5) == 32
    assert read_datalist(phantom_task.parent).md5 == data.md5  # the folder works too


def test_missing_file_is_named(phantom_task):
    _label_path(phantom_task).unlink()
    for validate in (True, False):  # existence is checked even without full validation
        with pytest.raises(DataFormatError, match=r"phantom_001\.nii\.gz \(training\[1\]\.label\) does not exist"):
            read_datalist(phantom_task, validate=validate)


def test_shape_mismatch_names_both_files_and_shapes(phantom_task):
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 15), np.uint8), np.eye(4)), _label_path(phantom_task))
    with pytest.raises(DataFormatError) as err:
        read_datalist(phantom_task)
    msg = str(err.value)
    assert "shape mismatch" in msg and "(24, 24, 16)" in msg and "(24, 24, 15)" in msg
    assert str(_image_path(phantom_task).resolve()) in msg and str(_label_path(phantom_task).resolve()) in msg
    read_datalist(phantom_task, validate=False)  # headers are read only when validating


def test_affine_mismatch_names_both_files_and_affines(phantom_task):
    seg = np.asanyarray(nib.load(_label_path(phantom_task)).dataobj)
    shifted = np.eye(4)
    shifted[0, 3] = 2.5
    nib.save(nib.Nifti1Image(seg, shifted), _label_path(phantom_task))
    with pytest.raises(DataFormatError) as err:
        read_datalist(phantom_task)
    msg = str(err.value)
    assert "affine mismatch" in msg and "2.5" in msg
    assert str(_image_path(phantom_task).resolve()) in msg and str(_label_path(phantom_task).resolve()) in msg


@pytest.mark.parametrize("bad_value, shown", [(3, "3"), (-1, "-1"), (0.5, "0.5")])
def test_labels_outside_declared_classes_are_named(phantom_task, bad_value, shown):
    seg = np.asanyarray(nib.load(_label_path(phantom_task)).dataobj).astype(np.float32)
    seg[0, 0, 0] = bad_value
    nib.save(nib.Nifti1Image(seg, np.eye(4)), _label_path(phantom_task))
    with pytest.raises(DataFormatError) as err:
        read_datalist(phantom_task)
    msg = str(err.value)
    assert str(_label_path(phantom_task).resolve()) in msg
    assert f"value(s) {shown} outside the declared classes 0..1" in msg


def test_all_bad_cases_are_reported_together(phantom_task):
    for i in (0, 2):
        _label_path(phantom_task, i).unlink()
    with pytest.raises(DataFormatError, match=r"2 bad case\(s\).*phantom_000.*phantom_002"):
        read_datalist(phantom_task)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("training"), "'training' must be a non-empty list"),
    (lambda d: d.update(labels={"0": "background", "2": "x"}), "0..K-1 without gaps"),
    (lambda d: d.update(labels={"0": "background"}), "only the background"),
    (lambda d: d.update(labels={"a": "background"}), "keys must be integers"),
    (lambda d: d["training"][0].pop("label"), r"training\[0\] must have string 'image' and 'label'"),
    (lambda d: d["training"].append(dict(d["training"][0])), r"training\[4\] repeats the image"),
    (lambda d: d.update(numTraining=9), "numTraining is 9 but 'training' lists 4"),
])
def test_malformed_datalist_is_rejected(phantom_task, edit, message):
    raw = json.loads(phantom_task.read_text())
    edit(raw)
    phantom_task.write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match=message):
        read_datalist(phantom_task)


def test_not_json_and_absent_datalist(tmp_path):
    bad = tmp_path / "dataset.json"
    bad.write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_datalist(bad)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_datalist(tmp_path / "nowhere" / "dataset.json")


def test_multichannel_image_needs_declared_modalities(phantom_task):
    img = np.zeros((24, 24, 16, 2), np.float32)
    nib.save(nib.Nifti1Image(img, np.eye(4)), _image_path(phantom_task))
    with pytest.raises(DataFormatError, match=r"2 channel\(s\).*declares 1 modalities"):
        read_datalist(phantom_task)


def test_locate_via_data_root_or_env_and_error_lists_places(phantom_task, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    task_dir = phantom_task.parent  # tmp_path/Task99_Phantom
    assert locate_datalist("Task99_Phantom", task_dir) == phantom_task          # the folder itself
    assert locate_datalist("Task99_Phantom", task_dir.parent) == phantom_task   # its parent
    env_root = tmp_path / "env"
    (env_root / "msd").mkdir(parents=True)
    task_dir.rename(env_root / "msd" / "Task99_Phantom")
    monkeypatch.setenv(DATA_ENV, str(env_root))
    assert load_msd("Task99_Phantom").path == env_root / "msd" / "Task99_Phantom" / "dataset.json"
    with pytest.raises(DataNotFoundError) as err:
        locate_datalist("msd_hippocampus", tmp_path)
    msg = str(err.value)
    assert "Task04_Hippocampus" in msg and str(tmp_path) in msg and str(env_root / "msd" / "Task04_Hippocampus") in msg
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        locate_datalist("msd_hippocampus", tmp_path / "missing")


def test_task_names():
    assert task_folder("msd_hippocampus") == "Task04_Hippocampus"
    assert task_folder("task04_hippocampus") == "Task04_Hippocampus"
    with pytest.raises(MonaiFLError, match="unknown segmentation dataset 'pneumoniamnist'"):
        task_folder("pneumoniamnist")
