"""Task-agnostic training loop: optimiser, cosine schedule, one epoch, several epochs.

Classification and segmentation both train through these, as do the federated sites and the
centralized/local baselines. Loaders yield ``(input, target)`` pairs.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from monai_fl.config import TrainConfig
from monai_fl.keys import MetricKey


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the config's learning rate and weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, epoch: float, total_epochs: float | None = None) -> float:
    """Cosine learning rate for a global epoch index, so federated rounds follow the same schedule
    as the centralized run (round r, local epoch e → epoch r × local_epochs + e; fractional when a
    round is part of an epoch)."""
    total = total_epochs or cfg.epochs
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(epoch, total) / max(total, 1)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _step(model: nn.Module, x, y, optimizer: torch.optim.Optimizer, loss_fn: nn.Module) -> float:
    """One optimiser step on one batch; returns the batch's loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    on_batch: Callable[[float], None] | None = None,
) -> dict:
    """One pass over ``loader``.

    Returns:
        ``{"loss": mean training loss, "steps": optimiser steps, "n": images seen}``.
    """
    model.train()
    total, n, steps = 0.0, 0, 0
    for x, y in loader:
        loss_value = _step(model, x, y, optimizer, loss_fn)
        total += loss_value * len(y)
        n += len(y)
        steps += 1
        if on_batch is not None:
            on_batch(loss_value)
    return {MetricKey.LOSS.value: total / max(n, 1), "steps": steps, MetricKey.N.value: n}


def train_epochs(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    first_epoch: int,
    n_epochs: int,
    total_epochs: int,
    desc: str = "train",
) -> list[dict]:
    """Run ``n_epochs`` epochs on the global cosine schedule starting at ``first_epoch``.

    The centralized and local baselines call it once with all epochs; a federated site calls it
    each round with ``first_epoch = round × local_epochs``, so all follow the same schedule.

    Returns:
        One ``train_epoch`` record per epoch, with ``epoch`` and ``lr`` added.
    """
    from tqdm.auto import tqdm

    history = []
    bar = tqdm(range(first_epoch, first_epoch + n_epochs), desc=desc, unit="epoch", leave=False, disable=None)
    for epoch in bar:
        lr = lr_at(cfg, epoch, total_epochs)
        set_lr(optimizer, lr)
        record = train_epoch(model, loader, optimizer, loss_fn)
        record.update(epoch=epoch, lr=lr)
        history.append(record)
        bar.set_postfix(loss=f"{record[MetricKey.LOSS.value]:.4f}")
    return history


def cycle_batches(loader: Iterable) -> Iterator:
    """Endless batches: pass after pass over ``loader`` (a shuffled loader reshuffles each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("cannot draw training batches from an empty loader")


def train_steps(
    model: nn.Module,
    batches: Iterator,
    n_steps: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    lr: float,
    desc: str = "train",
) -> dict:
    """``n_steps`` optimiser steps at learning rate ``lr``, drawing from a persistent batch iterator.

    A federated round of part of an epoch (``fl.local_epochs`` < 1) trains through it: the site
    keeps one :func:`cycle_batches` iterator across rounds, so consecutive rounds cover the
    shard's images once per epoch instead of re-drawing the head of a fresh shuffle.

    Returns:
        ``{"loss": mean training loss, "steps": n_steps, "n": images seen, "lr": lr}``.
    """
    from tqdm.auto import tqdm

    set_lr(optimizer, lr)
    model.train()
    total, n = 0.0, 0
    bar = tqdm(range(n_steps), desc=desc, unit="step", leave=False, disable=None)
    for _ in bar:
        x, y = next(batches)
        total += _step(model, x, y, optimizer, loss_fn) * len(y)
        n += len(y)
    return {MetricKey.LOSS.value: total / max(n, 1), "steps": n_steps, MetricKey.N.value: n, "lr": lr}
