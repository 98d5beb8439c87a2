"""Small process-level helpers: seeding, threads, atomic JSON writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from monai.utils import set_determinism


def seed_everything(seed: int, threads: int = 0) -> None:
    """Seed Python, NumPy, torch and MONAI; optionally fix torch's thread count."""
    set_determinism(seed=seed)
    if threads > 0:
        torch.set_num_threads(threads)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, Path):
        return str(o)
    return o


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write JSON atomically; NaN becomes null so the file is strict JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1))
    tmp.replace(path)
    return path
