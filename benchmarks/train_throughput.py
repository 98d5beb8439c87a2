"""Training throughput of the task's train step vs a bare PyTorch loop (same network, batches, optimiser).

    python benchmarks/train_throughput.py [--data-root DIR] [--repeats 5]

Both loops consume the same pre-built batches of real PneumoniaMNIST images (augmented by the
task's loader once), so the ratio isolates the train step. The two run alternately, several
times, in one process; the ratio is the median of the per-pair ratios (each task run against the
bare run beside it), so a drift in machine load cancels. Timed in process CPU time with one intra-op
thread by default: with two, OpenMP spin-waiting enters the CPU time and the spread doubles.
Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from monai_fl.config import ExperimentConfig  # noqa: E402
from monai_fl.experiment import prepare  # noqa: E402
from monai_fl.tasks.loop import build_optimizer, train_epoch  # noqa: E402


def bare_loop(model, batches, optimizer) -> None:
    model.train()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--width", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ExperimentConfig.from_dict({"dataset": {"name": "pneumoniamnist"}, "network": {"width": args.width}})
    exp = prepare(cfg, args.data_root)
    loader = exp.train_loader("site-1")
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == args.batches:
            break
    n_images = sum(len(y) for _, y in batches)
    model = exp.build_model()
    task_opt, bare_opt = build_optimizer(model, cfg.train), build_optimizer(model, cfg.train)
    loss_fn = exp.loss()
    train_epoch(model, batches[:2], task_opt, loss_fn)  # warm-up both paths
    bare_loop(model, batches[:2], bare_opt)
    runs = {"task": (lambda: train_epoch(model, batches, task_opt, loss_fn), []),
            "bare": (lambda: bare_loop(model, batches, bare_opt), [])}
    for i in range(args.repeats):
        # ABBA order, so a drift in machine load does not favour either loop.
        for name in ("task", "bare") if i % 2 == 0 else ("bare", "task"):
            fn, rates = runs[name]
            # CPU time of this process: other jobs on a shared machine do not enter the ratio.
            t = time.process_time()
            fn()
            rates.append(n_images / (time.process_time() - t))
    task_rates, bare_rates = runs["task"][1], runs["bare"][1]
    task, bare = statistics.median(task_rates), statistics.median(bare_rates)
    pair_ratios = [t / b for t, b in zip(task_rates, bare_rates)]
    emit("train_throughput", {
        "ratio_vs_plain_loop": statistics.median(pair_ratios), "pair_ratios": pair_ratios,
        "task_images_per_s": task, "plain_images_per_s": bare,
        "clock": "process CPU time", "task_runs": task_rates, "plain_runs": bare_rates, "batch_size": cfg.train.batch_size,
        "batches_per_run": len(batches), "network": f"resnet18 width {args.width}", "input": "1x28x28 PneumoniaMNIST",
    })


if __name__ == "__main__":
    main()
