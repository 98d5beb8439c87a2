"""Artefact files handed from one preprocessing stage to the next (names, JSON read/write)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.errors import DataFormatError, DataNotFoundError

CONVERSION_JSON = "conversion.json"  # convert -> quality, datalist
NIFTI_DIR = "nifti"
QUALITY_JSON = "quality.json"  # quality -> datalist
QUALITY_MD = "quality.md"
QUALITY_HTML = "quality.html"
DATASET_JSON = "dataset.json"  # datalist -> tasks
DEID_SUMMARY_JSON = "deid_summary.json"
DEID_DIR = "dicom_deid"
SCHEMA_VERSION = 1


def write_json(path: str | os.PathLike, payload: Any, mode: int | None = None) -> Path:
    """Write JSON atomically (temp file + rename) so a crash never leaves half an artefact.

    Args:
        path: destination.
        payload: JSON-serialisable object (numpy scalars are converted).
        mode: optional permission bits set before the rename (e.g. 0o600 for the re-id map).

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, default=_json_default)
        fh.write("\n")
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON artefact with a message that names the file on failure.

    Args:
        path: file to read.
        what: what the file should be (for the message), e.g. "conversion summary".

    Returns:
        The parsed JSON.

    Raises:
        DataNotFoundError: the file does not exist.
        DataFormatError: it is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{what} {path} is not valid JSON ({exc})") from exc


def slug(text: str, fallback: str = "x") -> str:
    """File-name-safe form of a header value (letters, digits, '-'), never empty."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")
    return cleaned or fallback


def sha1_array(arr: np.ndarray) -> str:
    """Hash of an array's values, shape and dtype (same image -> same hash)."""
    h = hashlib.sha1()
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def is_within(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """True when ``child`` is ``parent`` or lies below it (after resolving links)."""
    child, parent = Path(child).resolve(), Path(parent).resolve()
    return child == parent or parent in child.parents
