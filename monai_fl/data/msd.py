"""Reader for Medical Segmentation Decathlon (MSD) datalists, their validation and site manifests.

An MSD task folder holds ``dataset.json`` (``labels``, ``modality``, ``training`` as a list of
``{"image", "label"}`` NIfTI pairs relative to the json's folder) beside ``imagesTr/`` and
``labelsTr/``. The labelled set has no official test split, so a seeded share of the cases is held
out as the pooled test set and the rest is split among sites with :func:`monai_fl.data.partition.partition`;
the result is written in the same site-manifest format as classification, indices counting
entries of the ``training`` list.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import nibabel as nib
import numpy as np

from monai_fl.data.medmnist import md5sum
from monai_fl.data.partition import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    Scheme,
    partition,
    site_names,
    test_shards,
)
from monai_fl.errors import DataFormatError, DataNotFoundError, ManifestError, MonaiFLError
from monai_fl.keys import DATA_ENV

DATALIST = "dataset.json"
MSD_SUBDIR = "msd"


@dataclass(frozen=True)
class MSDTask:
    """An official Decathlon task: its folder and, from its ``dataset.json``, channels and classes.

    The FL server builds the initial network from these without holding any data; each site's
    own ``dataset.json`` must agree (checked when a site prepares its experiment).
    """

    folder: str
    modalities: tuple[str, ...]
    labels: tuple[str, ...]


# Config dataset names → the ten Decathlon tasks.
MSD_TASKS = MappingProxyType({
    "msd_braintumour": MSDTask("Task01_BrainTumour", ("FLAIR", "T1w", "t1gd", "T2w"),
                               ("background", "edema", "non-enhancing tumor", "enhancing tumour")),
    "msd_heart": MSDTask("Task02_Heart", ("MRI",), ("background", "left atrium")),
    "msd_liver": MSDTask("Task03_Liver", ("CT",), ("background", "liver", "cancer")),
    "msd_hippocampus": MSDTask("Task04_Hippocampus", ("MRI",), ("background", "Anterior", "Posterior")),
    "msd_prostate": MSDTask("Task05_Prostate", ("T2", "ADC"), ("background", "PZ", "TZ")),
    "msd_lung": MSDTask("Task06_Lung", ("CT",), ("background", "cancer")),
    "msd_pancreas": MSDTask("Task07_Pancreas", ("CT",), ("background", "pancreas", "cancer")),
    "msd_hepaticvessel": MSDTask("Task08_HepaticVessel", ("CT",), ("background", "Vessel", "Tumour")),
    "msd_spleen": MSDTask("Task09_Spleen", ("CT",), ("background", "spleen")),
    "msd_colon": MSDTask("Task10_Colon", ("CT",), ("background", "colon cancer primaries")),
})
AFFINE_TOL_MM = 1e-3  # image and label grids must agree to a micrometre
MAX_LISTED_PROBLEMS = 5
# The hold-out draw uses its own random stream so it is not a prefix of the site split's draw.
HOLD_OUT_STREAM = 1


@dataclass(frozen=True)
class MSDCase:
    """One labelled case: absolute paths of its image and label NIfTI files."""

    image: Path
    label: Path

    @property
    def name(self) -> str:
        """Case name from the image file, e.g. ``hippocampus_001``."""
        return self.image.name.removesuffix(".gz").removesuffix(".nii")


@dataclass(frozen=True)
class MSDDatalist:
    """A parsed MSD ``dataset.json``: class names, modalities and the labelled cases in file order.

    ``labels[v]`` names label value ``v`` (``labels[0]`` is the background). ``name``, ``md5`` and
    ``label_names`` mirror :class:`monai_fl.data.medmnist.MedMNIST` so reports treat both alike.
    """

    name: str
    path: Path
    md5: str
    labels: tuple[str, ...]
    modalities: tuple[str, ...]
    cases: tuple[MSDCase, ...]

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def size(self) -> None:
        """Volumes keep their native size (MedMNIST files have one fixed size)."""
        return None

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    @property
    def num_classes(self) -> int:
        """Classes including the background."""
        return len(self.labels)

    @property
    def n_channels(self) -> int:
        return len(self.modalities)

    def datalist(self, indices=None) -> list[dict[str, str]]:
        """MONAI-style ``[{"image": path, "label": path}, ...]`` for ``indices`` (default: all cases)."""
        picked = self.cases if indices is None else [self.cases[i] for i in indices]
        return [{"image": str(c.image), "label": str(c.label)} for c in picked]


def msd_task(name: str) -> MSDTask | None:
    """The official task for a config name (``msd_hippocampus``) or folder (``Task04_Hippocampus``); None if custom."""
    key = name.strip().lower()
    if key in MSD_TASKS:
        return MSD_TASKS[key]
    return next((t for t in MSD_TASKS.values() if t.folder.lower() == key), None)


def task_folder(name: str) -> str:
    """MSD task folder for a config dataset name (``msd_hippocampus``) or a folder name (``Task04_Hippocampus``).

    Raises:
        MonaiFLError: neither an official task nor a ``Task…`` folder name.
    """
    task = msd_task(name)
    if task is not None:
        return task.folder
    if name.strip().lower().startswith("task"):
        return name.strip()  # a custom MSD-format task folder
    raise MonaiFLError(f"unknown segmentation dataset '{name}'; use one of {', '.join(MSD_TASKS)} "
                       "or an MSD task folder name such as Task04_Hippocampus")


def search_dirs(name: str, data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for ``dataset.json``, in order: ``data_root`` itself, ``data_root/<Task>``,
    ``data_root/msd/<Task>``, then ``$MONAI_FL_DATA/msd/<Task>``."""
    folder = task_folder(name)
    dirs: list[Path] = []
    if data_root is not None:
        root = Path(data_root).expanduser()
        dirs += [root, root / folder, root / MSD_SUBDIR / folder]
    env = os.environ.get(DATA_ENV)
    if env:
        dirs.append(Path(env).expanduser() / MSD_SUBDIR / folder)
    return dirs


def locate_datalist(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """Find the task's ``dataset.json``.

    Raises:
        DataNotFoundError: naming every folder searched.
    """
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise DataNotFoundError(f"--data-root {data_root} is not a folder")
    dirs = search_dirs(name, data_root)
    for d in dirs:
        if (d / DATALIST).is_file():
            return d / DATALIST
    folder = task_folder(name)
    tried = ", ".join(str(d) for d in dirs) or "nowhere (no --data-root given and $MONAI_FL_DATA unset)"
    raise DataNotFoundError(f"{DATALIST} of {folder} not found; searched: {tried}. Pass --data-root <folder with "
                            f"{DATALIST}> or set {DATA_ENV} so that ${DATA_ENV}/{MSD_SUBDIR}/{folder}/{DATALIST} exists")


def read_datalist(path: str | os.PathLike, name: str | None = None, validate: bool = True) -> MSDDatalist:
    """Parse an MSD ``dataset.json`` and check its cases.

    Every listed file must exist (always checked, it is cheap). With ``validate`` each pair's headers
    and label values are read as well: image and label must share the spatial shape and the affine,
    and label values must be declared classes. About 1 s for the 260 Hippocampus cases.

    Args:
        path: the ``dataset.json`` file (or its folder).
        name: dataset name for the manifest (default: the task folder's name).
        validate: also check shapes, affines and label values.

    Raises:
        DataFormatError: naming the file(s) and what is wrong (all problems found, the first few listed).
    """
    path = Path(path)
    if path.is_dir():
        path = path / DATALIST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataNotFoundError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}: expected a JSON object with 'labels' and 'training'")
    labels = _parse_labels(raw.get("labels"), path)
    modalities = _parse_modalities(raw.get("modality"), path)
    cases = _parse_training(raw.get("training"), path)
    declared = raw.get("numTraining")
    if declared is not None and declared != len(cases):
        raise DataFormatError(f"{path}: numTraining is {declared} but 'training' lists {len(cases)} cases")
    missing = [f"{f} (training[{i}].{key}) does not exist"
               for i, c in enumerate(cases) for key, f in (("image", c.image), ("label", c.label)) if not f.is_file()]
    _raise_problems(path, missing)
    data = MSDDatalist(name or path.parent.name, path, md5sum(path), labels, modalities, cases)
    if validate:
        validate_cases(data)
    return data


def _parse_labels(labels, path: Path) -> tuple[str, ...]:
    if not isinstance(labels, dict) or not labels:
        raise DataFormatError(f"{path}: 'labels' must map label values to names, e.g. {{\"0\": \"background\", \"1\": ...}}")
    try:
        values = sorted(int(k) for k in labels)
    except ValueError:
        raise DataFormatError(f"{path}: 'labels' keys must be integers, got {sorted(labels)}") from None
    if values != list(range(len(values))):
        raise DataFormatError(f"{path}: 'labels' must number the classes 0..K-1 without gaps, got {values}")
    if len(values) < 2:
        raise DataFormatError(f"{path}: 'labels' declares only the background; nothing to segment")
    by_value = {int(k): str(v) for k, v in labels.items()}
    return tuple(by_value[v] for v in values)


def _parse_modalities(modality, path: Path) -> tuple[str, ...]:
    if modality is None:
        return ("image",)
    if not isinstance(modality, dict) or not modality:
        raise DataFormatError(f"{path}: 'modality' must map channel indices to names, e.g. {{\"0\": \"MRI\"}}")
    try:
        return tuple(str(modality[k]) for k in sorted(modality, key=int))
    except ValueError:
        raise DataFormatError(f"{path}: 'modality' keys must be integers, got {sorted(modality)}") from None


def _parse_training(training, path: Path) -> tuple[MSDCase, ...]:
    if not isinstance(training, list) or not training:
        raise DataFormatError(f"{path}: 'training' must be a non-empty list of {{\"image\", \"label\"}} pairs")
    cases, seen = [], {}
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(entry.get("label"), str):
            raise DataFormatError(f"{path}: training[{i}] must have string 'image' and 'label' paths, got {entry!r}")
        case = MSDCase((path.parent / entry["image"]).resolve(), (path.parent / entry["label"]).resolve())
        # A case listed twice would land in training and in the held-out test set at once.
        if case.image in seen:
            raise DataFormatError(f"{path}: training[{i}] repeats the image {entry['image']} of training[{seen[case.image]}]")
        seen[case.image] = i
        cases.append(case)
    return tuple(cases)


def validate_cases(data: MSDDatalist) -> None:
    """Check every case: same spatial shape and affine for image and label, label values declared.

    Only headers are read for images; label voxels are read to check their values.

    Raises:
        DataFormatError: listing the first few problems, each naming its file(s).
    """
    problems = []
    for case in data.cases:
        problem = _case_problem(case, data.num_classes, data.n_channels)
        if problem:
            problems.append(problem)
    _raise_problems(data.path, problems)


def _case_problem(case: MSDCase, num_classes: int, n_channels: int) -> str | None:
    try:
        img, lbl = nib.load(case.image), nib.load(case.label)
    except Exception as exc:  # nibabel raises several types for unreadable files
        return f"{case.image} / {case.label} cannot be read as NIfTI ({exc})"
    ndim = len(lbl.shape)
    if ndim not in (2, 3):
        return f"label {case.label} has shape {lbl.shape}; expected a 2D or 3D label map"
    if img.shape[:ndim] != lbl.shape:
        return f"shape mismatch: image {case.image} is {img.shape}, label {case.label} is {lbl.shape}"
    channels = int(np.prod(img.shape[ndim:], dtype=int))
    if channels != n_channels:
        return f"image {case.image} has {channels} channel(s) (shape {img.shape}), dataset.json declares {n_channels} modalities"
    if not np.allclose(img.affine, lbl.affine, rtol=0, atol=AFFINE_TOL_MM):
        return (f"affine mismatch: image {case.image} has {_fmt_affine(img.affine)}, "
                f"label {case.label} has {_fmt_affine(lbl.affine)}")
    values = np.unique(np.asanyarray(lbl.dataobj))
    bad = values[(values != np.round(values)) | (values < 0) | (values >= num_classes)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:MAX_LISTED_PROBLEMS])
        return f"label {case.label} has value(s) {shown} outside the declared classes 0..{num_classes - 1}"
    return None


def _fmt_affine(affine: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(affine)[:3]) + "]"


def _raise_problems(path: Path, problems: list[str]) -> None:
    if not problems:
        return
    listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise DataFormatError(f"{path}: {len(problems)} bad case(s): {listed}{more}")


def load_msd(name: str, data_root: str | os.PathLike | None = None, validate: bool = True) -> MSDDatalist:
    """Locate and read the MSD task ``name`` (see :func:`locate_datalist` and :func:`read_datalist`)."""
    return read_datalist(locate_datalist(name, data_root), name=name, validate=validate)


def hold_out(n_cases: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n_cases)`` into (training pool, held-out test set), both sorted.

    Raises:
        MonaiFLError: ``fraction`` not in (0, 1) or leaving no case on one side.
    """
    if not 0 < fraction < 1:
        raise MonaiFLError(f"segmentation.test_fraction must lie strictly between 0 and 1, got {fraction}")
    n_test = int(round(fraction * n_cases))
    if not 0 < n_test < n_cases:
        raise MonaiFLError(f"a test fraction of {fraction} of {n_cases} cases leaves no test or no training case")
    order = np.random.default_rng((seed, HOLD_OUT_STREAM)).permutation(n_cases)
    return np.sort(order[n_test:]).astype(np.int64), np.sort(order[:n_test]).astype(np.int64)


def build_msd_manifest(data: MSDDatalist, n_sites: int, scheme: str, seed: int, test_fraction: float) -> dict:
    """Hold out the test cases, split the rest among sites and describe it as a site manifest.

    Indices (``train_indices``, ``test_indices``, ``test_indices`` of each site) count entries of
    the datalist's ``training`` list; ``n_pool`` is that list's length so
    :func:`monai_fl.data.partition.read_manifest` range-checks them. Each site's test shard is a
    share of the held-out set proportional to its training size.

    Raises:
        MonaiFLError: a ``dirichlet`` scheme (label skew needs one class per case, a segmentation
            case has none) or too few cases.
    """
    scheme_obj = Scheme.parse(scheme)
    if scheme_obj.kind == "dirichlet":
        raise MonaiFLError(f"partition scheme {scheme_obj} skews class labels, but a segmentation case has no single "
                           "class label; use iid or quantity:<beta> (site-size skew)")
    pool, test = hold_out(len(data.cases), test_fraction, seed)
    # partition() and test_shards() work on class labels; one constant stratum makes them size-only.
    pool_strata, test_strata = np.zeros(len(pool), np.int64), np.zeros(len(test), np.int64)
    parts = partition(pool_strata, n_sites, scheme_obj, seed)
    shards = test_shards(parts, pool_strata, test_strata)
    sites = {}
    for site, part, shard in zip(site_names(n_sites), parts, shards):
        sites[site] = {
            "n_train": int(len(part)),
            "n_test": int(len(shard)),
            "train_indices": pool[part].tolist(),
            "test_indices": test[shard].tolist(),
        }
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "task": "segmentation",
        "dataset": data.name,
        "size": data.size,
        "dataset_md5": data.md5,
        "datalist": f"{data.root.name}/{data.path.name}",
        "pool": f"{DATALIST} 'training' list minus a seeded {test_fraction:g} hold-out; indices count that list",
        "scheme": str(scheme_obj),
        "seed": seed,
        "label_names": data.label_names,
        "n_pool": len(data.cases),
        "test_fraction": test_fraction,
        "n_test": int(len(test)),
        "test_indices": test.tolist(),
        "test_cases": [data.cases[i].name for i in test],
        "sites": sites,
    }


def check_msd_manifest(manifest: dict, data: MSDDatalist, path: str | os.PathLike,
                       n_sites: int | None = None, scheme: str | None = None, test_fraction: float | None = None) -> None:
    """Segmentation-specific checks on a manifest already read by ``read_manifest``.

    Raises:
        ManifestError: the manifest is not a segmentation manifest of ``data``, its test indices
            overlap training or fall outside the held-out set, or it disagrees with the config.
    """
    if manifest.get("task") != "segmentation" or "test_indices" not in manifest:
        raise ManifestError(f"site manifest {path} is not a segmentation manifest (no task/test_indices); "
                            "make a new one for this config")
    if manifest["dataset"] != data.name:
        raise ManifestError(f"site manifest {path} is for {manifest['dataset']}, the config asks for {data.name}")
    test = set(manifest["test_indices"])
    if any(not 0 <= i < len(data.cases) for i in test):
        raise ManifestError(f"site manifest {path}: test indices outside the {len(data.cases)} listed cases")
    for site, entry in manifest["sites"].items():
        if test.intersection(entry["train_indices"]):
            raise ManifestError(f"site manifest {path}: site '{site}' trains on held-out test cases")
        if not test.issuperset(entry["test_indices"]):
            raise ManifestError(f"site manifest {path}: site '{site}' tests on cases outside the held-out set")
    wanted = {"sites": n_sites, "scheme": str(Scheme.parse(scheme)) if scheme else None, "test_fraction": test_fraction}
    have = {"sites": len(manifest["sites"]), "scheme": manifest.get("scheme"), "test_fraction": manifest.get("test_fraction")}
    differ = [f"{k} {have[k]} (config: {v})" for k, v in wanted.items() if v is not None and have[k] != v]
    if differ:
        raise ManifestError(f"site manifest {path} has {', '.join(differ)}; delete it or pass another --manifest")
