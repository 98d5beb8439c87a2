"""The site side of every monai-fl job: NVFlare Client API wiring around the task interface.

It handles ``train`` (evaluate the received global model on the site's shard, train local epochs
on the global schedule, send weights + metrics), ``validate`` (metrics of the received model) and
``submit_model``. The site finds its data and manifest from site-local config
(:mod:`monai_fl.fl.site_config`), never from the server. HE is not here: the job attaches it as
filters, so this script is identical with and without encryption.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import torch

from monai_fl.config import ExperimentConfig
from monai_fl.experiment import prepare
from monai_fl.fl.model import ConfiguredNetwork
from monai_fl.fl.site_config import resolve_site_paths
from monai_fl.keys import POOLED
from monai_fl.tasks.loop import build_optimizer, cycle_batches, lr_at, train_epochs, train_steps
from monai_fl.utils import seed_everything

log = logging.getLogger("monai_fl.client")

NUM_STEPS_KEY = "NUM_STEPS_CURRENT_ROUND"  # NVFlare's FLMetaKey.NUM_STEPS_CURRENT_ROUND
FINAL_MODEL_FILE = "global_model_final.pt"
MODELS_DIR = "models"  # <site workspace>/models/<job id>/global_model_final.pt


def final_model_path(workspace: Path, job_id: str) -> Path:
    """Where a site keeps the final global model of a job (one folder per job, nothing overwritten)."""
    return Path(workspace) / MODELS_DIR / job_id / FINAL_MODEL_FILE


def scalar_metrics(metrics: dict, prefix: str = "") -> dict:
    """The scalar headline metrics only (no per-case data, no curves) for the wire."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


class Site:
    """One site's state across rounds: experiment, model, data loaders."""

    def __init__(self, cfg: ExperimentConfig, site: str, workspace: Path):
        self.cfg, self.site, self.workspace = cfg, site, workspace
        paths = resolve_site_paths(workspace)
        self.exp = prepare(cfg, paths.data_root, paths.manifest, create=False, download=False)
        if site not in self.exp.sites:
            raise ValueError(f"site '{site}' is not in the site manifest {paths.manifest} (sites: {', '.join(self.exp.sites)})")
        # Sites get distinct seeds so their augmentation streams differ, as they would in reality.
        seed_everything(cfg.train.seed + self.exp.sites.index(site), cfg.train.threads)
        self.model = ConfiguredNetwork(cfg.to_dict())
        self.train_loader = self.exp.train_loader(site)
        self.test_loader = self.exp.test_loader(site)
        self.loss = self.exp.loss()
        self._optimizer: torch.optim.Optimizer | None = None
        self._batches = None  # persistent batch stream for rounds of part of an epoch
        log.info("%s: data from %s", site, paths.source)

    def optimizer(self) -> torch.optim.Optimizer:
        """This round's optimiser: fresh, or the site's own from the last round (``fl.site_optimizer``).

        A kept optimiser stays valid because ``load`` copies the global weights into the same
        parameter tensors; its state never leaves the site.
        """
        if self.cfg.fl.site_optimizer == "reset" or self._optimizer is None:
            self._optimizer = build_optimizer(self.model, self.cfg.train)
        return self._optimizer

    def load(self, params: dict) -> None:
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})

    def evaluate(self, pooled: bool = False) -> dict:
        metrics = scalar_metrics(self.exp.evaluate(self.model, self.test_loader))
        if pooled:
            metrics.update(scalar_metrics(self.exp.evaluate(self.model, self.exp.test_loader(None)), f"{POOLED}_"))
        return metrics

    def train(self, current_round: int) -> tuple[dict, dict]:
        """One round of local training on the global cosine schedule.

        ``fl.local_epochs`` whole epochs, or, when it is fractional (e.g. 0.5), that share of an
        epoch's steps drawn from a stream that continues across rounds.
        """
        fl = self.cfg.fl
        optimizer = self.optimizer()
        total = fl.rounds * fl.local_epochs
        desc = f"{self.site} round {current_round + 1}/{fl.rounds}"
        if float(fl.local_epochs).is_integer():
            history = train_epochs(self.model, self.train_loader, optimizer, self.loss, self.cfg.train,
                                   current_round * int(fl.local_epochs), int(fl.local_epochs), total, desc=desc)
            record = {"loss": history[-1]["loss"], "steps": sum(h["steps"] for h in history), "n": history[-1]["n"]}
        else:
            if self._batches is None:
                self._batches = cycle_batches(self.train_loader)
            n_steps = max(1, math.ceil(len(self.train_loader) * fl.local_epochs))
            lr = lr_at(self.cfg.train, current_round * fl.local_epochs, total)
            record = train_steps(self.model, self._batches, n_steps, optimizer, self.loss, lr, desc=desc)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}, {
            "train_loss": record["loss"], "steps": record["steps"], "n_train": record["n"]}


def _job_file(name: str) -> Path:
    """A file shipped in the job's custom folder (beside the entry script that NVFlare ran)."""
    import sys

    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    return Path(sys.argv[0]).resolve().parent / name


def main(argv: list[str] | None = None) -> None:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel

    parser = argparse.ArgumentParser(description="monai-fl site script (run by NVFlare)")
    parser.add_argument("--config", required=True, help="experiment config shipped with the job")
    args = parser.parse_args(argv)

    flare.init()
    site_name = flare.get_site_name()
    cfg = ExperimentConfig.load(_job_file(args.config))
    site = Site(cfg, site_name, Path(os.getcwd()))
    model_path = final_model_path(site.workspace, flare.get_job_id())

    while flare.is_running():
        incoming = flare.receive()
        if incoming is None:
            break
        if flare.is_submit_model():
            flare.send(FLModel(params=site.model.state_dict()))
            continue
        site.load(incoming.params)
        if flare.is_evaluate():
            metrics = site.evaluate(pooled=True)
            model_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(site.model.state_dict(), model_path)
            log.info("%s: final global model %s saved to %s", site_name, metrics, model_path)
            flare.send(FLModel(metrics=metrics))
            continue
        r = incoming.current_round or 0
        metrics = site.evaluate()
        params, info = site.train(r)
        metrics.update(train_loss=info["train_loss"], n_train=info["n_train"])
        flare.send(FLModel(params=params, metrics=metrics, meta={NUM_STEPS_KEY: info["steps"]}))


if __name__ == "__main__":
    main()
