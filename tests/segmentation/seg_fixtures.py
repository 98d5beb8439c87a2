"""Tiny MSD-format tasks built from MONAI's synthetic phantoms (importable helpers for the tests)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import create_test_image_3d

HIPPOCAMPUS = "Task04_Hippocampus"
PHANTOM_LABELS = {"0": "background", "1": "sphere"}


def write_msd_task(root: Path, n_cases: int = 4, shape=(24, 24, 16), seed: int = 0,
                   labels: dict | None = None) -> Path:
    """Write ``n_cases`` phantom image/label pairs and an MSD ``dataset.json`` under ``root``.

    Each case holds a few spheres (label 1) in noise; 1 mm RAS grid. Returns the json path.
    """
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_cases):
        img, seg = create_test_image_3d(*shape, num_objs=3, rad_max=5, rad_min=3, noise_max=0.3,
                                        num_seg_classes=1, random_state=np.random.RandomState(seed + i))
        name = f"phantom_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), np.eye(4)), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    datalist = {
        "name": "Phantom", "tensorImageSize": "3D", "modality": {"0": "MRI"},
        "labels": labels or PHANTOM_LABELS, "numTraining": n_cases, "numTest": 0, "training": training,
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path
