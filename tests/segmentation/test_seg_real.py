"""Real MSD Task04 Hippocampus (skipped when absent): the datalist validates, the manifest holds
out 20 %, and a short training run on a handful of cases lowers the loss."""

from __future__ import annotations

import time

import numpy as np
import pytest

from monai_fl.config import NetworkConfig, SegmentationConfig, TrainConfig
from monai_fl.data.msd import build_msd_manifest, load_msd
from monai_fl.keys import MetricKey
from monai_fl.tasks import segmentation as seg
from monai_fl.tasks.loop import build_optimizer, lr_at, set_lr, train_epoch
from monai_fl.utils import seed_everything

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")]


def test_real_datalist_validates_quickly_and_splits(hippocampus_dir, data_root):
    t0 = time.perf_counter()
    data = load_msd("msd_hippocampus", data_root)
    assert time.perf_counter() - t0 < 10  # 260 headers + label maps
    assert data.path == hippocampus_dir / "dataset.json"
    assert len(data.cases) == 260 and data.labels == ("background", "Anterior", "Posterior")
    m = build_msd_manifest(data, 3, "iid", 0, 0.2)
    assert m["n_test"] == 52 and sum(e["n_train"] for e in m["sites"].values()) == 208


def test_short_training_on_a_few_cases_lowers_the_loss(data_root):
    data = load_msd("msd_hippocampus", data_root, validate=False)
    cfg = SegmentationConfig()
    spec = seg.SegSpec.from_config(cfg, data.n_channels, data.labels)
    train_cfg = TrainConfig(epochs=6, lr=0.01)
    seed_everything(0)
    model = seg.build_seg_network(NetworkConfig(name="unet", width=8), spec)
    loader = seg.make_seg_loader(seg.make_seg_dataset(data.datalist(range(8)), "train", spec, cfg), "train", 4, seed=0)
    optimizer, loss_fn = build_optimizer(model, train_cfg), seg.build_seg_loss()
    losses = []
    for epoch in range(train_cfg.epochs):
        set_lr(optimizer, lr_at(train_cfg, epoch))
        losses.append(train_epoch(model, loader, optimizer, loss_fn)[MetricKey.LOSS.value])
    assert losses[-1] < 0.8 * losses[0], losses
    test = seg.make_seg_loader(seg.make_seg_dataset(data.datalist(range(250, 253)), "eval", spec, cfg), "eval", 1)
    metrics = seg.evaluate(model, test, spec, cfg)
    assert set(metrics[MetricKey.DICE.value]) == {"Anterior", "Posterior"}
    assert metrics[MetricKey.N.value] == 3 and np.isfinite(metrics[MetricKey.LOSS.value])
