"""Segmentation through the same federated path as classification: a 2-site × 2-round 3D HE job
on tiny phantom volumes in the NVFlare simulator."""

import pytest
import torch

from monai_fl.config import ExperimentConfig
from monai_fl.fl.simulate import load_site_model
from monai_fl.run import run_experiment
from seg_fixtures import write_msd_task

pytestmark = pytest.mark.slow


def test_3d_he_fedavg_on_tiny_volumes(tmp_path):
    write_msd_task(tmp_path / "Task99_Phantom", n_cases=28, shape=(24, 24, 16))
    cfg = ExperimentConfig.from_dict({
        "name": "seg_he", "task": "segmentation", "dataset": {"name": "Task99_Phantom"},
        "partition": {"n_sites": 2, "scheme": "iid", "seed": 0},
        "network": {"name": "unet", "width": 8},
        "train": {"epochs": 2, "batch_size": 2, "lr": 0.003, "threads": 1},
        "segmentation": {"spatial_dims": 3, "roi_size": [16, 16, 16], "in_channels": 1, "class_names": ["sphere"],
                         "test_fraction": 0.25},
        "fl": {"rounds": 2, "local_epochs": 1, "he": True},
    })
    results = run_experiment(cfg, tmp_path / "run", data_root=tmp_path, methods=("fl_he",))
    fl = results["methods"]["fl_he"]
    assert set(fl["sites"]) == {"site-1", "site-2"} and len(fl["rounds"]) == 2
    for metrics in fl["sites"].values():
        assert 0.0 <= metrics["mean_dice"] <= 1.0
    assert fl["pooled_consistent_across_sites"] is True
    assert 0.0 <= fl["pooled"]["mean_dice"] <= 1.0
    ws = tmp_path / "run" / "sim_he"
    a = load_site_model(ws, cfg, "site-1").state_dict()
    b = load_site_model(ws, cfg, "site-2").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "mean dice" in report
    figures = results["figures"]
    assert figures["model"] == "fl_he" and figures["paths"]
    for rel in figures["paths"]:
        assert (tmp_path / "run" / rel).stat().st_size > 0 and rel in report
