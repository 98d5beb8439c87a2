"""Shared fixtures: where the real data lives (``$MONAI_FL_DATA`` or ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path | None:
    env = os.environ.get("MONAI_FL_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate.resolve()
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("real data not found: set MONAI_FL_DATA or place ../shared/data beside the repo")
    return root


@pytest.fixture(scope="session")
def medmnist_dir(data_root: Path) -> Path:
    d = data_root / "medmnist"
    if not (d / "pneumoniamnist.npz").is_file():
        pytest.skip(f"{d}/pneumoniamnist.npz absent")
    return d
