"""Site optimiser across rounds: fresh each round, or kept (fl.site_optimizer)."""

from __future__ import annotations

import pytest
import torch

from monai_fl.config import ExperimentConfig
from monai_fl.errors import MonaiFLError
from monai_fl.fl.client import Site


def _site(mode: str) -> Site:
    site = object.__new__(Site)  # the optimiser logic needs no data
    site.cfg = ExperimentConfig.from_dict({"fl": {"site_optimizer": mode}})
    site.model = torch.nn.Linear(4, 2)
    site._optimizer = None
    return site


def _one_step(site: Site) -> torch.optim.Optimizer:
    opt = site.optimizer()
    opt.zero_grad()
    site.model(torch.ones(3, 4)).sum().backward()
    opt.step()
    return opt


def test_kept_optimiser_survives_a_new_global_model():
    site = _site("keep")
    first = _one_step(site)
    weight = site.model.weight
    site.load({k: torch.zeros_like(v) for k, v in site.model.state_dict().items()})
    second = site.optimizer()
    assert second is first
    assert site.model.weight is weight  # the global weights were copied into the tracked tensor
    assert float(site.model.weight.abs().sum()) == 0.0
    assert second.state[weight]["step"] == 1  # Adam's moments carried into the next round


def test_reset_gives_a_fresh_optimiser_each_round():
    site = _site("reset")
    first = _one_step(site)
    second = site.optimizer()
    assert second is not first
    assert not second.state


def test_unknown_mode_is_refused():
    with pytest.raises(MonaiFLError, match="site_optimizer"):
        ExperimentConfig.from_dict({"fl": {"site_optimizer": "sometimes"}})
