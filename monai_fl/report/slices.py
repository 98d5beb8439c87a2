"""PNG figures of a few slices with predicted and reference contours, for a radiologist to look at.

Everything else in a report is aggregate metrics; these figures show what a Dice of 0.85 looks
like. They are drawn at the site that holds the volumes. Matplotlib's object API with the Agg
canvas is used (no pyplot), so nothing touches global figure state and no display is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import nn

from monai_fl.config import SegmentationConfig
from monai_fl.tasks.segmentation import SegSpec, dice_hd95, segment

# One colour per foreground class (tab10 order, skipping grey); reference solid, prediction dashed.
CLASS_COLOURS = ("tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:pink", "tab:olive", "tab:blue")
AXIS_NAMES = ("sagittal", "coronal", "axial")
DPI = 110


def pick_slices(reference: np.ndarray, n_slices: int, axis: int = 2) -> list[int]:
    """``n_slices`` slice indices along ``axis`` spread over the reference foreground's extent
    (evenly over the volume when the reference is empty)."""
    other = tuple(a for a in range(reference.ndim) if a != axis)
    present = np.flatnonzero((reference > 0).any(axis=other))
    lo, hi = (present[0], present[-1]) if present.size else (0, reference.shape[axis] - 1)
    # Interior quantiles: the extreme slices of a structure hold only a sliver of it.
    qs = (np.arange(n_slices) + 1) / (n_slices + 1)
    return sorted({int(round(lo + q * (hi - lo))) for q in qs})


def contour_figure(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    class_names: Sequence[str],
    title: str = "",
    n_slices: int = 3,
    axis: int = 2,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Figure:
    """A row of slices of a RAS volume with reference (solid) and predicted (dashed) contours.

    Args:
        image: 3D image ``(X, Y, Z)`` in RAS voxel order (the preprocessed grid).
        reference: reference label map, same shape.
        prediction: predicted label map, same shape.
        class_names: names of the foreground classes 1..K-1.
        title: figure title (e.g. the case name and its Dice).
        n_slices: slices to show, spread over the reference structure.
        axis: 0 sagittal, 1 coronal, 2 axial.
        spacing: voxel size, so slices keep their physical aspect ratio.

    Returns:
        A matplotlib Figure on an Agg canvas (save with ``fig.savefig``).
    """
    idx = pick_slices(reference, n_slices, axis)
    fig = Figure(figsize=(3.2 * len(idx), 3.6), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(idx), squeeze=False)[0]
    in_plane = [a for a in range(3) if a != axis]
    aspect = spacing[in_plane[1]] / spacing[in_plane[0]]
    lo, hi = np.percentile(image, [1, 99])
    for ax, k in zip(axes, idx):
        img, ref, pred = (np.take(v, k, axis=axis) for v in (image, reference, prediction))
        # Transpose so the second in-plane axis (A or S in RAS) runs up the page, as in a viewer.
        ax.imshow(img.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        for c in range(1, len(class_names) + 1):
            colour = CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]
            # Reference wide and translucent, prediction thin and dashed: both stay visible where they agree.
            for mask, style, width, alpha in ((ref == c, "solid", 2.4, 0.55), (pred == c, "dashed", 1.1, 1.0)):
                if mask.any() and not mask.all():
                    ax.contour(mask.T.astype(float), levels=[0.5], colors=[colour], linestyles=style,
                               linewidths=width, alpha=alpha)
        ax.set_title(f"{AXIS_NAMES[axis]} {k}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=CLASS_COLOURS[i % len(CLASS_COLOURS)], label=n) for i, n in enumerate(class_names)]
    handles += [Line2D([], [], color="black", linestyle="solid", linewidth=2.4, alpha=0.55, label="reference"),
                Line2D([], [], color="black", linestyle="dashed", linewidth=1.1, label="predicted")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.84, bottom=0.12, wspace=0.05)
    return fig


def save_case_figures(
    model: nn.Module,
    loader: Iterable,
    spec: SegSpec,
    cfg: SegmentationConfig,
    out_dir: str | os.PathLike,
    n_cases: int = 3,
    names: Sequence[str] | None = None,
    n_slices: int = 3,
    axis: int = 2,
) -> list[Path]:
    """Segment the first ``n_cases`` volumes of an eval ``loader`` and write one PNG per case.

    Args:
        model: trained segmentation network.
        loader: yields ``(image, label)`` whole volumes, one per batch (an experiment's ``test_loader``).
        spec: the task spec (classes, ROI, spacing).
        cfg: segmentation settings (sliding window).
        out_dir: folder for ``<name>.png``.
        n_cases: number of volumes drawn.
        names: case names for titles and file names (default ``case_01`` …).
        n_slices: slices per figure.
        axis: 0 sagittal, 1 coronal, 2 axial.

    Returns:
        Paths of the written PNGs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, label) in enumerate(loader):
        if i >= n_cases:
            break
        pred = segment(model, image, spec, cfg)
        dice, _ = dice_hd95(pred, label, spec.num_classes, spec.pixdim)
        name = names[i] if names is not None else f"case_{i + 1:02d}"
        scores = ", ".join(f"{n} {d:.2f}" for n, d in zip(spec.class_names, dice[0]) if np.isfinite(d))
        fig = contour_figure(_volume(image), _volume(label), _volume(pred), spec.class_names,
                             f"{name} — Dice {scores}", n_slices, axis, spec.pixdim)
        path = out / f"{name}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def _volume(batch: torch.Tensor) -> np.ndarray:
    """First case, first channel of a ``(B, C, X, Y, Z)`` batch as a numpy volume."""
    return np.asarray(batch[0, 0].detach().cpu().numpy())
