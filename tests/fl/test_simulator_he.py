"""The real HE job (the same builder as jobs/) in the NVFlare simulator: 2 sites × 2 rounds, small network."""

import pytest
import torch

from monai_fl.config import ExperimentConfig
from monai_fl.fl.simulate import load_site_model
from monai_fl.he.keys import is_private, load_context
from monai_fl.run import run_experiment

pytestmark = pytest.mark.slow


def test_he_fedavg_runs_and_the_server_holds_no_secret(tmp_path, medmnist_dir):
    cfg = ExperimentConfig.from_dict({"name": "sim_he", "dataset": {"name": "breastmnist"},
                                      "partition": {"n_sites": 2, "scheme": "iid"},
                                      "network": {"name": "cnn", "width": 4},
                                      "train": {"epochs": 2, "batch_size": 64, "augment": False},
                                      "fl": {"rounds": 2, "local_epochs": 1, "he": True}})
    results = run_experiment(cfg, tmp_path, data_root=medmnist_dir, methods=("fl_he",))
    fl = results["methods"]["fl_he"]
    assert set(fl["sites"]) == {"site-1", "site-2"} and len(fl["rounds"]) == 2
    assert fl["pooled_consistent_across_sites"] is True

    ws = tmp_path / "sim_he"
    # Both sites decrypted the same final global model.
    a = load_site_model(ws, cfg, "site-1").state_dict()
    b = load_site_model(ws, cfg, "site-2").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The server's workspace holds only public-parameter contexts and no plaintext model.
    server = ws / "server"
    contexts = list(server.rglob("*.tenseal"))
    assert contexts and not any(is_private(load_context(p)) for p in contexts)
    assert not list(server.rglob("*.pt")), "under HE the server persists no plaintext model"
    site_contexts = list((tmp_path / "site_keys").glob("*.tenseal"))  # beside them: he_key_id.txt
    assert site_contexts and all(is_private(load_context(p)) for p in site_contexts)
