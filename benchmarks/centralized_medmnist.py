"""Centralized CNN on PneumoniaMNIST and BreastMNIST (28 px) against the MedMNIST v2 paper's ResNet-18 (28).

    python benchmarks/centralized_medmnist.py [--data-root DIR] [--epochs-breast 30 --width-breast 32]

Trains on the pooled training cases of a 3-site Dirichlet(0.5) manifest (= the whole official
train+val), evaluates on the official test split. Writes benchmarks/results/centralized_medmnist.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from monai_fl.baselines.deep import run_centralized  # noqa: E402
from monai_fl.config import ExperimentConfig  # noqa: E402
from monai_fl.experiment import prepare  # noqa: E402

# MedMNIST v2 (Yang et al., Sci Data 2023), Table 3, ResNet-18 (28): test AUC / ACC.
PAPER = {"pneumoniamnist": {"auc": 0.944, "acc": 0.854}, "breastmnist": {"auc": 0.901, "acc": 0.863}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--width-pneumonia", type=int, default=16)
    ap.add_argument("--width-breast", type=int, default=32)
    ap.add_argument("--epochs-pneumonia", type=int, default=10)
    ap.add_argument("--epochs-breast", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = {}
    for name, epochs, width in (("pneumoniamnist", args.epochs_pneumonia, args.width_pneumonia),
                                ("breastmnist", args.epochs_breast, args.width_breast)):
        cfg = ExperimentConfig.from_dict({"name": f"{name}_centralized", "dataset": {"name": name},
                                          "network": {"name": "resnet18", "width": width},
                                          "train": {"epochs": epochs, "seed": args.seed}})
        exp = prepare(cfg, args.data_root)
        t0 = time.perf_counter()
        r, model = run_centralized(exp)
        out[name] = {
            "test_auc": r["pooled"]["auc"], "test_acc": r["pooled"]["acc"], "epochs": epochs,
            "network": f"MONAI ResNet (basic, [2,2,2,2], widths {width}x[1,2,4,8], 28-px stem)",
            "params": sum(p.numel() for p in model.parameters()), "n_train": len(exp.pooled_train()[1]),
            "n_test": r["pooled"]["n"], "train_time_s": time.perf_counter() - t0, "seed": args.seed,
            "paper_resnet18_28": PAPER[name],
            "at_or_above_paper": r["pooled"]["auc"] >= PAPER[name]["auc"] and r["pooled"]["acc"] >= PAPER[name]["acc"],
        }
    emit("centralized_medmnist", out)


if __name__ == "__main__":
    main()
