"""The classification task: network, transforms, loss, optimiser, train step and evaluation.

Pure functions with no FL knowledge. The NVFlare client, the centralized and local baselines and
inference all call these, so the methods compared in a report cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from monai.data import ArrayDataset, DataLoader
from monai.networks.nets import DenseNet121, ResNet
from monai.transforms import (
    Compose,
    EnsureType,
    NormalizeIntensity,
    RandAffine,
    RandFlip,
    Randomizable,
    Resize,
    ScaleIntensityRange,
)
from torch import nn
from torch.utils.data import TensorDataset

from monai_fl.config import NetworkConfig
from monai_fl.errors import MonaiFLError
from monai_fl.keys import MetricKey
from monai_fl.tasks.metrics import classification_metrics

NETWORKS = ("resnet18", "densenet121", "cnn")
NORMS = ("batch", "group")
GROUPS = 8


@dataclass(frozen=True)
class TaskSpec:
    """What the network must fit: input channels, spatial dims and size, classes."""

    in_channels: int
    num_classes: int
    spatial_dims: int
    image_size: int  # what the network sees
    label_names: tuple[str, ...]
    file_size: int | None = None  # the stored images' size when it differs (resized in the transforms)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels,) + (self.image_size,) * self.spatial_dims


class _ResNet(ResNet):
    """MONAI's ResNet with ``norm`` applied to every block: MONAI 1.6.1 passes it to the stem only
    (``_make_layer`` keeps its ``"batch"`` default), so a GroupNorm ResNet would still hold BatchNorm."""

    def __init__(self, *args, norm: str | tuple = "batch", **kwargs):
        self._block_norm = norm
        super().__init__(*args, norm=norm, **kwargs)

    def _make_layer(self, *args, **kwargs):
        return super()._make_layer(*args, norm=self._block_norm, **kwargs)


def build_network(cfg: NetworkConfig, spec: TaskSpec, check_input: bool = True) -> nn.Module:
    """Build the configured MONAI network for ``spec``.

    Args:
        cfg: network name and width.
        spec: input/output description.
        check_input: run one forward pass on a zero input so an incompatible size (e.g. DenseNet121
            at 28 px) fails here with a clear message, not mid-training.

    Raises:
        MonaiFLError: unknown network or input size the network cannot take.
    """
    name = cfg.name.lower()
    norm = cfg.norm or "batch"
    if norm not in NORMS:
        raise MonaiFLError(f"unknown network norm '{norm}'; choose one of {', '.join(NORMS)}")
    if norm != "batch" and name != "resnet18":
        raise MonaiFLError(f"network norm '{norm}' is available for resnet18 only, not {cfg.name}")
    if norm == "group" and cfg.width % GROUPS:
        raise MonaiFLError(f"network norm 'group' needs a width divisible by {GROUPS}, got {cfg.width}")
    if name == "resnet18":
        small = spec.image_size < 64
        net = _ResNet(
            block="basic",
            layers=[2, 2, 2, 2],
            block_inplanes=[cfg.width * m for m in (1, 2, 4, 8)],
            spatial_dims=spec.spatial_dims,
            n_input_channels=spec.in_channels,
            # The MedMNIST v2 paper's ResNet-18 (28): 3×3 stride-1 stem, no max-pool, so 28 px keeps detail.
            conv1_t_size=3 if small else 7,
            conv1_t_stride=1 if small else 2,
            no_max_pool=small,
            num_classes=spec.num_classes,
            norm=("group", {"num_groups": GROUPS}) if norm == "group" else "batch",
        )
    elif name == "densenet121":
        net = DenseNet121(
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.num_classes,
            dropout_prob=cfg.dropout,
        )
    elif name == "cnn":
        net = _small_cnn(spec, cfg.width)
    else:
        raise MonaiFLError(f"unknown network '{cfg.name}'; choose one of {', '.join(NETWORKS)}")
    if check_input:
        _check_forward(net, spec, name)
    return net


def _small_cnn(spec: TaskSpec, width: int) -> nn.Module:
    conv = nn.Conv2d if spec.spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spec.spatial_dims == 2 else nn.BatchNorm3d
    pool = nn.AdaptiveAvgPool2d(1) if spec.spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
    layers: list[nn.Module] = []
    c_in = spec.in_channels
    for mult in (1, 2, 4):
        c_out = width * mult
        layers += [conv(c_in, c_out, 3, stride=2, padding=1), norm(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers, pool, nn.Flatten(), nn.Linear(c_in, spec.num_classes))


def _check_forward(net: nn.Module, spec: TaskSpec, name: str) -> None:
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros((1,) + spec.input_shape))
    except RuntimeError as exc:
        raise MonaiFLError(
            f"network {name} does not accept {spec.spatial_dims}D inputs of {spec.image_size} px "
            f"({str(exc).splitlines()[0]}); use a larger image size or resnet18/cnn"
        ) from None
    finally:
        net.train(was_training)
    if out.shape != (1, spec.num_classes):
        raise MonaiFLError(f"network {name} gives output shape {tuple(out.shape)}, expected (1, {spec.num_classes})")


def build_transforms(stage: str, spec: TaskSpec, augment: bool = True) -> Compose:
    """Train or eval transforms for channel-first uint8 images (one function for both stages).

    Both stages scale 0–255 to 0–1, normalise with MedMNIST's mean/std 0.5 and, when the network
    input size differs from the stored size, resize (bilinear/trilinear); ``train`` adds mild
    geometric augmentation (rotation ±10°, scale ±10 %, shift ±2 px; flips only for 3D volumes).
    """
    if stage not in ("train", "eval"):
        raise ValueError(f"stage must be 'train' or 'eval', not {stage!r}")
    base = [
        ScaleIntensityRange(a_min=0, a_max=255, b_min=0.0, b_max=1.0),
        NormalizeIntensity(subtrahend=0.5, divisor=0.5),
    ]
    if spec.file_size not in (None, spec.image_size):
        base.append(Resize(spatial_size=(spec.image_size,) * spec.spatial_dims,
                           mode="bilinear" if spec.spatial_dims == 2 else "trilinear"))
    aug: list = []
    if stage == "train" and augment:
        rot = 0.17
        aug = [
            RandAffine(
                prob=0.5,
                rotate_range=(rot,) if spec.spatial_dims == 2 else (rot, rot, rot),
                scale_range=(0.1,) * spec.spatial_dims,
                translate_range=(2,) * spec.spatial_dims,
                padding_mode="zeros",
            )
        ]
        if spec.spatial_dims == 3:
            aug.append(RandFlip(prob=0.5, spatial_axis=2))
    return Compose(base + aug + [EnsureType(dtype=torch.float32, track_meta=False)])


def make_loader(
    images: np.ndarray,
    labels: np.ndarray,
    stage: str,
    spec: TaskSpec,
    batch_size: int,
    augment: bool = True,
    seed: int = 0,
) -> DataLoader:
    """A MONAI DataLoader over in-memory arrays; shuffled and augmented for ``train``.

    As MONAI's ``CacheDataset`` does, the deterministic head of :func:`build_transforms` (intensity
    scaling, normalisation) runs once over the whole array; only the random tail runs per image.
    """
    chain = build_transforms(stage, spec, augment).transforms
    first_random = next((i for i, t in enumerate(chain) if isinstance(t, Randomizable)), len(chain))
    head, tail = Compose(chain[:first_random]), Compose(chain[first_random:])
    # The deterministic head treats every channel alike (elementwise intensity maps with fixed
    # constants, resize), so the stack can pass through it as one channel-first "image".
    flat = images.reshape((-1,) + images.shape[2:])
    cached = torch.as_tensor(np.asarray(head(flat))).float()
    cached = cached.reshape(images.shape[:2] + cached.shape[1:])
    targets = torch.as_tensor(labels, dtype=torch.long)
    if first_random < len(chain):
        ds = ArrayDataset(img=cached, img_transform=tail, labels=targets)
        ds.set_random_state(seed)
    else:
        ds = TensorDataset(cached, targets)
    generator = torch.Generator().manual_seed(seed)
    # num_workers=0: worker processes were reported to segfault in FL examples and gain nothing on 2 cores.
    # A last training batch of one image breaks BatchNorm (one value per channel); drop only that case,
    # so a site smaller than a batch still trains.
    drop_last = stage == "train" and len(ds) % batch_size == 1
    return DataLoader(ds, batch_size=batch_size, shuffle=stage == "train", num_workers=0, generator=generator,
                      drop_last=drop_last)


def build_loss() -> nn.Module:
    """Cross-entropy over class logits (binary tasks use two logits so AUC reads class 1)."""
    return nn.CrossEntropyLoss()


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels, softmax probabilities and mean cross-entropy over ``loader``."""
    model.eval()
    ys, ps, loss_sum, n = [], [], 0.0, 0
    for x, y in loader:
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
        ys.append(y.numpy())
        ps.append(torch.softmax(logits, 1).numpy())
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0)), math.nan
    return np.concatenate(ys), np.concatenate(ps), loss_sum / n


def evaluate(model: nn.Module, loader: Iterable, label_names: Iterable[str]) -> dict:
    """AUC, ACC, loss, per-class figures and confusion matrix of ``model`` on ``loader``."""
    y, p, loss = predict(model, loader)
    metrics = classification_metrics(y, p, list(label_names))
    metrics[MetricKey.LOSS.value] = loss
    return metrics

