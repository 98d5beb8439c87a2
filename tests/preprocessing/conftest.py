"""Fixtures for the preprocessing tests.

Real data: the TCIA Brain-Tumor-Progression study in ``$MONAI_FL_DATA/dicom`` (the
``data_root`` fixture of tests/conftest.py finds it or skips).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prep_helpers import SERIES, STUDY


@pytest.fixture(scope="session")
def dicom_study(data_root: Path) -> Path:
    """Folder of the real 5-series MR study."""
    study = data_root / "dicom" / STUDY
    if not all((study / s).is_dir() for s in SERIES.values()):
        pytest.skip(f"real DICOM study {study} absent")
    return study


@pytest.fixture(scope="session")
def series_dirs(dicom_study: Path) -> dict[str, Path]:
    """Short series name -> folder."""
    return {k: dicom_study / v for k, v in SERIES.items()}


@pytest.fixture(scope="session")
def converted_study(dicom_study: Path, tmp_path_factory) -> tuple[dict, Path]:
    """The real study converted once per session (read-only for tests)."""
    from preprocessing.dicom.convert import convert_tree

    out = tmp_path_factory.mktemp("converted_study")
    return convert_tree(dicom_study, out), out


