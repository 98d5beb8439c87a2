"""A segmentation experiment: an MSD datalist, its site manifest and the segmentation task code,
behind the task-agnostic :class:`monai_fl.experiment.TaskExperiment` interface.

The baselines, :func:`monai_fl.evaluation.evaluate_everywhere` and the federated site call only
that interface, so they run segmentation exactly as they run classification.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from torch import nn

from monai_fl.config import ExperimentConfig
from monai_fl.data.msd import MSDDatalist, build_msd_manifest, check_msd_manifest, load_msd, msd_task
from monai_fl.data.partition import load_or_create_manifest, site_entry
from monai_fl.errors import DataFormatError, MonaiFLError
from monai_fl.tasks import segmentation as seg


@dataclass
class SegmentationExperiment:
    """An MSD segmentation task split among sites; implements ``TaskExperiment``.

    Preprocessed volumes are cached per split on first use and reused by later loaders (every
    round of a federated run, every model evaluated by ``evaluate_everywhere``).
    """

    cfg: ExperimentConfig
    data: MSDDatalist
    manifest: dict
    manifest_path: Path | None
    spec: seg.SegSpec
    _datasets: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    def train_indices(self, site: str | None = None) -> list[int]:
        """Datalist indices of ``site``'s training cases (None: every site's, pooled)."""
        if site is not None:
            return list(site_entry(self.manifest, site)["train_indices"])
        return sorted(i for e in self.manifest["sites"].values() for i in e["train_indices"])

    def test_indices(self, site: str | None = None) -> list[int]:
        """Datalist indices of ``site``'s test shard (None: the whole held-out test set)."""
        if site is not None:
            return list(site_entry(self.manifest, site)["test_indices"])
        return list(self.manifest["test_indices"])

    def build_model(self) -> nn.Module:
        return seg.build_seg_network(self.cfg.network, self.spec)

    def loss(self) -> nn.Module:
        return seg.build_seg_loss()

    def train_loader(self, site: str | None = None) -> Iterable:
        """Shuffled ``(image, label)`` patch batches; each call restarts the seeded random stream."""
        t = self.cfg.train
        return seg.make_seg_loader(self._dataset("train", site), "train", t.batch_size, t.seed)

    def test_loader(self, site: str | None = None) -> Iterable:
        """Whole ``(image, label)`` volumes of ``site``'s test shard (None: the pooled test set)."""
        return seg.make_seg_loader(self._dataset("eval", site), "eval", 1)

    def evaluate(self, model: nn.Module, loader: Iterable) -> dict:
        return seg.evaluate(model, loader, self.spec, self.cfg.segmentation)

    def _dataset(self, stage: str, site: str | None):
        key = (stage, site)
        if key not in self._datasets:
            indices = self.train_indices(site) if stage == "train" else self.test_indices(site)
            self._datasets[key] = seg.make_seg_dataset(self.data.datalist(indices), stage, self.spec,
                                                       self.cfg.segmentation, self.cfg.train.augment)
        return self._datasets[key]


def make_seg_manifest(cfg: ExperimentConfig, data: MSDDatalist) -> dict:
    """Hold out ``cfg.segmentation.test_fraction`` of the cases and split the rest as ``cfg.partition`` says."""
    p = cfg.partition
    return build_msd_manifest(data, p.n_sites, p.scheme, p.seed, cfg.segmentation.test_fraction)


def prepare_segmentation(
    cfg: ExperimentConfig,
    data_root: str | os.PathLike | None = None,
    manifest_path: str | os.PathLike | None = None,
    create: bool = True,
) -> SegmentationExperiment:
    """Locate the MSD task, read or create its site manifest and return the experiment.

    The datalist is fully validated (shapes, affines, label values) when a manifest is created,
    which records the ``dataset.json`` MD5; a run that reuses the manifest only checks that the MD5
    matches and every listed file exists.

    Args:
        cfg: experiment config with ``task: segmentation`` and an MSD dataset name (``msd_hippocampus``).
        data_root: user-given folder (``--data-root``), searched before ``$MONAI_FL_DATA/msd/<Task>``.
        manifest_path: site manifest file; when absent and ``create``, it is written there.
        create: write a new manifest if ``manifest_path`` does not exist.

    Raises:
        DataNotFoundError: no ``dataset.json`` in any searched folder.
        DataFormatError: a listed file is missing or a case is inconsistent.
        ManifestError: the manifest belongs to another datalist or disagrees with the config.
    """
    path = Path(manifest_path) if manifest_path else None
    reuse = path is not None and path.exists()
    data = load_msd(cfg.dataset.name, data_root, validate=not reuse)
    p = cfg.partition
    manifest = load_or_create_manifest(
        path, create, lambda: make_seg_manifest(cfg, data), data.md5, len(data.cases),
        lambda m: check_msd_manifest(m, data, path, p.n_sites, p.scheme, cfg.segmentation.test_fraction))
    spec = seg.SegSpec.from_config(cfg.segmentation, data.n_channels, data.labels)
    _check_matches_config(spec, cfg, data)
    return SegmentationExperiment(cfg, data, manifest, path, spec)


def spec_for_config(cfg: ExperimentConfig) -> seg.SegSpec:
    """The network's input/output description from the config alone, for the FL server (no data).

    Channels and classes come from ``segmentation.in_channels``/``class_names`` when set, else
    from the official MSD task's ``dataset.json`` (:data:`monai_fl.data.msd.MSD_TASKS`).

    Raises:
        MonaiFLError: a custom task whose config does not give channels and classes.
    """
    s, task = cfg.segmentation, msd_task(cfg.dataset.name)
    in_channels = s.in_channels or (len(task.modalities) if task else 0)
    labels = ("background", *s.class_names) if s.class_names else (task.labels if task else ())
    if not in_channels or not labels:
        raise MonaiFLError(f"dataset '{cfg.dataset.name}' is not an official MSD task: set segmentation.in_channels "
                           "and segmentation.class_names so the network can be built without the data")
    return seg.SegSpec.from_config(s, in_channels, labels)


def model_for_config(cfg: ExperimentConfig) -> nn.Module:
    """The experiment's network from its config alone (what the FL server starts from)."""
    return seg.build_seg_network(cfg.network, spec_for_config(cfg))


def _check_matches_config(spec: seg.SegSpec, cfg: ExperimentConfig, data: MSDDatalist) -> None:
    """A site whose datalist differs in channels or classes from what the config implies would
    train a network of another shape than the server's; say so before any training."""
    try:
        expected = spec_for_config(cfg)
    except MonaiFLError:
        return  # custom task without declared shape: the datalist is the only source
    if (expected.in_channels, expected.num_classes) != (spec.in_channels, spec.num_classes):
        raise DataFormatError(
            f"{data.path} declares {spec.in_channels} modalities and {spec.num_classes} classes "
            f"({', '.join(data.labels)}), but the config's {cfg.dataset.name} means {expected.in_channels} and "
            f"{expected.num_classes}; fix segmentation.in_channels/class_names or the dataset name")


def case_names(exp: SegmentationExperiment, indices: Iterable[int]) -> list[str]:
    """File-derived names of datalist cases (for figure titles at the site that holds them)."""
    return [exp.data.cases[int(i)].name for i in indices]
