"""Site manifests for a segmentation pool: coverage, determinism, the held-out test set, the
manifest checks, and the task-agnostic baselines running unchanged on a segmentation experiment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monai_fl.baselines.deep import run_centralized, run_local
from monai_fl.config import ExperimentConfig
from monai_fl.data.msd import MSDCase, MSDDatalist, build_msd_manifest, check_msd_manifest, hold_out
from monai_fl.data.partition import read_manifest, write_manifest
from monai_fl.errors import ManifestError, MonaiFLError
from monai_fl.experiment import prepare
from monai_fl.keys import POOLED, MetricKey

from seg_fixtures import write_msd_task


def _datalist(n: int = 100) -> MSDDatalist:
    """A datalist of ``n`` cases whose files need not exist (manifests only count cases)."""
    cases = tuple(MSDCase(Path(f"/x/imagesTr/c_{i:03d}.nii.gz"), Path(f"/x/labelsTr/c_{i:03d}.nii.gz")) for i in range(n))
    return MSDDatalist("msd_test", Path("/x/dataset.json"), "0" * 32, ("background", "a", "b"), ("MRI",), cases)


@pytest.mark.parametrize("scheme", ["iid", "quantity:1", "quantity:5"])
@pytest.mark.parametrize("n_sites", [1, 2, 3])
def test_every_case_is_train_xor_test_and_shards_cover_the_test_set(scheme, n_sites):
    data = _datalist(100)
    m = build_msd_manifest(data, n_sites, scheme, seed=0, test_fraction=0.2)
    test = m["test_indices"]
    train = [i for e in m["sites"].values() for i in e["train_indices"]]
    shards = [i for e in m["sites"].values() for i in e["test_indices"]]
    assert len(test) == m["n_test"] == 20
    assert sorted(train + test) == list(range(100))       # each case exactly once
    assert sorted(shards) == sorted(test)                   # shards partition the held-out set
    assert m["test_cases"] == [f"c_{i:03d}" for i in test]
    assert m["n_pool"] == 100 and m["task"] == "segmentation"
    for e in m["sites"].values():
        assert e["n_train"] == len(e["train_indices"]) and e["n_test"] == len(e["test_indices"])


def test_test_shards_follow_site_sizes():
    m = build_msd_manifest(_datalist(200), 3, "quantity:1", seed=3, test_fraction=0.25)
    n_train = np.array([e["n_train"] for e in m["sites"].values()])
    n_test = np.array([e["n_test"] for e in m["sites"].values()])
    assert np.abs(n_test - n_train / n_train.sum() * 50).max() <= 1


def test_deterministic_for_a_seed_and_different_across_seeds():
    data = _datalist(100)
    a, b = (build_msd_manifest(data, 3, "iid", 7, 0.2) for _ in range(2))
    c = build_msd_manifest(data, 3, "iid", 8, 0.2)
    assert a == b
    assert a["test_indices"] != c["test_indices"]


def test_dirichlet_is_rejected_with_a_reason():
    with pytest.raises(MonaiFLError, match="no single class label; use iid or quantity"):
        build_msd_manifest(_datalist(), 3, "dirichlet:0.5", 0, 0.2)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001, -0.2])
def test_bad_test_fraction(fraction):
    with pytest.raises(MonaiFLError, match="test"):
        hold_out(100, fraction, 0)


def test_written_manifest_passes_read_manifest_and_checks(tmp_path):
    data = _datalist(100)
    path = write_manifest(build_msd_manifest(data, 3, "iid", 0, 0.2), tmp_path / "m.json")
    m = read_manifest(path, dataset_md5=data.md5, n_pool=100)
    check_msd_manifest(m, data, path, 3, "iid", 0.2)
    with pytest.raises(ManifestError, match=r"sites 3 \(config: 4\)"):
        check_msd_manifest(m, data, path, 4, "iid", 0.2)
    with pytest.raises(ManifestError, match="made from another file"):
        read_manifest(path, dataset_md5="f" * 32, n_pool=100)
    leaky = json.loads(path.read_text())
    leaky["sites"]["site-1"]["train_indices"].append(leaky["test_indices"][0])
    with pytest.raises(ManifestError, match="trains on held-out test cases"):
        check_msd_manifest(leaky, data, path)


def _phantom_cfg(**train) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "name": "phantom", "task": "segmentation", "dataset": {"name": "Task99_Phantom"},
        "partition": {"n_sites": 2, "scheme": "iid", "seed": 0},
        "network": {"name": "unet", "width": 4},
        "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, **train},
        "segmentation": {"roi_size": [16, 16, 16], "test_fraction": 0.2},
    })


def test_prepare_creates_then_reuses_the_manifest(tmp_path):
    js = write_msd_task(tmp_path / "Task99_Phantom", n_cases=25, shape=(20, 20, 16))
    cfg = _phantom_cfg()
    manifest = tmp_path / "run" / "manifest.json"
    exp = prepare(cfg, tmp_path, manifest)
    assert manifest.is_file() and exp.sites == ["site-1", "site-2"]
    assert len(exp.test_indices()) == 5 and len(exp.train_indices()) == 20
    assert exp.manifest["dataset_md5"] == exp.data.md5
    again = prepare(cfg, tmp_path, manifest, create=False)
    assert again.manifest == exp.manifest
    # The datalist changed after the manifest was made: its MD5 no longer matches.
    raw = json.loads(js.read_text())
    raw["description"] = "edited"
    js.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="made from another file"):
        prepare(cfg, tmp_path, manifest)
    with pytest.raises(ManifestError, match="does not exist"):
        prepare(cfg, tmp_path, tmp_path / "absent.json", create=False)


def test_baselines_run_unchanged_on_a_segmentation_experiment(tmp_path):
    write_msd_task(tmp_path / "Task99_Phantom", n_cases=25, shape=(20, 20, 16))
    exp = prepare(_phantom_cfg(), tmp_path, tmp_path / "manifest.json")
    result, model = run_centralized(exp)
    pooled = result[POOLED]
    assert set(pooled[MetricKey.DICE.value]) == {"sphere"}
    assert pooled[MetricKey.N.value] == 5
    assert set(result["sites"]) == {"site-1", "site-2"}
    assert len(result["history"]) == 1
    local = run_local(exp)
    assert local[POOLED]["n_models"] == 2 and MetricKey.MEAN_DICE.value in local[POOLED]
