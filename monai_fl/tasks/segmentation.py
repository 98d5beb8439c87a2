"""The segmentation task: networks, transforms, loss, loaders, sliding-window inference and metrics.

Pure functions with no FL knowledge. The federated site, the centralized and local baselines and
inference all call these, so preprocessing and metrics cannot drift between methods. Volumes are
3D NIfTI files; ``spatial_dims`` 2 trains on axial slices and infers slice by slice, 3 on patches.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.inferers import SliceInferer, sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks import one_hot
from monai.networks.nets import SegResNet, UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)
from torch import nn

from monai_fl.config import NetworkConfig, SegmentationConfig
from monai_fl.errors import MonaiFLError
from monai_fl.keys import MetricKey

NETWORKS = ("unet", "segresnet")
STAGES = ("train", "eval", "infer")
IMAGE, LABEL = "image", "label"
UNET_STRIDES = (2, 2, 2)
SEGRESNET_BLOCKS_DOWN = (1, 2, 2, 4)
SEGRESNET_GROUPS = 8
AXCODES = "RAS"
# nibabel's axis convention, stated so MONAI does not fall back to guessing from metadata.
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
HD_PERCENTILE = 95


@dataclass(frozen=True)
class SegSpec:
    """What the network must fit: channels, classes (background included), dims, patch and spacing."""

    in_channels: int
    num_classes: int
    spatial_dims: int
    roi_size: tuple[int, ...]  # spatial_dims entries: training patch and sliding-window size
    pixdim: tuple[float, ...]  # 3 entries: the grid volumes are resampled to (mm)
    class_names: tuple[str, ...]  # foreground classes 1..K-1, the ones metrics report

    @classmethod
    def from_config(cls, cfg: SegmentationConfig, in_channels: int, label_names: Sequence[str]) -> "SegSpec":
        """Check ``cfg`` against the dataset's channels and classes (``label_names[0]`` is background).

        Raises:
            MonaiFLError: a setting that cannot work, naming the field.
        """
        if cfg.spatial_dims not in (2, 3):
            raise MonaiFLError(f"segmentation.spatial_dims must be 2 or 3, got {cfg.spatial_dims}")
        roi = [int(v) for v in cfg.roi_size]
        if len(roi) not in (cfg.spatial_dims, 3) or min(roi, default=0) < 1:
            raise MonaiFLError(f"segmentation.roi_size needs {cfg.spatial_dims} positive sizes, got {cfg.roi_size}")
        pixdim = [float(v) for v in cfg.pixdim]
        if len(pixdim) != 3 or min(pixdim) <= 0:
            raise MonaiFLError(f"segmentation.pixdim needs 3 positive spacings in mm, got {cfg.pixdim}")
        if cfg.intensity not in ("zscore", "range"):
            raise MonaiFLError(f"segmentation.intensity must be zscore or range, got {cfg.intensity!r}")
        if cfg.intensity == "range" and len(cfg.intensity_range) != 2:
            raise MonaiFLError("segmentation.intensity 'range' needs intensity_range: [a_min, a_max]")
        names = tuple(cfg.class_names) if cfg.class_names else tuple(label_names[1:])
        if len(names) != len(label_names) - 1:
            raise MonaiFLError(f"segmentation.class_names lists {len(names)} names, the dataset has "
                               f"{len(label_names) - 1} foreground classes ({', '.join(label_names[1:])})")
        return cls(in_channels, len(label_names), cfg.spatial_dims, tuple(roi[:cfg.spatial_dims]), tuple(pixdim), names)

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The 3D crop taken from a volume for training: the ROI, one slice thick in 2D."""
        return self.roi_size if self.spatial_dims == 3 else self.roi_size + (1,)


def build_seg_network(cfg: NetworkConfig, spec: SegSpec, check_input: bool = True) -> nn.Module:
    """Build a MONAI UNet or SegResNet for ``spec``.

    ``unet``: channels ``width × (1, 2, 4, 8)``, strides 2 ×3, two residual units per level,
    instance norm (per-case statistics, so nothing site-specific sits in the weights like
    batch-norm running stats would). ``segresnet``: ``init_filters = width``, blocks (1, 2, 2, 4),
    group norm with 8 groups.

    Args:
        cfg: network name, width and dropout.
        spec: channels, classes, dims and ROI.
        check_input: run one forward pass on a zero ROI so a bad width or ROI fails here, not mid-training.

    Raises:
        MonaiFLError: unknown network, or ROI/width the network cannot take.
    """
    name = cfg.name.lower()
    if cfg.norm is not None:
        raise MonaiFLError(f"network.norm is a classification option; {cfg.name} sets its own "
                           "(unet: instance norm, segresnet: group norm), so leave it out")
    if name == "unet":
        factor = int(np.prod(UNET_STRIDES))
        net = UNet(
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.num_classes,
            channels=tuple(cfg.width * m for m in (1, 2, 4, 8)),
            strides=UNET_STRIDES,
            num_res_units=2,
            norm="instance",
            dropout=cfg.dropout,
        )
    elif name == "segresnet":
        factor = 2 ** (len(SEGRESNET_BLOCKS_DOWN) - 1)
        if cfg.width % SEGRESNET_GROUPS:
            raise MonaiFLError(f"segresnet needs network.width divisible by {SEGRESNET_GROUPS} (group norm), got {cfg.width}")
        net = SegResNet(
            spatial_dims=spec.spatial_dims,
            init_filters=cfg.width,
            in_channels=spec.in_channels,
            out_channels=spec.num_classes,
            dropout_prob=cfg.dropout or None,
            blocks_down=SEGRESNET_BLOCKS_DOWN,
            blocks_up=(1,) * (len(SEGRESNET_BLOCKS_DOWN) - 1),
            num_groups=SEGRESNET_GROUPS,
        )
    else:
        raise MonaiFLError(f"unknown segmentation network '{cfg.name}'; choose one of {', '.join(NETWORKS)}")
    if any(s % factor for s in spec.roi_size):
        raise MonaiFLError(f"segmentation.roi_size {list(spec.roi_size)} must be a multiple of {factor} in every "
                           f"dimension for {name} (it halves the resolution {int(math.log2(factor))} times)")
    if check_input:
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                out = net(torch.zeros((1, spec.in_channels) + spec.roi_size))
        except (RuntimeError, ValueError) as exc:
            raise MonaiFLError(f"segmentation.roi_size {list(spec.roi_size)} is too small for {name} "
                               f"({str(exc).splitlines()[0]}); use at least {2 * factor} per dimension") from None
        finally:
            net.train(was_training)
        if tuple(out.shape) != (1, spec.num_classes) + spec.roi_size:
            raise MonaiFLError(f"{name} gives output shape {tuple(out.shape)} for ROI {spec.roi_size}")
    return net


def build_seg_transforms(stage: str, spec: SegSpec, cfg: SegmentationConfig, augment: bool = True) -> Compose:
    """Dictionary transforms for ``train``, ``eval`` or ``infer`` — one function for all three.

    Every stage loads the NIfTI files, makes them channel first, reorients to RAS, resamples to
    ``spec.pixdim`` (images bilinear, labels nearest) and normalises the intensity
    (``zscore``: per volume over nonzero voxels, per channel; ``range``: clip ``intensity_range``
    to 0..1). Then:

    - ``train``: pad to the patch, crop ``samples_per_volume`` patches centred on foreground or
      background with equal odds (2D: one slice thick, then squeezed), and with ``augment`` a
      left-right flip and mild intensity scale/shift. Yields fixed-size patches.
    - ``eval``: whole volumes with labels, for sliding-window inference.
    - ``infer``: whole image only, keeping its metadata so predictions can be inverted back to the
      original grid (:func:`infer_file`).

    ``CacheDataset`` caches everything before the first random transform, so loading, resampling
    and normalisation run once per volume.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    keys = (IMAGE,) if stage == "infer" else (IMAGE, LABEL)
    modes = ("bilinear", "nearest")[: len(keys)]
    chain: list = [
        LoadImaged(keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes=AXCODES, labels=AXIS_LABELS),
        Spacingd(keys, pixdim=spec.pixdim, mode=modes),
        _intensity(cfg),
        # Metadata is needed only to invert inference; plain tensors make the per-sample random
        # crops and flips about twice as fast as on MetaTensors.
        EnsureTyped(keys, dtype=torch.float32, track_meta=stage == "infer"),
    ]
    if stage == "train":
        chain += [
            SpatialPadd(keys, spatial_size=spec.patch_size),
            RandCropByPosNegLabeld(keys, label_key=LABEL, spatial_size=spec.patch_size, pos=1, neg=1,
                                   num_samples=cfg.samples_per_volume),
        ]
        if spec.spatial_dims == 2:
            chain.append(SqueezeDimd(keys, dim=-1))
        if augment:
            # Flip across the left-right axis only: MSD labels are not lateralised, and
            # anterior/posterior or superior/inferior flips would swap anatomy the labels name.
            chain += [
                RandFlipd(keys, prob=0.5, spatial_axis=0),
                RandScaleIntensityd(IMAGE, factors=0.1, prob=0.5),
                RandShiftIntensityd(IMAGE, offsets=0.1, prob=0.5),
            ]
    return Compose(chain)


def _intensity(cfg: SegmentationConfig):
    if cfg.intensity == "range":
        a_min, a_max = (float(v) for v in cfg.intensity_range)
        return ScaleIntensityRanged(IMAGE, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
    return NormalizeIntensityd(IMAGE, nonzero=True, channel_wise=True)


def pair_collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate dict samples (lists of them when several patches come from one volume) to
    ``(image, label)`` so :func:`monai_fl.tasks.loop.train_epoch` sees the same pairs as classification."""
    data = list_data_collate(batch)
    return data[IMAGE], data[LABEL]


def make_seg_dataset(cases: list[dict], stage: str, spec: SegSpec, cfg: SegmentationConfig,
                     augment: bool = True) -> CacheDataset:
    """A ``CacheDataset`` of ``cases`` (``[{"image": path, "label": path}]``) with the stage's transforms."""
    transform = build_seg_transforms(stage, spec, cfg, augment)
    # num_workers=0: caching threads gain little for these small files on two cores.
    return CacheDataset(cases, transform, cache_rate=cfg.cache_rate, num_workers=0, progress=False)


def make_seg_loader(dataset: CacheDataset, stage: str, batch_size: int, seed: int = 0) -> DataLoader:
    """Batches of ``(image, label)``: shuffled patches for ``train``; single whole volumes for ``eval``.

    Each call restarts the dataset's seeded random stream, so two runs with the same seed replay
    the same crops and augmentations; build the loader once per run and iterate it every epoch.
    """
    if stage == "train":
        dataset.transform.set_random_state(seed)
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, generator=generator,
                          collate_fn=pair_collate)
    # Volumes differ in shape, so evaluation batches hold one volume each.
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0, collate_fn=pair_collate)


def build_seg_loss() -> nn.Module:
    """Dice + cross-entropy on softmax outputs against integer label maps (Dice over foreground classes)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)


def predict_logits(model: nn.Module, image: torch.Tensor, spec: SegSpec, cfg: SegmentationConfig) -> torch.Tensor:
    """Sliding-window logits for whole volumes ``(B, C, H, W, D)`` (2D networks: slice by slice along D)."""
    if spec.spatial_dims == 2:
        inferer = SliceInferer(roi_size=spec.roi_size, sw_batch_size=cfg.sw_batch_size, spatial_dim=2,
                               overlap=cfg.sw_overlap, progress=False)
        return inferer(image, model)
    return sliding_window_inference(image, spec.roi_size, cfg.sw_batch_size, model, overlap=cfg.sw_overlap,
                                    mode="gaussian")


@torch.no_grad()
def segment(model: nn.Module, image: torch.Tensor, spec: SegSpec, cfg: SegmentationConfig) -> torch.Tensor:
    """Label map ``(B, 1, H, W, D)`` of ``image`` (argmax of the sliding-window logits)."""
    model.eval()
    return predict_logits(model, image, spec, cfg).argmax(1, keepdim=True)


def dice_hd95(pred: torch.Tensor, ref: torch.Tensor, num_classes: int,
              spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-case, per-foreground-class Dice and 95 % Hausdorff distance (MONAI metrics).

    Args:
        pred: predicted label maps ``(B, 1, *spatial)``.
        ref: reference label maps, same shape.
        num_classes: classes including the background (channel 0, which is not reported).
        spacing: voxel size in mm, so HD95 is in mm (default: voxels).

    Returns:
        ``(dice, hd95)``, each ``(B, num_classes - 1)``. Dice is NaN where the reference lacks the
        class. HD95 is NaN where both lack it and, where exactly one lacks it (no surface to measure
        from), the volume's diagonal: the largest distance possible on that grid, so a missed
        structure counts as the worst case rather than vanishing from the mean.
    """
    p, r = one_hot(pred.long(), num_classes), one_hot(ref.long(), num_classes)
    with warnings.catch_warnings():
        # MONAI warns on every empty class; emptiness is handled below.
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, r)
        hd = HausdorffDistanceMetric(include_background=False, percentile=HD_PERCENTILE, reduction="none")(
            p, r, spacing=list(spacing) if spacing is not None else None)
    dice, hd = dice.cpu().numpy().astype(float), hd.cpu().numpy().astype(float)
    has_p = p[:, 1:].flatten(2).any(-1).cpu().numpy()
    has_r = r[:, 1:].flatten(2).any(-1).cpu().numpy()
    step = np.asarray(spacing if spacing is not None else [1.0] * (pred.ndim - 2), float)
    diagonal = float(np.linalg.norm(np.asarray(pred.shape[2:]) * step[: pred.ndim - 2]))
    hd[has_p != has_r] = diagonal
    hd[~has_p & ~has_r] = np.nan
    return dice, hd


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, spec: SegSpec, cfg: SegmentationConfig) -> dict:
    """Dice and HD95 per foreground class, their means, and the DiceCE loss over ``loader``'s volumes.

    Per-class figures are means over cases (NaN cases skipped); ``mean_dice``/``mean_hd95`` are
    the means of the per-class figures. Only aggregates are returned, never per-case values.

    Returns:
        ``{"dice": {class: v}, "hd95": {class: mm}, "mean_dice", "mean_hd95", "loss", "n"}``.
    """
    model.eval()
    loss_fn = build_seg_loss()
    dices, hds, loss_sum, n = [], [], 0.0, 0
    for image, label in loader:
        logits = predict_logits(model, image, spec, cfg)
        loss_sum += float(loss_fn(logits, label)) * len(label)
        n += len(label)
        dice, hd = dice_hd95(logits.argmax(1, keepdim=True), label, spec.num_classes, spec.pixdim[: label.ndim - 2])
        dices.append(dice)
        hds.append(hd)
    k = spec.num_classes - 1
    dice_all = np.concatenate(dices) if dices else np.full((0, k), np.nan)
    hd_all = np.concatenate(hds) if hds else np.full((0, k), np.nan)
    per_dice, per_hd = _nanmean0(dice_all), _nanmean0(hd_all)
    return {
        MetricKey.DICE.value: dict(zip(spec.class_names, per_dice)),
        MetricKey.HD95.value: dict(zip(spec.class_names, per_hd)),
        MetricKey.MEAN_DICE.value: _nanmean(per_dice),
        MetricKey.MEAN_HD95.value: _nanmean(per_hd),
        MetricKey.LOSS.value: loss_sum / n if n else math.nan,
        MetricKey.N.value: n,
    }


def _nanmean0(a: np.ndarray) -> list[float]:
    return [_nanmean(a[:, j]) for j in range(a.shape[1])]


def _nanmean(values) -> float:
    v = np.asarray(values, float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


def infer_file(model: nn.Module, image_path: str, spec: SegSpec, cfg: SegmentationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Segment one NIfTI image with the ``infer`` transforms and map the labels back to its grid.

    Returns:
        ``(labels, affine)``: an integer label map on the input file's voxel grid and that grid's affine.
    """
    from monai.transforms import Invertd

    transform = build_seg_transforms("infer", spec, cfg)
    data = transform({IMAGE: image_path})
    data["pred"] = segment(model, data[IMAGE][None], spec, cfg)[0].float()
    # Copy the image's metadata and transform trace to the prediction, then undo spacing/orientation.
    inverted = Invertd("pred", transform=transform, orig_keys=IMAGE, nearest_interp=True)(data)
    pred = inverted["pred"]
    return np.asarray(pred[0].numpy().round(), dtype=np.uint8), np.asarray(pred.affine)
