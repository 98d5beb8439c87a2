import shutil
import urllib.error

import numpy as np
import pytest

from monai_fl.data import medmnist
from monai_fl.data.medmnist import load_medmnist, locate
from monai_fl.errors import ChecksumError, DataNotFoundError, MonaiFLError


def _isolate(monkeypatch, tmp_path):
    """No env data, a fake home, and no network: only what the test puts in place exists."""
    monkeypatch.delenv("MONAI_FL_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(medmnist.urllib.request, "urlopen", offline)


@pytest.mark.parametrize(
    "name, shape, n_classes, counts",
    [
        ("pneumoniamnist", (1, 28, 28), 2, (4708, 524, 624)),
        ("breastmnist", (1, 28, 28), 2, (546, 78, 156)),
        ("retinamnist", (3, 28, 28), 5, (1080, 120, 400)),
        ("adrenalmnist3d", (1, 28, 28, 28), 2, (1188, 98, 298)),
    ],
)
def test_official_files_load_channel_first(medmnist_dir, name, shape, n_classes, counts):
    d = load_medmnist(name, data_root=medmnist_dir, download=False)
    assert d.image_shape == shape
    assert d.num_classes == n_classes
    assert tuple(len(d.labels[s]) for s in ("train", "val", "test")) == counts
    assert d.images["train"].dtype == np.uint8
    assert set(np.unique(d.labels["train"])) == set(range(n_classes))
    x, y = d.pool()
    assert len(x) == len(y) == counts[0] + counts[1]


def test_breastmnist_label_names_are_official(medmnist_dir):
    d = load_medmnist("breastmnist", data_root=medmnist_dir, download=False)
    assert d.label_names == ["malignant", "normal, benign"]


def test_checksum_mismatch_is_an_error_naming_the_file(monkeypatch, tmp_path, medmnist_dir):
    _isolate(monkeypatch, tmp_path)
    bad = tmp_path / "breastmnist.npz"
    shutil.copy(medmnist_dir / "breastmnist.npz", bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ChecksumError) as exc:
        locate("breastmnist", data_root=tmp_path)
    msg = str(exc.value)
    assert str(bad) in msg and "750601b1f35ba3300ea97c75c52ff8f6" in msg
    assert bad.exists(), "a bad file is reported, never silently replaced"


def test_missing_file_offline_lists_every_place_searched(monkeypatch, tmp_path):
    _isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("MONAI_FL_DATA", str(tmp_path / "envdata"))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataNotFoundError) as exc:
        locate("pneumoniamnist", data_root=root)
    msg = str(exc.value)
    for place in (root, root / "medmnist", tmp_path / "envdata" / "medmnist", tmp_path / "home" / ".medmnist"):
        assert str(place) in msg
    assert "zenodo.org" in msg and "failed" in msg


def test_download_with_wrong_checksum_saves_nothing(monkeypatch, tmp_path):
    _isolate(monkeypatch, tmp_path)
    import io

    monkeypatch.setattr(medmnist.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not the dataset"))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ChecksumError, match="nothing was saved"):
        locate("breastmnist", data_root=root)
    assert list(root.iterdir()) == []


def test_env_var_is_searched(monkeypatch, tmp_path, medmnist_dir):
    _isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("MONAI_FL_DATA", str(medmnist_dir.parent))
    assert locate("breastmnist", download=False) == medmnist_dir / "breastmnist.npz"


@pytest.mark.parametrize(
    "name, size, msg",
    [("nosuchmnist", 28, "unknown dataset 'nosuchmnist'"), ("adrenalmnist3d", 128, "sizes 28, 64"),
     ("chestmnist", 28, "multi-label")],
)
def test_bad_names_and_sizes_are_clear(monkeypatch, tmp_path, name, size, msg):
    _isolate(monkeypatch, tmp_path)
    with pytest.raises(MonaiFLError, match=msg):
        load_medmnist(name, size)


def test_bad_data_root_is_clear(tmp_path):
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        locate("breastmnist", data_root=tmp_path / "missing")
