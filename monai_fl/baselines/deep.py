"""Centralized and local-only baselines for any task: same network and task code as the federated
sites, trained for the config's ``train.epochs``."""

from __future__ import annotations

import time

import numpy as np
from torch import nn

from monai_fl.evaluation import evaluate_everywhere
from monai_fl.experiment import TaskExperiment
from monai_fl.keys import POOLED
from monai_fl.tasks.loop import build_optimizer, train_epochs
from monai_fl.utils import seed_everything


def train_model(exp: TaskExperiment, site: str | None, desc: str) -> tuple[nn.Module, list[dict]]:
    """Train a fresh network on ``site``'s cases (None: all sites pooled) for the full epoch budget."""
    t = exp.cfg.train
    seed_everything(t.seed, t.threads)
    model = exp.build_model()
    history = train_epochs(model, exp.train_loader(site), build_optimizer(model, t), exp.loss(), t, 0, t.epochs, t.epochs, desc)
    return model, history


def run_centralized(exp: TaskExperiment) -> tuple[dict, nn.Module]:
    """Pool every site's training cases, train once, evaluate everywhere.

    Returns:
        (method result ``{"pooled", "sites", "history", "train_time_s"}``, trained model)
    """
    t0 = time.perf_counter()
    model, history = train_model(exp, None, "centralized")
    result = evaluate_everywhere(model, exp)
    result.update(history=history, train_time_s=time.perf_counter() - t0)
    return result, model


def run_local(exp: TaskExperiment) -> dict:
    """Each site trains alone on its own cases; each model is evaluated everywhere.

    Returns:
        ``{"per_site_model": {site: result}, "pooled": mean over site models of pooled AUC/ACC,
        "sites": {site: that site's own model on its own shard}}``.
    """
    per_site = {}
    for site in exp.sites:
        t0 = time.perf_counter()
        model, history = train_model(exp, site, f"local {site}")
        r = evaluate_everywhere(model, exp)
        r.update(history=history, train_time_s=time.perf_counter() - t0)
        per_site[site] = r
    return {
        "per_site_model": per_site,
        POOLED: mean_metrics([r[POOLED] for r in per_site.values()]),
        "sites": {site: r["sites"][site] for site, r in per_site.items()},
    }


def _nan_mean_std(values: list) -> tuple[float, float]:
    arr = np.array([v if v is not None else np.nan for v in values], dtype=float)
    if not np.isfinite(arr).any():
        return float("nan"), float("nan")
    return float(np.nanmean(arr)), float(np.nanstd(arr))


def mean_metrics(results: list[dict]) -> dict:
    """Mean (and spread) over several models' results, NaN-aware: every scalar metric (AUC/ACC,
    mean Dice/HD95, loss) and every per-class scalar dict (Dice/HD95 per class)."""
    out = {}
    first = results[0]
    for key, value in first.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "n":
            out[key], out[f"{key}_std"] = _nan_mean_std([r.get(key) for r in results])
        elif isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            out[key] = {c: _nan_mean_std([r.get(key, {}).get(c) for r in results])[0] for c in value}
    out["n_models"] = len(results)
    return out
