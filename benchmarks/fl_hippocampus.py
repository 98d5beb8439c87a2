"""Federated segmentation (HE and plaintext FedAvg) on MSD Task04 Hippocampus, 3 sites iid.

    python benchmarks/fl_hippocampus.py [--data-root DIR] [--config configs/hippocampus_seg.yaml]

Runs the config's federated methods through `monai_fl.run.run_experiment` (same manifest as
benchmarks/segmentation.py: 20 % held out, seed 0) and writes `fl_he` / `fl_plain` (Dice and HD95
per class, pooled and per site, round time, peak RSS), the HE round-time overhead and the UNet's
HE bytes/param into benchmarks/results/segmentation.json (other keys are kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, emit  # noqa: E402
from he_overhead import SEG_CONFIG, isolated, measure_codec  # noqa: E402

from monai_fl.config import ExperimentConfig  # noqa: E402
from monai_fl.run import run_experiment  # noqa: E402


def summary(entry: dict, wall: float) -> dict:
    pooled = entry["pooled"]
    later = entry["round_time_s"][1:] or entry["round_time_s"]
    return {"mean_dice": pooled["mean_dice"], "dice": pooled.get("dice"), "mean_hd95": pooled.get("mean_hd95"),
            "hd95": pooled.get("hd95"), "n": pooled.get("n"),
            "sites": {s: m.get("mean_dice") for s, m in entry["sites"].items()},
            "round_time_s": statistics.mean(later), "peak_rss_gib": entry["peak_rss_gib"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--config", type=Path, default=SEG_CONFIG)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fl_hippocampus"))
    args = ap.parse_args()
    cfg = ExperimentConfig.load(args.config)
    r = run_experiment(cfg, args.out, args.data_root, methods=("fl_he", "fl_plain"))
    fl = {k: summary(r["methods"][k], r["timing_s"][k]) for k in ("fl_he", "fl_plain")}
    fl["he_round_overhead"] = fl["fl_he"]["round_time_s"] / fl["fl_plain"]["round_time_s"] - 1
    path = RESULTS / "segmentation.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(fl)
    cent = merged.get("centralized", {}).get("mean_dice")
    if cent is not None:
        merged["fl_he_minus_centralized_mean_dice"] = fl["fl_he"]["mean_dice"] - cent
    if args.config.resolve() == SEG_CONFIG.resolve():
        # The network's codec cost, measured as benchmarks/he_overhead.py measures its models.
        codec = isolated(measure_codec, "hippocampus_unet", 1, 1, cfg.fl.he_codec)
        merged["he_codec"] = {k: codec[k] for k in (
            "num_params", "bytes_per_param", "upload_bytes_per_param", "download_bytes_per_param",
            "encrypt_mparams_per_s", "decrypt_mparams_per_s", "server_aggregation_s", "error_over_bound")}
        merged["he_codec"]["params"] = cfg.fl.he_codec
    merged.setdefault("fl_setup", {}).update(rounds=cfg.fl.rounds, local_epochs=cfg.fl.local_epochs,
                                             site_optimizer=cfg.fl.site_optimizer, threads_per_site=cfg.train.threads,
                                             network=f"{cfg.network.name} width {cfg.network.width}",
                                             report=str(args.out / "report.html"))
    merged.pop("machine", None)
    emit("segmentation", merged)


if __name__ == "__main__":
    main()
