"""Evaluate one trained model on the pooled official test split and on every site's shard."""

from __future__ import annotations

from torch import nn

from monai_fl.experiment import Experiment
from monai_fl.keys import POOLED
from monai_fl.tasks.classification import evaluate, make_loader


def evaluate_everywhere(model: nn.Module, exp: Experiment) -> dict:
    """``{"pooled": metrics, "sites": {site: metrics}}`` for ``model``."""
    bs = exp.cfg.train.eval_batch_size
    names = exp.spec.label_names
    out = {POOLED: evaluate(model, make_loader(*exp.pooled_test(), "eval", exp.spec, bs), names), "sites": {}}
    for site in exp.sites:
        out["sites"][site] = evaluate(model, make_loader(*exp.site_test(site), "eval", exp.spec, bs), names)
    return out
