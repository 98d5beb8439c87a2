"""Classical models on flattened pixels of the same split (the seed paper's comparison):
logistic regression, SVM, gradient-boosted trees and an MLP, all from scikit-learn."""

from __future__ import annotations

import time

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from tqdm.auto import tqdm

from monai_fl.experiment import Experiment
from monai_fl.keys import POOLED
from monai_fl.tasks.metrics import classification_metrics

MODELS = ("logistic_regression", "svm_rbf", "hist_gradient_boosting", "mlp")


def build_classical(name: str, seed: int):
    """A scikit-learn estimator by name (inputs are standardised where the model needs it)."""
    if name == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    if name == "svm_rbf":
        # Platt-calibrated probabilities for AUC (scikit-learn's replacement for probability=True).
        return make_pipeline(StandardScaler(), CalibratedClassifierCV(SVC(random_state=seed), ensemble=False))
    if name == "hist_gradient_boosting":
        return HistGradientBoostingClassifier(random_state=seed)
    if name == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(256, 128), early_stopping=True,
                                                              max_iter=200, random_state=seed))
    raise ValueError(f"unknown classical model {name}; choose from {', '.join(MODELS)}")


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32) / 255.0


def run_classical(exp: Experiment, models: tuple[str, ...] = MODELS) -> dict:
    """Fit each model on the pooled training cases of the manifest; evaluate like the CNNs."""
    x, y = exp.pooled_train()
    names = list(exp.spec.label_names)
    out = {}
    for name in tqdm(models, desc="classical", unit="model", disable=None):
        t0 = time.perf_counter()
        est = build_classical(name, exp.cfg.train.seed).fit(_flat(x), y)
        r = {POOLED: classification_metrics(exp.pooled_test()[1], est.predict_proba(_flat(exp.pooled_test()[0])), names),
             "sites": {}}
        for site in exp.sites:
            sx, sy = exp.site_test(site)
            r["sites"][site] = classification_metrics(sy, est.predict_proba(_flat(sx)), names)
        r["train_time_s"] = time.perf_counter() - t0
        out[name] = r
    return out
