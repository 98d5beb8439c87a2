"""One typed config per experiment, read from YAML/JSON. Every method (federated, centralized,
local-only, classical) and the exported NVFlare job are built from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from monai_fl.errors import MonaiFLError


@dataclass
class DatasetConfig:
    name: str = "pneumoniamnist"
    size: int = 28  # the official file's image size
    input_size: int | None = None  # resize to this before the network (None: the file's size)


@dataclass
class PartitionConfig:
    n_sites: int = 3
    scheme: str = "dirichlet:0.5"
    seed: int = 0


@dataclass
class NetworkConfig:
    """``resnet18`` (MONAI ResNet, basic blocks [2,2,2,2], channels width×[1,2,4,8]; the MedMNIST
    paper's 28-px stem), ``densenet121`` (MONAI DenseNet121, inputs ≥ 32 px) or ``cnn`` (small).

    ``norm`` (classification resnet18): ``batch`` (default) or ``group`` (GroupNorm, 8 groups; no
    running statistics). Segmentation networks fix their own and reject it.
    """

    name: str = "resnet18"
    width: int = 16
    dropout: float = 0.0
    norm: str | None = None


@dataclass
class TrainConfig:
    """Optimiser, batch and augmentation shared by every method; ``epochs`` is the centralized and
    local-only budget (federated sites train ``fl.rounds × fl.local_epochs`` epochs)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    eval_batch_size: int = 256
    threads: int = 0  # torch intra-op threads; 0 = torch's default


SITE_OPTIMIZER_MODES = ("reset", "keep")


@dataclass
class FLConfig:
    rounds: int = 10
    # Epochs of local training per round; a fraction (0.5) trains that share of an epoch's steps
    # per round, so the sites are averaged more often within the same epoch budget.
    local_epochs: float = 1.0
    he: bool = True
    min_clients: int | None = None  # default: all sites
    # Overrides of monai_fl.he.codec.CodecParams (e.g. {"quant_bits": 13}); empty: the codec's
    # defaults. Only codec-level fields may differ from the provisioned kits' BFV parameters.
    he_codec: dict = field(default_factory=dict)
    # "reset": a fresh optimiser each round; "keep": each site keeps its optimiser state (AdamW
    # moments) across rounds, in its own memory. On Hippocampus "keep" did not help (RESULTS.md).
    site_optimizer: str = "reset"

    def __post_init__(self):
        if not self.local_epochs > 0:
            raise MonaiFLError(f"fl.local_epochs must be positive, got {self.local_epochs!r}")
        if self.site_optimizer not in SITE_OPTIMIZER_MODES:
            raise MonaiFLError(f"fl.site_optimizer must be one of {', '.join(SITE_OPTIMIZER_MODES)}, "
                               f"got {self.site_optimizer!r}")


@dataclass
class SegmentationConfig:
    """Segmentation-only settings; ignored by classification experiments.

    ``spatial_dims`` 3 trains on 3D patches; 2 trains on axial slices of the same volumes and
    infers slice by slice. ``roi_size`` is the training patch and the sliding-window size (2D: its
    first two entries). Class names come from the datalist unless ``class_names`` overrides them.
    """

    spatial_dims: int = 3
    roi_size: list[int] = field(default_factory=lambda: [32, 48, 32])
    pixdim: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # target spacing in mm (RAS)
    intensity: str = "zscore"  # "zscore" (per volume, nonzero voxels) or "range" (clip to intensity_range → 0..1)
    intensity_range: list[float] = field(default_factory=list)  # [a_min, a_max] for intensity "range" (e.g. CT HU)
    samples_per_volume: int = 1  # random patches (2D: slices) drawn from each training volume per epoch
    test_fraction: float = 0.2  # MSD has no labelled test set: this seeded share of cases is held out
    class_names: list[str] = field(default_factory=list)  # overrides the datalist's names (background excluded)
    # 0: from the datalist or the MSD registry. A custom task sets it and class_names, so the FL
    # server can build the network without holding data.
    in_channels: int = 0
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    cache_rate: float = 1.0  # share of preprocessed volumes kept in memory (MONAI CacheDataset)


@dataclass
class ExperimentConfig:
    name: str = "pneumoniamnist_3site"
    task: str = "classification"  # or "segmentation"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ExperimentConfig":
        return _build(cls, d, source)

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise MonaiFLError(f"config file {path} does not exist") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise MonaiFLError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
        return cls.from_dict(data or {}, str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1) if path.suffix == ".json" else yaml.safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(text)
        return path


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise MonaiFLError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise MonaiFLError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if default is None or value is None:
        return value
    target = type(default)
    if target is bool:
        if not isinstance(value, bool):
            raise MonaiFLError(f"{where}: expected true/false, got {value!r}")
        return value
    if target is int and isinstance(value, float) and not value.is_integer():
        raise MonaiFLError(f"{where}: expected a whole number, got {value!r}")
    try:
        return target(value)
    except (TypeError, ValueError):
        raise MonaiFLError(f"{where}: expected {target.__name__}, got {value!r}") from None
