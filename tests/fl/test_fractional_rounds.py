"""Rounds of part of an epoch (fl.local_epochs < 1): steps, coverage, schedule, config checks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from monai_fl.config import ExperimentConfig
from monai_fl.errors import MonaiFLError
from monai_fl.fl.client import Site
from monai_fl.tasks.loop import lr_at


class _RecordingLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[int] = []
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, logits, y):
        self.seen.extend(int(v) for v in y)
        return self.ce(logits, y)


def _site(local_epochs: float, rounds: int, n: int = 10, batch: int = 2) -> Site:
    site = object.__new__(Site)  # the training logic needs no manifest
    site.cfg = ExperimentConfig.from_dict({"train": {"epochs": 2, "lr": 1e-2},
                                           "fl": {"rounds": rounds, "local_epochs": local_epochs}})
    site.site = "site-1"
    site.model = torch.nn.Linear(1, n)
    labels = torch.arange(n)  # label = image index, so the loss sees which images were drawn
    site.train_loader = DataLoader(TensorDataset(labels.float()[:, None], labels), batch_size=batch, shuffle=True,
                                   generator=torch.Generator().manual_seed(0))
    site.loss = _RecordingLoss()
    site._optimizer = None
    site._batches = None
    return site


def test_half_epoch_rounds_cover_each_image_once_per_two_rounds():
    site = _site(0.5, rounds=4)  # 5 batches per epoch → 3 steps per round (rounded up)
    steps = [site.train(r)[1]["steps"] for r in range(4)]
    assert steps == [3, 3, 3, 3]
    seen = site.loss.seen
    assert len(seen) == 4 * 3 * 2
    assert sorted(seen[:10]) == list(range(10))  # rounds 0-1 together: the first pass, no image twice
    assert sorted(seen[10:20]) == list(range(10))  # the stream went on into the next reshuffled pass
    assert seen[:10] != seen[10:20]


def test_half_epoch_round_follows_the_global_cosine_schedule():
    site = _site(0.5, rounds=4)
    for r in range(3):
        site.train(r)
        expected = lr_at(site.cfg.train, r * 0.5, 2.0)
        assert site._optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert expected == pytest.approx(site.cfg.train.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.5)).item()))


def test_whole_epoch_rounds_train_whole_epochs():
    site = _site(2, rounds=1)
    _, info = site.train(0)
    assert info["steps"] == 10 and info["n_train"] == 10
    assert sorted(site.loss.seen[:10]) == list(range(10))


@pytest.mark.parametrize("value", [0, -0.5])
def test_local_epochs_must_be_positive(value):
    with pytest.raises(MonaiFLError, match="local_epochs must be positive"):
        ExperimentConfig.from_dict({"fl": {"local_epochs": value}})


def test_a_fraction_in_a_whole_number_field_is_refused_not_truncated():
    with pytest.raises(MonaiFLError, match=r"train\.epochs: expected a whole number, got 2\.5"):
        ExperimentConfig.from_dict({"train": {"epochs": 2.5}})
    assert ExperimentConfig.from_dict({"fl": {"local_epochs": 0.5}}).fl.local_epochs == 0.5
