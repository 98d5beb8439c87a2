"""Centralized and local-only CNN baselines: same network, same epoch budget, same task code as
the federated sites."""

from __future__ import annotations

import time

import numpy as np
from torch import nn

from monai_fl.evaluation import evaluate_everywhere
from monai_fl.experiment import Experiment
from monai_fl.keys import POOLED, MetricKey
from monai_fl.tasks.classification import (
    build_loss,
    build_network,
    build_optimizer,
    make_loader,
    train_epochs,
)
from monai_fl.utils import seed_everything


def train_model(exp: Experiment, images: np.ndarray, labels: np.ndarray, desc: str) -> tuple[nn.Module, list[dict]]:
    """Train a fresh network on ``images``/``labels`` for the config's full epoch budget."""
    cfg = exp.cfg
    seed_everything(cfg.train.seed, cfg.train.threads)
    model = build_network(cfg.network, exp.spec)
    loader = make_loader(images, labels, "train", exp.spec, cfg.train.batch_size, cfg.train.augment, cfg.train.seed)
    optimizer = build_optimizer(model, cfg.train)
    history = train_epochs(model, loader, optimizer, build_loss(), cfg.train, 0, cfg.train.epochs, cfg.train.epochs, desc)
    return model, history


def run_centralized(exp: Experiment) -> tuple[dict, nn.Module]:
    """Pool every site's training cases, train once, evaluate everywhere.

    Returns:
        (method result ``{"pooled", "sites", "history", "train_time_s", "n_train"}``, trained model)
    """
    x, y = exp.pooled_train()
    t0 = time.perf_counter()
    model, history = train_model(exp, x, y, "centralized")
    result = evaluate_everywhere(model, exp)
    result.update(history=history, train_time_s=time.perf_counter() - t0, n_train=int(len(y)))
    return result, model


def run_local(exp: Experiment) -> dict:
    """Each site trains alone on its own cases; each model is evaluated everywhere.

    Returns:
        ``{"per_site_model": {site: result}, "pooled": mean over site models of pooled AUC/ACC,
        "sites": {site: that site's own model on its own shard}}``.
    """
    per_site = {}
    for site in exp.sites:
        x, y = exp.site_train(site)
        t0 = time.perf_counter()
        model, history = train_model(exp, x, y, f"local {site}")
        r = evaluate_everywhere(model, exp)
        r.update(history=history, train_time_s=time.perf_counter() - t0, n_train=int(len(y)))
        per_site[site] = r
    return {
        "per_site_model": per_site,
        POOLED: mean_metrics([r[POOLED] for r in per_site.values()]),
        "sites": {site: r["sites"][site] for site, r in per_site.items()},
    }


def mean_metrics(results: list[dict]) -> dict:
    """Mean (and spread) of AUC/ACC over several models' results, NaN-aware."""
    out = {}
    for key in (MetricKey.AUC.value, MetricKey.ACC.value):
        values = np.array([r[key] if r[key] is not None else np.nan for r in results], dtype=float)
        out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        out[f"{key}_std"] = float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")
    out["n_models"] = len(results)
    return out
