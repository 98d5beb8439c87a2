"""Shared by the benchmark scripts: where results go, and how they are printed."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from monai_fl.utils import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import os

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def emit(name: str, payload: dict) -> Path:
    """Print the JSON and write it to benchmarks/results/<name>.json."""
    payload = {**payload, "machine": machine()}
    path = write_json(payload, RESULTS / f"{name}.json")
    print(json.dumps(json.loads(path.read_text()), indent=1))
    return path
