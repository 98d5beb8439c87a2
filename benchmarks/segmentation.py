"""Segmentation benchmark on the real MSD Task04 Hippocampus: centralized and local-only Dice/HD95
per class on the held-out test set, and 3D training throughput of the task's train step vs a bare
PyTorch loop.

    nice .venv/bin/python benchmarks/segmentation.py [--data-root DIR] [--epochs N] [--threads 1]

The experiment is ``configs/hippocampus_seg.yaml`` (3D UNet, 3 sites iid, 20 % held out) with the
epoch budget and thread count given here; the centralized and local runs go through the same
``run_centralized``/``run_local`` as every other task. Throughput: the task's ``train_epoch`` and a
bare loop (zero_grad, forward, DiceCE, backward, step) consume the same pre-built batches of real
patches, alternately (ABBA), several times in one process; the median of the paired CPU-time ratios
is the headline (wall-clock figures are kept beside it). The same
``train_epoch`` fed by the live loader (crops and augmentation on the fly) is reported beside it.
Writes ``benchmarks/results/segmentation.json`` and a few contour PNGs under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from monai_fl.baselines.deep import run_centralized, run_local  # noqa: E402
from monai_fl.config import ExperimentConfig  # noqa: E402
from monai_fl.experiment import prepare  # noqa: E402
from monai_fl.keys import POOLED, MetricKey  # noqa: E402
from monai_fl.report.slices import save_case_figures  # noqa: E402
from monai_fl.tasks.loop import build_optimizer, train_epoch  # noqa: E402
from monai_fl.tasks.segmentation_experiment import case_names  # noqa: E402
from monai_fl.utils import seed_everything  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "hippocampus_seg.yaml"
DICE, HD95, MEAN_DICE, MEAN_HD95 = (k.value for k in (MetricKey.DICE, MetricKey.HD95, MetricKey.MEAN_DICE, MetricKey.MEAN_HD95))


def summary(metrics: dict) -> dict:
    """The headline figures of one evaluation (per-class Dice/HD95 and their means)."""
    return {MEAN_DICE: metrics[MEAN_DICE], DICE: metrics[DICE], MEAN_HD95: metrics[MEAN_HD95], HD95: metrics[HD95],
            MetricKey.N.value: metrics[MetricKey.N.value]}


def mean_over_models(results: list[dict]) -> dict:
    """Per-class Dice/HD95 averaged over several models' pooled-test results (mean_metrics keeps only scalars)."""
    out = {}
    for key in (DICE, HD95):
        names = results[0][key]
        out[key] = {n: float(np.nanmean([r[key][n] for r in results])) for n in names}
    for key in (MEAN_DICE, MEAN_HD95):
        values = [r[key] for r in results]
        out[key], out[f"{key}_std"] = float(np.nanmean(values)), float(np.nanstd(values))
    return out


def bare_loop(model, batches, optimizer, loss_fn) -> None:
    model.train()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()


def throughput(exp, n_batches: int, repeats: int) -> dict:
    """Voxels/s of ``train_epoch`` vs a bare loop on identical batches, plus ``train_epoch`` on the live loader.

    Each run is timed twice: wall clock, and this process's CPU time. With one torch thread the two
    agree on an idle machine; on a shared one, other jobs stretch the wall clock of whichever loop
    they happen to overlap, while CPU time still counts only the work each loop did. The headline
    ratio is the median over repeats of the paired (adjacent in time) CPU-time ratios.
    """
    t = exp.cfg.train
    seed_everything(t.seed, t.threads)
    loader = exp.train_loader(None)
    batches = list(itertools.islice(iter(loader), n_batches))
    voxels = sum(int(np.prod(x.shape[2:])) * len(x) for x, _ in batches)
    model, loss_fn = exp.build_model(), exp.loss()
    task_opt, bare_opt = build_optimizer(model, t), build_optimizer(model, t)
    train_epoch(model, batches[:2], task_opt, loss_fn)  # warm-up both paths (allocator, kernels)
    bare_loop(model, batches[:2], bare_opt, loss_fn)

    def live():
        train_epoch(model, itertools.islice(iter(loader), n_batches), task_opt, loss_fn)

    loops = {"task": lambda: train_epoch(model, batches, task_opt, loss_fn),
             "bare": lambda: bare_loop(model, batches, bare_opt, loss_fn),
             "task_live_loader": live}
    rates: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in loops}
    for i in range(repeats):
        # ABBA order, so a drift in machine load favours neither loop.
        order = ("task", "bare") if i % 2 == 0 else ("bare", "task")
        for name in order + ("task_live_loader",):
            w0, c0 = time.perf_counter(), time.process_time()
            loops[name]()
            rates[name]["cpu"].append(voxels / (time.process_time() - c0))
            rates[name]["wall"].append(voxels / (time.perf_counter() - w0))

    def paired(a: str, b: str, clock: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a][clock], rates[b][clock]))

    med = {k: {c: statistics.median(v) for c, v in r.items()} for k, r in rates.items()}
    return {
        "ratio": paired("task", "bare", "cpu"),
        "ratio_wall_clock": paired("task", "bare", "wall"),
        "live_loader_ratio_vs_plain_loop": paired("task_live_loader", "bare", "cpu"),
        "task_voxels_per_cpu_s": med["task"]["cpu"], "plain_voxels_per_cpu_s": med["bare"]["cpu"],
        "task_live_loader_voxels_per_cpu_s": med["task_live_loader"]["cpu"],
        "task_voxels_per_s_wall": med["task"]["wall"], "plain_voxels_per_s_wall": med["bare"]["wall"],
        "task_live_loader_voxels_per_s_wall": med["task_live_loader"]["wall"],
        "runs": rates,
        "batches_per_run": len(batches), "batch_shape": list(batches[0][0].shape), "voxels_per_run": voxels,
        "repeats": repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--data-root", type=Path, help="folder with dataset.json (default: $MONAI_FL_DATA/msd/Task04_Hippocampus)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epoch budget of every model (centralized and each local site); default: the config's")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 on a shared 2-core machine, where a second thread measured slower")
    ap.add_argument("--batches", type=int, default=6, help="batches per throughput run")
    ap.add_argument("--repeats", type=int, default=10, help="throughput runs per loop")
    ap.add_argument("--figures", type=int, default=3, help="test cases drawn with contours")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "benchmark-segmentation")
    args = ap.parse_args()

    t_start = time.perf_counter()
    # MONAI's image-reader registry warns about an optional DICOM codec on every load; NIfTI only here.
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    cfg = ExperimentConfig.load(args.config)
    cfg.train.epochs, cfg.train.threads = args.epochs or cfg.train.epochs, args.threads
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    exp = prepare(cfg, args.data_root, args.out / "manifest.json")

    t0 = time.perf_counter()
    central, model = run_centralized(exp)
    central_s = time.perf_counter() - t0
    figures = save_case_figures(model, exp.test_loader(None), exp.spec, cfg.segmentation, args.out / "figures",
                                n_cases=args.figures, names=case_names(exp, exp.test_indices()))
    t0 = time.perf_counter()
    local = run_local(exp)
    local_s = time.perf_counter() - t0
    per_model = {site: r[POOLED] for site, r in local["per_site_model"].items()}
    tp = throughput(exp, args.batches, args.repeats)

    n_train = len(exp.train_indices())
    s = cfg.segmentation
    emit("segmentation", {
        "dataset": (f"MSD Task04 Hippocampus (real; {len(exp.data.cases)} labelled T1 MRI crops; {n_train} training cases "
                    f"split {exp.manifest['scheme']} over {len(exp.sites)} sites, {len(exp.test_indices())} held out "
                    f"as the pooled test set, seed {exp.manifest['seed']}); dataset.json md5 {exp.data.md5}"),
        "fl_he": {MEAN_DICE: None},  # the federated runs are added by the FL job benchmark
        "fl_plain": {MEAN_DICE: None},
        "centralized": {**summary(central[POOLED]),
                        "sites": {site: m[MEAN_DICE] for site, m in central["sites"].items()},
                        "final_train_loss": central["history"][-1][MetricKey.LOSS.value], "wall_s": central_s},
        "local_mean": {**mean_over_models(list(per_model.values())),
                       "per_site_model": {site: summary(m) for site, m in per_model.items()},
                       "own_shard": {site: m[MEAN_DICE] for site, m in local["sites"].items()}, "wall_s": local_s},
        "throughput_ratio_vs_plain_loop": tp["ratio"],
        "throughput": tp,
        "setup": {
            "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
            "network": (f"MONAI {cfg.network.name} 3D, channels {[cfg.network.width * m for m in (1, 2, 4, 8)]}, "
                        f"strides 2-2-2, 2 residual units, instance norm; {sum(p.numel() for p in model.parameters())} parameters"),
            "loss": "DiceCE (softmax, Dice over foreground)", "optimizer": f"AdamW lr {cfg.train.lr} cosine, wd {cfg.train.weight_decay}",
            "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "roi_size": s.roi_size, "pixdim": s.pixdim,
            "samples_per_volume": s.samples_per_volume, "intensity": s.intensity, "augment": cfg.train.augment,
            "inference": f"sliding window {s.roi_size}, overlap {s.sw_overlap}, gaussian",
            "metrics": "MONAI DiceMetric / HausdorffDistanceMetric(percentile=95) in mm, per class, mean over test cases",
            "n_train": n_train, "n_test": len(exp.test_indices()), "sites": {k: e["n_train"] for k, e in exp.manifest["sites"].items()},
            "threads": args.threads,
        },
        "figures": [str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in figures],
        "command": "nice .venv/bin/python benchmarks/segmentation.py " + " ".join(sys.argv[1:]),
        "wall_time_s": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
