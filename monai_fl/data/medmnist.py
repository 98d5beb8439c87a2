"""Reader for the official MedMNIST v2 ``.npz`` files (2D and 3D), with MD5 verification.

The registry (URLs, MD5s, label names, split sizes) is the official one from ``medmnist`` 3.0.2,
stored in ``medmnist_info.json`` beside this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from monai_fl.errors import ChecksumError, DataFormatError, DataNotFoundError, MonaiFLError
from monai_fl.keys import DATA_ENV

SPLITS = ("train", "val", "test")
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)
DOWNLOAD_TIMEOUT_S = 30


@cache
def registry() -> dict[str, dict]:
    """The official MedMNIST registry keyed by dataset flag (e.g. ``pneumoniamnist``)."""
    text = resources.files("monai_fl.data").joinpath("medmnist_info.json").read_text()
    return json.loads(text)["datasets"]


def dataset_names() -> list[str]:
    """All known MedMNIST dataset flags."""
    return sorted(registry())


def dataset_info(name: str) -> dict:
    """Registry entry for ``name``; raises a clear error listing valid names."""
    info = registry().get(name.lower())
    if info is None:
        raise MonaiFLError(f"unknown dataset '{name}'; known MedMNIST datasets: {', '.join(dataset_names())}")
    return info


def file_name(name: str, size: int = 28) -> str:
    """Official file name, e.g. ``pneumoniamnist.npz`` or ``adrenalmnist3d_64.npz``."""
    info = dataset_info(name)
    sizes = SIZES_3D if info["ndim"] == 3 else SIZES_2D
    if size not in sizes:
        raise MonaiFLError(f"{name} comes in sizes {', '.join(map(str, sizes))}, not {size}")
    return f"{name.lower()}.npz" if size == 28 else f"{name.lower()}_{size}.npz"


def official_md5(name: str, size: int = 28) -> str:
    """The official MD5 of the file for ``name`` at ``size``."""
    info = dataset_info(name)
    return info["MD5"] if size == 28 else info[f"MD5_{size}"]


def official_url(name: str, size: int = 28) -> str:
    """The official download URL (Zenodo record) for ``name`` at ``size``."""
    info = dataset_info(name)
    return info["url"] if size == 28 else info[f"url_{size}"]


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """MD5 hex digest of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def search_dirs(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for MedMNIST files, in order: ``data_root`` (and its ``medmnist/``),
    ``$MONAI_FL_DATA/medmnist``, ``~/.medmnist``."""
    dirs: list[Path] = []
    if data_root is not None:
        root = Path(data_root).expanduser()
        dirs += [root, root / "medmnist"]
    env = os.environ.get(DATA_ENV)
    if env:
        dirs.append(Path(env).expanduser() / "medmnist")
    dirs.append(Path.home() / ".medmnist")
    return dirs


def locate(name: str, size: int = 28, data_root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find (or download) the official file and verify its MD5.

    Args:
        name: dataset flag, e.g. ``pneumoniamnist``.
        size: image size (28, 64, 128, 224 for 2D; 28, 64 for 3D).
        data_root: a folder given by the user (``--data-root``); searched first.
        download: fetch from the official source into the first writable search folder when absent.

    Returns:
        Path of a verified file.

    Raises:
        DataNotFoundError: the file is in none of the searched places and could not be downloaded.
        ChecksumError: a file was found (or downloaded) but its MD5 differs from the official one.
    """
    fname = file_name(name, size)
    expected = official_md5(name, size)
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise DataNotFoundError(f"--data-root {data_root} is not a folder")
    dirs = search_dirs(data_root)
    for d in dirs:
        candidate = d / fname
        if candidate.is_file():
            _verify(candidate, expected)
            return candidate
    tried = ", ".join(str(d) for d in dirs)
    if not download:
        raise DataNotFoundError(f"{fname} not found; searched: {tried}")
    target_dir = Path(data_root).expanduser() if data_root is not None else Path.home() / ".medmnist"
    try:
        return _download(official_url(name, size), target_dir / fname, expected)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DataNotFoundError(
            f"{fname} not found; searched: {tried}; download from {official_url(name, size)} failed ({exc}). "
            f"Place the official file in one of those folders or set {DATA_ENV}."
        ) from None


def _verify(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: MD5 {actual} differs from the official {expected}; the file is corrupt or not the "
            f"official release. Remove it and fetch the official file."
        )


def _download(url: str, dest: Path, expected: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename only after the checksum passes: a broken download
    # never replaces or poses as a good file.
    with tempfile.NamedTemporaryFile(dir=dest.parent, suffix=".part", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                shutil.copyfileobj(resp, tmp)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    try:
        _verify(tmp_path, expected)
    except ChecksumError:
        tmp_path.unlink(missing_ok=True)
        raise ChecksumError(f"download from {url} has the wrong MD5 (expected {expected}); nothing was saved")
    tmp_path.replace(dest)
    return dest


@dataclass
class MedMNIST:
    """One MedMNIST dataset in memory: channel-first uint8 images and integer labels per split."""

    name: str
    size: int
    path: Path
    md5: str
    task: str
    label_names: list[str]
    ndim: int
    n_channels: int
    images: dict[str, np.ndarray] = field(repr=False)
    labels: dict[str, np.ndarray] = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, channel first: (C, H, W) or (C, D, H, W)."""
        return tuple(self.images["train"].shape[1:])

    def pool(self) -> tuple[np.ndarray, np.ndarray]:
        """Official train+val concatenated (train first): the pool that site manifests index into."""
        return (
            np.concatenate([self.images["train"], self.images["val"]]),
            np.concatenate([self.labels["train"], self.labels["val"]]),
        )


def load_medmnist(
    name: str, size: int = 28, data_root: str | os.PathLike | None = None, download: bool = True
) -> MedMNIST:
    """Load an official MedMNIST file as channel-first arrays ready for MONAI transforms.

    Args:
        name: dataset flag, e.g. ``pneumoniamnist``, ``adrenalmnist3d``.
        size: image size.
        data_root: user-given folder searched first.
        download: allow downloading from the official source when the file is absent.

    Returns:
        A :class:`MedMNIST` with ``images[split]`` of shape (N, C, H, W) or (N, C, D, H, W), uint8,
        and ``labels[split]`` of shape (N,), int64.
    """
    info = dataset_info(name)
    if "multi-label" in info["task"]:
        raise MonaiFLError(f"{name} is a multi-label dataset; the classification task supports single-label tasks")
    path = locate(name, size, data_root, download)
    try:
        with np.load(path) as npz:
            raw = {k: npz[k] for k in npz.files}
    except Exception as exc:  # numpy raises several types for a damaged archive
        raise DataFormatError(f"{path}: not a readable .npz archive ({exc})") from None
    images, labels = {}, {}
    for split in SPLITS:
        x, y = raw.get(f"{split}_images"), raw.get(f"{split}_labels")
        if x is None or y is None:
            raise DataFormatError(f"{path}: missing arrays {split}_images/{split}_labels")
        if len(x) != info["n_samples"][split]:
            raise DataFormatError(f"{path}: {split} has {len(x)} images, the official count is {info['n_samples'][split]}")
        images[split] = _channel_first(x, info["ndim"])
        labels[split] = y.reshape(len(y), -1)[:, 0].astype(np.int64)
    label_names = [info["label"][str(i)] for i in range(len(info["label"]))]
    return MedMNIST(
        name=name.lower(),
        size=size,
        path=path,
        md5=official_md5(name, size),
        task=info["task"],
        label_names=label_names,
        ndim=info["ndim"],
        n_channels=info["n_channels"],
        images=images,
        labels=labels,
    )


def _channel_first(x: np.ndarray, ndim: int) -> np.ndarray:
    # MedMNIST stores 2D grey as (N,H,W), 2D colour as (N,H,W,3) and 3D as (N,D,H,W).
    if x.ndim == ndim + 1:
        return np.ascontiguousarray(x[:, None])
    if x.ndim == ndim + 2:
        return np.ascontiguousarray(np.moveaxis(x, -1, 1))
    raise DataFormatError(f"unexpected image array shape {x.shape} for a {ndim}D dataset")
