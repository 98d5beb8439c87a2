"""One experiment, every method, one report: federated (HE and plaintext), centralized, local-only
and classical, all on the same site manifest."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from monai_fl.config import ExperimentConfig
from monai_fl.errors import MonaiFLError
from monai_fl.experiment import prepare
from monai_fl.keys import POOLED, Method
from monai_fl.utils import write_json

ALL_METHODS = tuple(m.value for m in Method)


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: Path,
    data_root: str | os.PathLike | None = None,
    manifest: Path | None = None,
    methods: tuple[str, ...] = ALL_METHODS,
) -> dict:
    """Run ``methods`` on one split and write ``results.json`` plus the report into ``out_dir``.

    ``results.json`` is rewritten after every method, so a later failure loses nothing finished.
    """
    from monai_fl.report.report import write_report

    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise MonaiFLError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_METHODS)}")
    if Method.CLASSICAL.value in methods and cfg.task != "classification":
        if methods == (Method.CLASSICAL.value,):
            raise MonaiFLError("classical baselines (models on flattened pixels) exist for classification only")
        methods = tuple(m for m in methods if m != Method.CLASSICAL.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    exp = prepare(cfg, data_root, manifest or out_dir / "manifest.json")
    cfg.save(out_dir / "config.yaml")
    m = exp.manifest
    results = {
        "experiment": cfg.name, "task": cfg.task, "config": cfg.to_dict(), "manifest": str(exp.manifest_path),
        "dataset": {"name": m["dataset"], "md5": m["dataset_md5"], "size": m.get("size"), "labels": m.get("label_names")},
        "split": {"scheme": m.get("scheme"), "seed": m.get("seed"),
                  "sites": {s: {"n_train": e["n_train"], "n_test": e["n_test"], "class_counts": e.get("class_counts")}
                            for s, e in m["sites"].items()}},
        "methods": {}, "timing_s": {},
    }
    results_path = out_dir / "results.json"
    models = {}
    for method in methods:
        t0 = time.perf_counter()
        results["methods"][method], models[method] = _run_method(method, exp, out_dir, data_root)
        results["timing_s"][method] = time.perf_counter() - t0
        write_json(results, results_path)
    if Method.CENTRALIZED.value in models:
        import torch

        torch.save(models[Method.CENTRALIZED.value].state_dict(), out_dir / "centralized_model.pt")
    if cfg.task == "segmentation":
        results["figures"] = _segmentation_figures(exp, models, out_dir)
        write_json(results, results_path)
    write_report(results, out_dir)
    return results


def _run_method(method: str, exp, out_dir: Path, data_root):
    """(result, trained model or None) of one method."""
    from monai_fl.baselines.deep import run_centralized, run_local

    if method in (Method.FL_HE.value, Method.FL_PLAIN.value):
        return _run_federated(exp, out_dir, data_root, he=method == Method.FL_HE.value)
    if method == Method.CENTRALIZED.value:
        return run_centralized(exp)
    if method == Method.LOCAL.value:
        return run_local(exp), None
    from monai_fl.baselines.classical import run_classical

    return run_classical(exp), None


def _run_federated(exp, out_dir: Path, data_root, he: bool):
    """Simulator run; then the pooled test evaluation of the final model a site holds."""
    from monai_fl.fl.simulate import load_site_model, run_simulation

    r = run_simulation(exp.cfg, exp.manifest_path, data_root, out_dir, he=he)
    # The server holds no plaintext model under HE; the researcher evaluates the model a site
    # decrypted (in the simulator every site is on this machine). Every site must agree on it.
    model = load_site_model(Path(r["workspace"]), exp.cfg, exp.sites[0])
    r[POOLED] = exp.evaluate(model, exp.test_loader(None))
    r["pooled_consistent_across_sites"] = _consistent(r[POOLED], r.pop("pooled_reported"))
    return r, model


def _segmentation_figures(exp, models: dict, out_dir: Path, n_cases: int = 3) -> dict:
    """Reference vs predicted contours on a few pooled-test volumes, for the best-placed model
    (federated HE, else plaintext, else centralized)."""
    from monai_fl.report.slices import save_case_figures
    from monai_fl.tasks.segmentation_experiment import case_names

    for method in (Method.FL_HE.value, Method.FL_PLAIN.value, Method.CENTRALIZED.value):
        if models.get(method) is not None:
            names = case_names(exp, exp.test_indices(None))
            paths = save_case_figures(models[method], exp.test_loader(None), exp.spec, exp.cfg.segmentation,
                                      out_dir / "figures", n_cases=n_cases, names=names)
            return {"model": method, "paths": [str(p.relative_to(out_dir)) for p in paths]}
    return {}


def _consistent(pooled: dict, reported: dict, tol: float = 1e-6) -> bool:
    """Every site's own pooled-test figures equal the researcher's evaluation of the final model."""
    for site_figures in reported.values():
        for key, value in site_figures.items():
            mine = pooled.get(key)
            if isinstance(mine, float) and not (math.isnan(mine) and math.isnan(value)) and abs(mine - value) > tol:
                return False
    return bool(reported)
