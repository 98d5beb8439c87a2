"""MSD-style ``dataset.json`` for the converted images of a site (the tasks' input).

Format (Medical Segmentation Decathlon, read by ``monai_fl.data.msd.read_datalist`` and by
MONAI's ``load_decathlon_datalist``): ``name``, ``description``, ``tensorImageSize``,
``modality`` (channel -> name), ``labels`` (value -> class name), ``numTraining``,
``numTest``, ``training`` (``{"image", "label"}`` with paths relative to the json's folder)
and ``test`` (unlabelled images). For classification the label is the class index.

Images that the quality report marks with an error are left out, and listed under
``excluded`` with the reason, so nobody has to guess why a case is missing.

With ``channels`` the image series of one study (same patient, study, frame of reference)
are stacked into one 4-D NIfTI, one channel per pattern, as MSD Task01 stores its four MR
contrasts; this needs the series to share their grid.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from preprocessing import artefacts
from preprocessing.errors import DataFormatError, PrepConfigError
from preprocessing.inventory import ImageItem
from preprocessing.labels import LabelKind, Pairing

STACKED_DIR = "imagesTr"
AFFINE_TOL_MM = 1e-3


def _rel(path: Path, base: Path) -> str:
    rel = os.path.relpath(Path(path).resolve(), base.resolve())
    return rel if rel.startswith("..") else f"./{rel}"


def _excluded_by_quality(quality: dict[str, Any] | None) -> dict[str, str]:
    """image path -> first error message, from a quality report."""
    if not quality:
        return {}
    if quality.get("stage") != "quality":
        raise DataFormatError("the given quality report was not written by `prep quality`")
    out = {}
    for row in quality.get("items", []):
        errors = [i["message"] for i in row.get("issues", []) if i["severity"] == "error"]
        if errors:
            out[str(Path(row["image"]).resolve())] = errors[0]
    return out


def _stack_channels(
    pairing: Pairing, channels: Sequence[str], out_dir: Path
) -> tuple[list[tuple[ImageItem, Path | int | None]], list[dict[str, str]]]:
    """Write one 4-D image per study, one channel per pattern (in pattern order)."""
    patterns = [re.compile(c, re.IGNORECASE) for c in channels]
    groups: dict[tuple, list[ImageItem]] = defaultdict(list)
    for item in pairing.images:
        groups[item.group_key].append(item)
    stacked, excluded = [], []
    target = out_dir / STACKED_DIR
    for n, (key, members) in enumerate(sorted(groups.items()), start=1):
        chosen = []
        for rx in patterns:
            match = [m for m in members if rx.search(m.match_text)]
            chosen.append(match[0] if match else None)
        name = f"{artefacts.slug(key[0], 'case')}_{n:03d}"
        if any(c is None for c in chosen):
            missing = [p.pattern for p, c in zip(patterns, chosen) if c is None]
            excluded.append({"image": name, "reason": f"no series matches channel(s) {missing}"})
            continue
        imgs = [nib.load(c.image) for c in chosen]
        ref = imgs[0]
        bad = [
            c.id
            for c, im in zip(chosen, imgs)
            if im.shape[:3] != ref.shape[:3] or not np.allclose(im.affine, ref.affine, atol=AFFINE_TOL_MM, rtol=0)
        ]
        if bad:
            excluded.append({"image": name, "reason": f"channels on different grids: {', '.join(bad)} vs {chosen[0].id}"})
            continue
        data = np.stack([np.asanyarray(im.dataobj) for im in imgs], axis=-1)
        if len({np.asanyarray(im.dataobj).dtype for im in imgs}) > 1:
            data = data.astype(np.float32)
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{name}.nii.gz"
        out_img = nib.Nifti1Image(data, ref.affine, ref.header)
        out_img.header.set_data_dtype(data.dtype)
        nib.save(out_img, path)
        label = next((pairing.label_of(c) for c in chosen if pairing.label_of(c) is not None), None)
        meta = {"channels": [c.id for c in chosen], "sources": [str(c.image) for c in chosen]}
        stacked.append((ImageItem(name, path.resolve(), meta), label))
    return stacked, excluded


def build_datalist(
    pairing: Pairing,
    out_path: str | Path,
    quality: dict[str, Any] | None = None,
    name: str = "site",
    description: str = "",
    channels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Assemble (and write) the dataset.json of a site.

    Args:
        pairing: images and labels.
        out_path: the ``dataset.json`` to write; paths inside are relative to its folder.
        quality: the quality report; images with an error finding are excluded.
        name: dataset name.
        description: free text.
        channels: regexes, one per channel, to stack the series of each study (see module doc).

    Returns:
        The dataset.json content.

    Raises:
        PrepConfigError: labels are requested but no labelled image is left (nothing is
            written then), or the classes observed do not number 0..K-1.
    """
    out_path = Path(out_path)
    base = out_path.parent
    base.mkdir(parents=True, exist_ok=True)
    excluded_paths = _excluded_by_quality(quality)
    excluded: list[dict[str, str]] = []
    if channels:
        entries, excluded = _stack_channels(pairing, channels, base)
        modality = {str(i): c for i, c in enumerate(channels)}
    else:
        entries = [(item, pairing.label_of(item)) for item in pairing.images]
        modalities = sorted({str(i.meta.get("modality", "")) for i in pairing.images} - {""})
        modality = {"0": modalities[0] if len(modalities) == 1 else "image"}
    training, test = [], []
    for item, label in entries:
        reasons = [excluded_paths.get(str(item.image.resolve()))]
        if isinstance(label, Path):
            reasons.append(excluded_paths.get(str(label.resolve())))
        reasons += [excluded_paths.get(str(Path(p).resolve())) for p in item.meta.get("sources", [])]
        reason = next((r for r in reasons if r), None)
        if reason:
            excluded.append({"image": _rel(item.image, base), "reason": reason})
            continue
        if label is None:
            test.append(_rel(item.image, base))
        elif pairing.kind == LabelKind.SEGMENTATION:
            training.append({"image": _rel(item.image, base), "label": _rel(Path(label), base)})
        else:
            training.append({"image": _rel(item.image, base), "label": int(label)})
    if pairing.kind != LabelKind.NONE and not training:
        reasons = "; ".join(f"{e['image']}: {e['reason']}" for e in excluded[:3])
        raise PrepConfigError(
            f"no labelled image is left for {out_path} ({len(excluded)} excluded"
            + (f", e.g. {reasons}" if reasons else "")
            + "); fix the images or labels the quality report names"
        )
    labels = _label_names(pairing, quality)
    payload = {
        "name": name,
        "description": description or f"written by monai-fl prep datalist for site {name}",
        "tensorImageSize": "4D" if channels else "3D",
        "modality": modality,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
        "excluded": excluded,
    }
    artefacts.write_json(out_path, payload)
    return payload


def _label_names(pairing: Pairing, quality: dict[str, Any] | None) -> dict[int, str]:
    if pairing.kind == LabelKind.NONE:
        return {}
    values = set(pairing.class_names)
    if pairing.kind == LabelKind.CLASSIFICATION:
        values |= {int(v) for v in pairing.labels.values()}
    elif quality:
        values |= {c["value"] for c in quality.get("labels", {}).get("classes", [])}
    else:  # no quality report: read the label maps (one pass, values only)
        for label in set(pairing.labels.values()):
            values |= {int(v) for v in np.unique(np.asanyarray(nib.load(label).dataobj))}
    if pairing.kind == LabelKind.SEGMENTATION:
        values |= {0}
    if not values:
        raise PrepConfigError("labels were requested but no class value is known; run `prep quality` first or pass --label-names")
    values_sorted = sorted(values)
    if values_sorted != list(range(len(values_sorted))):
        raise PrepConfigError(
            f"label values {values_sorted} do not number the classes 0..K-1; remap the labels first"
        )
    default = "background" if pairing.kind == LabelKind.SEGMENTATION else "class_0"
    return {v: pairing.class_names.get(v, default if v == 0 else f"class_{v}") for v in values_sorted}


def format_summary(payload: dict[str, Any], path: str | Path) -> str:
    """Short text summary for the terminal."""
    lines = [
        f"datalist {path}: {payload['numTraining']} training, {payload['numTest']} test (unlabelled), "
        f"{len(payload['excluded'])} excluded; labels {payload['labels'] or '-'}; modality {payload['modality']}"
    ]
    lines += [f"  excluded {e['image']}: {e['reason']}" for e in payload["excluded"]]
    return "\n".join(lines)
