"""A real NVFlare simulator run (plaintext FedAvg, 2 sites × 2 rounds, small network, real BreastMNIST)."""

import json

import pytest

from monai_fl.config import ExperimentConfig
from monai_fl.run import run_experiment

pytestmark = pytest.mark.slow


def test_plain_fedavg_runs_and_reports(tmp_path, medmnist_dir):
    cfg = ExperimentConfig.from_dict({"name": "sim_plain", "dataset": {"name": "breastmnist"},
                                      "partition": {"n_sites": 2, "scheme": "iid"},
                                      "network": {"name": "cnn", "width": 4},
                                      "train": {"epochs": 2, "batch_size": 64, "augment": False},
                                      "fl": {"rounds": 2, "local_epochs": 1, "he": False}})
    results = run_experiment(cfg, tmp_path, data_root=medmnist_dir, methods=("fl_plain", "local"))
    fl = results["methods"]["fl_plain"]
    assert set(fl["sites"]) == {"site-1", "site-2"}
    assert [r["round"] for r in fl["rounds"]] == [0, 1]
    for rec in fl["rounds"]:
        assert set(rec["sites"]) == {"site-1", "site-2"}
        assert {"auc", "acc", "train_loss"} <= set(rec["sites"]["site-1"])
    # every site evaluated the same final model on the pooled test set; the researcher's evaluation agrees
    assert fl["pooled_consistent_across_sites"] is True
    assert fl["pooled"]["n"] == 156 and 0 <= fl["pooled"]["auc"] <= 1
    # the server saw metrics only: its workspace holds no image arrays
    server_files = list((tmp_path / "sim_plain" / "server").rglob("*"))
    assert not [p for p in server_files if p.suffix in (".npz", ".npy")]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["fl_plain"]["sites"]["site-1"]["auc"] == pytest.approx(fl["sites"]["site-1"]["auc"])
    for name in ("report.md", "report.html", "rounds.png", "roc.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert f"{fl['pooled']['auc']:.4f}" in md
    assert "epochs: centralized and local-only 2, federated 2 rounds × 1 local epoch = 2 per site" in md
