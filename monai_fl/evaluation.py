"""Evaluate one trained model on the pooled test set and on every site's shard (any task)."""

from __future__ import annotations

from torch import nn

from monai_fl.keys import POOLED


def evaluate_everywhere(model: nn.Module, exp) -> dict:
    """``{"pooled": metrics, "sites": {site: metrics}}`` for ``model`` on a :class:`TaskExperiment`."""
    out = {POOLED: exp.evaluate(model, exp.test_loader(None)), "sites": {}}
    for site in exp.sites:
        out["sites"][site] = exp.evaluate(model, exp.test_loader(site))
    return out
