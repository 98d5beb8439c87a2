"""What every method needs before training: the dataset, the site manifest and per-site data.

The centralized, local-only, classical and federated runs all go through :func:`prepare`, so they
read the same file, verify the same checksum and use the same split. An experiment exposes one
task-agnostic interface (:class:`TaskExperiment`) that the baselines and the federated site call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
from torch import nn

from monai_fl.config import ExperimentConfig
from monai_fl.data.medmnist import MedMNIST, dataset_info, load_medmnist
from monai_fl.data.partition import build_manifest, load_or_create_manifest, site_entry
from monai_fl.errors import ManifestError, MonaiFLError
from monai_fl.tasks import classification as cls_task


class TaskExperiment(Protocol):
    """What the baselines and the federated site need from a task, whatever the task."""

    cfg: ExperimentConfig
    manifest: dict

    @property
    def sites(self) -> list[str]: ...

    def build_model(self) -> nn.Module: ...

    def loss(self) -> nn.Module: ...

    def train_loader(self, site: str | None = None) -> Iterable:
        """Training batches of ``site`` (None: every site's cases pooled)."""

    def test_loader(self, site: str | None = None) -> Iterable:
        """Test batches of ``site``'s shard (None: the pooled test set)."""

    def evaluate(self, model: nn.Module, loader: Iterable) -> dict: ...


@dataclass
class Experiment:
    """A classification experiment: a loaded MedMNIST dataset plus its site manifest."""

    cfg: ExperimentConfig
    data: MedMNIST
    manifest: dict
    manifest_path: Path
    pool_images: np.ndarray
    pool_labels: np.ndarray

    @property
    def spec(self) -> cls_task.TaskSpec:
        return classification_spec(self.cfg)

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    def site_train(self, site: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(site_entry(self.manifest, site)["train_indices"], dtype=np.int64)
        return self.pool_images[idx], self.pool_labels[idx]

    def site_test(self, site: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(site_entry(self.manifest, site)["test_indices"], dtype=np.int64)
        return self.data.images["test"][idx], self.data.labels["test"][idx]

    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        """Union of every site's training cases (the centralized baseline's data)."""
        idx = np.concatenate([np.asarray(e["train_indices"], np.int64) for e in self.manifest["sites"].values()])
        idx.sort()
        return self.pool_images[idx], self.pool_labels[idx]

    def pooled_test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data.images["test"], self.data.labels["test"]

    def build_model(self) -> nn.Module:
        return cls_task.build_network(self.cfg.network, self.spec)

    def loss(self) -> nn.Module:
        return cls_task.build_loss()

    def train_loader(self, site: str | None = None) -> Iterable:
        x, y = self.pooled_train() if site is None else self.site_train(site)
        t = self.cfg.train
        return cls_task.make_loader(x, y, "train", self.spec, t.batch_size, t.augment, t.seed)

    def test_loader(self, site: str | None = None) -> Iterable:
        x, y = self.pooled_test() if site is None else self.site_test(site)
        return cls_task.make_loader(x, y, "eval", self.spec, self.cfg.train.eval_batch_size)

    def evaluate(self, model: nn.Module, loader: Iterable) -> dict:
        return cls_task.evaluate(model, loader, self.spec.label_names)


def classification_spec(cfg: ExperimentConfig) -> cls_task.TaskSpec:
    """The network's input/output description from the official registry, without the data file
    (the NVFlare server builds the initial model but holds no images)."""
    info = dataset_info(cfg.dataset.name)
    names = tuple(info["label"][str(i)] for i in range(len(info["label"])))
    size = cfg.dataset.input_size or cfg.dataset.size
    return cls_task.TaskSpec(info["n_channels"], len(names), info["ndim"], size, names, file_size=cfg.dataset.size)


def model_for_config(cfg: ExperimentConfig, data_root: str | os.PathLike | None = None) -> nn.Module:
    """The experiment's network from its config alone (no data needed)."""
    if cfg.task == "segmentation":
        from monai_fl.tasks.segmentation_experiment import model_for_config as seg_model

        return seg_model(cfg)
    return cls_task.build_network(cfg.network, classification_spec(cfg))


def make_manifest(cfg: ExperimentConfig, data: MedMNIST) -> dict:
    """Partition ``data``'s official train+val pool as ``cfg.partition`` says."""
    _, pool_y = data.pool()
    p = cfg.partition
    return build_manifest(data.name, data.size, data.md5, pool_y, data.labels["test"], data.label_names,
                          p.n_sites, p.scheme, p.seed)


def prepare(
    cfg: ExperimentConfig,
    data_root: str | os.PathLike | None = None,
    manifest_path: str | os.PathLike | None = None,
    create: bool = True,
    download: bool = True,
) -> TaskExperiment:
    """Load the dataset and the site manifest (creating the manifest if asked and absent).

    Args:
        cfg: experiment config.
        data_root: user-given data folder (``--data-root``).
        manifest_path: site manifest file; when absent and ``create``, it is written there.
        create: write a new manifest if ``manifest_path`` does not exist.
        download: allow fetching a missing official file (sites pass False: a hospital's data is
            what its IT staff put there, and a site never reaches out to the internet on its own).

    Raises:
        ManifestError: the manifest does not belong to this dataset file or disagrees with the config.
    """
    if cfg.task == "segmentation":
        from monai_fl.tasks.segmentation_experiment import prepare_segmentation

        return prepare_segmentation(cfg, data_root, manifest_path, create)
    if cfg.task != "classification":
        raise MonaiFLError(f"unknown task '{cfg.task}'; use classification or segmentation")
    data = load_medmnist(cfg.dataset.name, cfg.dataset.size, data_root, download=download)
    pool_x, pool_y = data.pool()
    path = Path(manifest_path) if manifest_path else None

    def check(manifest: dict) -> None:
        if manifest["dataset"] != data.name or manifest["size"] != data.size:
            raise ManifestError(f"site manifest {path} is for {manifest['dataset']} at {manifest['size']} px, "
                                f"the config asks for {data.name} at {data.size} px")

    manifest = load_or_create_manifest(path, create, lambda: make_manifest(cfg, data), data.md5, len(pool_y), check)
    return Experiment(cfg, data, manifest, path, pool_x, pool_y)
