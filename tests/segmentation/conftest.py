"""Fixtures for the segmentation tests: tiny MSD-format tasks built from MONAI's synthetic phantoms,
and the real Hippocampus task when it is present."""

from __future__ import annotations

from pathlib import Path

import pytest

from seg_fixtures import HIPPOCAMPUS, write_msd_task


@pytest.fixture
def phantom_task(tmp_path: Path) -> Path:
    """A 4-case phantom task folder; returns its ``dataset.json``."""
    return write_msd_task(tmp_path / "Task99_Phantom")


@pytest.fixture(scope="session")
def hippocampus_dir(data_root: Path) -> Path:
    d = data_root / "msd" / HIPPOCAMPUS
    if not (d / "dataset.json").is_file():
        pytest.skip(f"{d}/dataset.json absent")
    return d


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run these tiny-tensor tests on one thread: on a shared 2-core machine the second thread's
    synchronisation costs more than it gains (small ops measured 10-80× slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
