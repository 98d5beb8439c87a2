"""3-site FedAvg in the NVFlare simulator, plaintext vs HE: peak RSS, round time, aggregation time.

    python benchmarks/he_simulator.py [--data-root DIR] [--rounds 3] [--models small,densenet121]

Real PneumoniaMNIST, 3 sites Dirichlet(0.5), 1 local epoch per round, through the same job builder
and simulator runner as `monai-fl run`. Models: the demo's ResNet-18 width 16 (28 px, 0.70 M
params) and MONAI DenseNet121 (7.0 M params; the 28-px files resized to 32 px, its smallest input).
Round time is the mean over rounds ≥ 1 (round 0 includes the sites' start-up). Writes
benchmarks/results/he_simulator.json and adds `small_3site` / `densenet121_3site` to
benchmarks/results/he_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, emit  # noqa: E402

from monai_fl.config import ExperimentConfig  # noqa: E402
from monai_fl.experiment import model_for_config, prepare  # noqa: E402
from monai_fl.fl.simulate import run_simulation  # noqa: E402
from monai_fl.utils import write_json  # noqa: E402

MODELS = {
    "small": {"network": {"name": "resnet18", "width": 16}},
    "densenet121": {"network": {"name": "densenet121"}, "dataset": {"name": "pneumoniamnist", "input_size": 32}},
}


def measure(key: str, rounds: int, data_root: Path | None, out: Path) -> dict:
    base = {"name": f"bench_{key}", "dataset": {"name": "pneumoniamnist"},
            "partition": {"n_sites": 3, "scheme": "dirichlet:0.5", "seed": 0},
            "train": {"epochs": rounds}, "fl": {"rounds": rounds, "local_epochs": 1}}
    spec = MODELS[key]
    cfg = ExperimentConfig.from_dict({**base, **spec, "dataset": {**base["dataset"], **spec.get("dataset", {})}})
    exp = prepare(cfg, data_root, out / key / "manifest.json")
    entry = {"params": sum(p.numel() for p in model_for_config(cfg).parameters()), "network": cfg.network.name,
             "input_px": cfg.dataset.input_size or cfg.dataset.size, "rounds": rounds, "sites": 3}
    for he in (False, True):
        tag = "he" if he else "plain"
        try:
            r = run_simulation(cfg, exp.manifest_path, data_root, out / key, he=he)
        except Exception as exc:  # a failed run is a result too (e.g. killed for memory)
            entry[tag] = {"completed": False, "error": str(exc)}
            continue
        later = r["round_time_s"][1:] or r["round_time_s"]
        entry[tag] = {"completed": True, "peak_rss_gib": r["peak_rss_gib"], "wall_time_s": r["wall_time_s"],
                      "round_time_s": statistics.mean(later), "round_times_s": r["round_time_s"],
                      "aggregation_time_s": statistics.mean(r["aggregation_time_s"]),
                      "final_site_auc": {s: m.get("auc") for s, m in r["sites"].items()}}
    if entry["plain"].get("completed") and entry["he"].get("completed"):
        entry["he_round_overhead"] = entry["he"]["round_time_s"] / entry["plain"]["round_time_s"] - 1
    entry["completed"] = entry["he"].get("completed", False)
    entry["peak_rss_gib"] = entry["he"].get("peak_rss_gib")
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="small,densenet121")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_he_simulator"))
    args = ap.parse_args()
    results = {f"{k}_3site": measure(k, args.rounds, args.data_root, args.out) for k in args.models.split(",")}
    previous = RESULTS / "he_simulator.json"
    kept = json.loads(previous.read_text()) if previous.is_file() else {}
    kept.pop("machine", None)
    emit("he_simulator", {**kept, **results})  # a run of some models keeps the others' figures
    overhead = RESULTS / "he_overhead.json"
    merged = json.loads(overhead.read_text()) if overhead.is_file() else {}
    merged.update(results)
    write_json(merged, overhead)


if __name__ == "__main__":
    main()
