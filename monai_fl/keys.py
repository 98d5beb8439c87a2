"""Metric and message keys shared by tasks, FL wiring and reports, so names never drift."""

from enum import Enum


class MetricKey(str, Enum):
    """Metric names as they appear in results.json, reports and NVFlare metric messages."""

    AUC = "auc"
    ACC = "acc"
    LOSS = "loss"
    DICE = "dice"
    HD95 = "hd95"
    MEAN_DICE = "mean_dice"
    MEAN_HD95 = "mean_hd95"
    PER_CLASS = "per_class"
    CONFUSION = "confusion_matrix"
    N = "n"


class Method(str, Enum):
    """Training methods compared in one report."""

    FL_HE = "fl_he"
    FL_PLAIN = "fl_plain"
    CENTRALIZED = "centralized"
    LOCAL = "local"
    CLASSICAL = "classical"


DATA_ENV = "MONAI_FL_DATA"
POOLED = "pooled"
