"""Classification metrics: AUC (binary, or one-vs-rest macro), accuracy, per-class figures, confusion matrix.

AUC comes from MONAI's ``compute_roc_auc``; per-class precision/recall and the confusion matrix from
scikit-learn. Tests check the figures against scikit-learn's own AUC/accuracy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_curve

from monai_fl.keys import MetricKey

ROC_POINTS = 101


def auc_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC: binary (probability of class 1) or macro one-vs-rest; NaN if a class is absent."""
    y_true = np.asarray(y_true)
    k = probs.shape[1]
    if len(np.unique(y_true)) < 2:
        return math.nan
    if k == 2:
        return float(compute_roc_auc(torch.as_tensor(probs[:, 1]), torch.as_tensor(y_true)))
    onehot = np.eye(k)[y_true]
    present = onehot.sum(0) > 0
    # MONAI averages over every column; one-vs-rest AUC is undefined for a class with no positives.
    return float(compute_roc_auc(torch.as_tensor(probs[:, present]), torch.as_tensor(onehot[:, present]), average="macro"))


def roc_points(y_true: np.ndarray, probs: np.ndarray) -> dict | None:
    """A down-sampled ROC curve (binary: class 1; multi-class: micro-average). Aggregate only, no case IDs."""
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return None
    k = probs.shape[1]
    if k == 2:
        fpr, tpr, _ = roc_curve(y_true, probs[:, 1])
    else:
        fpr, tpr, _ = roc_curve(np.eye(k)[y_true].ravel(), probs.ravel())
    grid = np.linspace(0, 1, ROC_POINTS)
    return {"fpr": grid.round(4).tolist(), "tpr": np.interp(grid, fpr, tpr).round(4).tolist()}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, label_names: list[str]) -> dict:
    """All figures the reports need, from labels and class probabilities.

    Args:
        y_true: (N,) integer labels.
        probs: (N, K) class probabilities.
        label_names: K class names.

    Returns:
        ``{auc, acc, n, per_class: {name: {precision, recall, f1, support}}, confusion_matrix, roc}``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    k = len(label_names)
    pred = probs.argmax(1)
    prec, rec, f1, sup = precision_recall_fscore_support(y_true, pred, labels=range(k), zero_division=0)
    return {
        MetricKey.AUC.value: auc_score(y_true, probs),
        MetricKey.ACC.value: float((pred == y_true).mean()) if len(y_true) else math.nan,
        MetricKey.N.value: int(len(y_true)),
        MetricKey.PER_CLASS.value: {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(label_names, prec, rec, f1, sup)
        },
        MetricKey.CONFUSION.value: confusion_matrix(y_true, pred, labels=range(k)).tolist(),
        "roc": roc_points(y_true, probs),
    }
