import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

from monai_fl.tasks.metrics import auc_score, classification_metrics

RNG = np.random.default_rng(0)


def _probs(n, k):
    logits = RNG.normal(size=(n, k))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_auc_and_acc_equal_sklearn(k):
    y = RNG.integers(0, k, 400)
    p = _probs(400, k)
    p[np.arange(400), y] += 0.3  # some signal
    p /= p.sum(1, keepdims=True)
    m = classification_metrics(y, p, [str(i) for i in range(k)])
    expected_auc = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert m["auc"] == pytest.approx(expected_auc, abs=1e-9)
    assert m["acc"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert m["confusion_matrix"] == confusion_matrix(y, p.argmax(1)).tolist()
    assert sum(v["support"] for v in m["per_class"].values()) == 400
    assert 0.5 < m["auc"] < 1


def test_fixed_binary_case_by_hand():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    p = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, p, ["neg", "pos"])
    assert m["auc"] == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ranked right
    assert m["acc"] == pytest.approx(0.75)  # argmax [0, 0, 0, 1] vs [0, 0, 1, 1]
    assert m["per_class"]["pos"]["recall"] == pytest.approx(0.5)
    assert m["roc"]["tpr"][-1] == 1.0


def test_single_class_shard_gives_nan_auc_not_a_crash():
    y = np.zeros(10, int)
    assert math.isnan(auc_score(y, _probs(10, 2)))


def test_multiclass_with_absent_class_matches_sklearn_on_present_classes():
    y = RNG.choice([0, 1, 3], 300)
    p = _probs(300, 4)
    present = [0, 1, 3]
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in present])
    assert auc_score(y, p) == pytest.approx(expected)
