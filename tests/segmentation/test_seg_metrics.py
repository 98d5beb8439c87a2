"""Dice and HD95 against hand computations on fixed masks, and the aggregation in ``evaluate``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from monai_fl.config import SegmentationConfig
from monai_fl.keys import MetricKey
from monai_fl.tasks.segmentation import SegSpec, dice_hd95, evaluate


def _maps(*arrays) -> list[torch.Tensor]:
    """Label maps (X, Y, Z) → batched ``(1, 1, X, Y, Z)`` tensors."""
    return [torch.as_tensor(np.asarray(a))[None, None] for a in arrays]


def _fixed_masks() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((6, 6, 4), np.int64)
    pred = np.zeros_like(ref)
    ref[0:3, 0:4, 0:2] = 1   # 24 voxels of class 1
    pred[1:3, 0:4, 0:2] = 1  # 16 voxels, all inside the reference
    pred[3, 0:2, 0:2] = 1    # 4 false-positive voxels
    ref[4:6, 4:6, 2:4] = 2   # 8 voxels of class 2
    pred[5, 4:6, 2:4] = 2    # 4 voxels inside
    return ref, pred


def test_dice_equals_hand_computation_per_class():
    ref, pred = _fixed_masks()
    dice, _ = dice_hd95(*_maps(pred, ref), num_classes=3)
    # Class 1: |A|=20 predicted, |B|=24 reference, overlap 16 → 2·16/44. Class 2: 2·4/(4+8).
    assert dice.shape == (1, 2)
    assert dice[0, 0] == pytest.approx(2 * 16 / (20 + 24))
    assert dice[0, 1] == pytest.approx(2 * 4 / (4 + 8))
    # Hand computation straight from the definition, class by class.
    for c in (1, 2):
        a, b = pred == c, ref == c
        assert dice[0, c - 1] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_dice_is_nan_for_a_class_absent_from_the_reference():
    ref, pred = _fixed_masks()
    ref[ref == 2] = 0
    dice, hd = dice_hd95(*_maps(pred, ref), num_classes=3)
    assert math.isnan(dice[0, 1])
    assert dice[0, 0] == pytest.approx(32 / 44)


@pytest.mark.parametrize("spacing, expected", [
    (None, 3.0),             # voxels
    ((2.0, 1.0, 1.0), 6.0),  # the shift runs along x, 2 mm per voxel
    ((1.0, 0.5, 0.5), 3.0),  # y/z spacing does not enter
])
def test_hd95_of_two_points_is_their_distance(spacing, expected):
    # One voxel each: every surface distance is the same, so HD95 = HD = the shift.
    ref = np.zeros((8, 8, 8), np.int64)
    pred = np.zeros_like(ref)
    ref[2, 4, 4] = 1
    pred[5, 4, 4] = 1
    _, hd = dice_hd95(*_maps(pred, ref), num_classes=2, spacing=spacing)
    assert hd[0, 0] == pytest.approx(expected)


def test_hd95_zero_for_identical_masks_diagonal_for_a_miss_nan_when_both_empty():
    ref, _ = _fixed_masks()
    pred = ref.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    _, hd = dice_hd95(*_maps(ref, ref), num_classes=3)
    assert hd[0].tolist() == [0.0, 0.0]
    _, hd = dice_hd95(*_maps(pred, ref), num_classes=3, spacing=(1.0, 2.0, 1.0))
    assert hd[0, 0] == 0.0
    assert hd[0, 1] == pytest.approx(np.linalg.norm([6 * 1.0, 6 * 2.0, 4 * 1.0]))
    _, hd = dice_hd95(*_maps(pred, pred), num_classes=3)
    assert math.isnan(hd[0, 1])


class Oracle(nn.Module):
    """Logits that reproduce the label map fed in as the image (so metrics are known exactly)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = x[:, 0].round().long()
        return 10.0 * nn.functional.one_hot(labels, self.num_classes).movedim(-1, 1).float()


def test_evaluate_reports_per_class_and_mean_under_metric_keys():
    ref, pred = _fixed_masks()
    spec = SegSpec(1, 3, 3, (8, 8, 8), (1.0, 1.0, 1.0), ("anterior", "posterior"))
    cfg = SegmentationConfig(roi_size=[8, 8, 8])
    # Case 1 predicted perfectly; case 2 is the fixed pair above.
    loader = [(torch.as_tensor(ref)[None, None].float(), torch.as_tensor(ref)[None, None].float()),
              (torch.as_tensor(pred)[None, None].float(), torch.as_tensor(ref)[None, None].float())]
    m = evaluate(Oracle(3), loader, spec, cfg)
    d1, d2 = (1 + 32 / 44) / 2, (1 + 2 / 3) / 2
    assert m[MetricKey.DICE.value]["anterior"] == pytest.approx(d1)
    assert m[MetricKey.DICE.value]["posterior"] == pytest.approx(d2)
    assert m[MetricKey.MEAN_DICE.value] == pytest.approx((d1 + d2) / 2)
    assert set(m[MetricKey.HD95.value]) == {"anterior", "posterior"}
    assert m[MetricKey.MEAN_HD95.value] > 0
    assert m[MetricKey.N.value] == 2
    assert np.isfinite(m[MetricKey.LOSS.value])
