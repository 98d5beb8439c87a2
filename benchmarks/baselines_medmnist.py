"""Local-only CNNs (3 sites, Dirichlet(0.5)) and classical models on PneumoniaMNIST and BreastMNIST.

    python benchmarks/baselines_medmnist.py [--data-root DIR]

Each site trains alone with the centralized run's network and epoch budget; figures are the mean
(± sd) over the site models on the official test split. Classical models (scikit-learn) train on
flattened pixels of all sites' cases. Writes benchmarks/results/baselines_medmnist.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from monai_fl.baselines.classical import run_classical  # noqa: E402
from monai_fl.baselines.deep import run_local  # noqa: E402
from monai_fl.config import ExperimentConfig  # noqa: E402
from monai_fl.experiment import prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--width-pneumonia", type=int, default=16)
    ap.add_argument("--width-breast", type=int, default=32)
    ap.add_argument("--epochs-pneumonia", type=int, default=10)
    ap.add_argument("--epochs-breast", type=int, default=30)
    args = ap.parse_args()
    out = {}
    for name, epochs, width in (("pneumoniamnist", args.epochs_pneumonia, args.width_pneumonia),
                                ("breastmnist", args.epochs_breast, args.width_breast)):
        cfg = ExperimentConfig.from_dict({"dataset": {"name": name}, "partition": {"n_sites": 3, "scheme": "dirichlet:0.5"},
                                          "network": {"name": "resnet18", "width": width}, "train": {"epochs": epochs}})
        exp = prepare(cfg, args.data_root)
        local = run_local(exp)
        classical = run_classical(exp)
        out[name] = {
            "split": "3 sites, dirichlet:0.5, seed 0",
            "site_sizes": {s: e["n_train"] for s, e in exp.manifest["sites"].items()},
            "local_mean": {"test_auc": local["pooled"]["auc"], "test_auc_std": local["pooled"]["auc_std"],
                           "test_acc": local["pooled"]["acc"], "test_acc_std": local["pooled"]["acc_std"], "epochs": epochs},
            "local_per_site": {s: {"test_auc": r["pooled"]["auc"], "test_acc": r["pooled"]["acc"]}
                               for s, r in local["per_site_model"].items()},
            "classical": {m: {"test_auc": r["pooled"]["auc"], "test_acc": r["pooled"]["acc"], "train_time_s": r["train_time_s"]}
                          for m, r in classical.items()},
        }
    emit("baselines_medmnist", out)


if __name__ == "__main__":
    main()
