from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cvft.errors import CvftError
from cvft.medical import MedicalMetrics, choose_threshold, medical_metrics
from cvft.medical.plots import reliability_bins


def _ece_reference(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Equal-width bins [lo, hi); |accuracy - confidence| weighted by the bin's share of samples."""
    total = 0.0
    edges = np.linspace(0, 1, n_bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence >= lo) & (confidence < hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_binary_auroc_ece_and_counts_match_references(rng):
    probs = rng.random(300)
    targets = (rng.random(300) < probs).astype(int)
    result = medical_metrics(torch.tensor(probs), torch.tensor(targets), "binary", threshold=0.3, n_bins=10)
    row = result["classes"][0]
    assert row["auroc"] == pytest.approx(roc_auc_score(targets, probs), abs=1e-6)
    assert result["ece"] == pytest.approx(_ece_reference(probs, targets, 10), abs=1e-5)
    predicted = probs >= 0.3
    tp, fn = (predicted & (targets == 1)).sum(), (~predicted & (targets == 1)).sum()
    tn, fp = (~predicted & (targets == 0)).sum(), (predicted & (targets == 0)).sum()
    assert row["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert row["specificity"] == pytest.approx(tn / (tn + fp))
    assert result["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)


def test_two_column_softmax_uses_index_one_as_positive(rng):
    positive = rng.random(50)
    targets = torch.tensor((rng.random(50) < 0.5).astype(int))
    two = torch.tensor(np.stack([1 - positive, positive], 1))
    one = medical_metrics(torch.tensor(positive), targets, "binary", class_names=["normal", "pneumonia"])
    both = medical_metrics(two, targets, class_names=["normal", "pneumonia"])
    assert both["task"] == "binary" and both["classes"][0]["class"] == "pneumonia"
    assert both["classes"][0]["auroc"] == pytest.approx(one["classes"][0]["auroc"])


def test_multiclass_one_vs_rest_auroc_ece_and_recall(rng):
    logits = rng.normal(size=(400, 4)) + np.eye(4)[rng.integers(0, 4, 400)]
    probs = torch.tensor(logits).softmax(1).numpy()
    targets = rng.integers(0, 4, 400)
    result = medical_metrics(torch.tensor(probs), torch.tensor(targets), "multiclass", n_bins=15)
    for c, row in enumerate(result["classes"]):
        assert row["auroc"] == pytest.approx(roc_auc_score(targets == c, probs[:, c]), abs=1e-6)
    predicted = probs.argmax(1)
    assert result["ece"] == pytest.approx(_ece_reference(probs.max(1), predicted == targets, 15), abs=1e-5)
    recalls = [((predicted == c) & (targets == c)).sum() / (targets == c).sum() for c in range(4)]
    assert result["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert result["accuracy"] == pytest.approx((predicted == targets).mean())
    assert result["auroc_macro"] == pytest.approx(np.mean([r["auroc"] for r in result["classes"]]))


def test_multilabel_per_label_auroc_and_thresholds(rng):
    probs = rng.random((200, 3))
    targets = (rng.random((200, 3)) < probs).astype(int)
    thresholds = [0.2, 0.5, 0.8]
    result = medical_metrics(torch.tensor(probs), torch.tensor(targets), threshold=thresholds, class_names=list("abc"))
    assert result["task"] == "multilabel" and result["thresholds"] == thresholds
    for c, row in enumerate(result["classes"]):
        assert row["auroc"] == pytest.approx(roc_auc_score(targets[:, c], probs[:, c]), abs=1e-6)
        predicted = probs[:, c] >= thresholds[c]
        assert row["sensitivity"] == pytest.approx(predicted[targets[:, c] == 1].mean())
        assert row["specificity"] == pytest.approx(1 - predicted[targets[:, c] == 0].mean())
        assert row["ece"] == pytest.approx(_ece_reference(probs[:, c], targets[:, c], 15), abs=1e-5)
    assert result["ece"] == pytest.approx(_ece_reference(probs.ravel(), targets.ravel(), 15), abs=1e-5)


def test_ece_of_a_hand_computed_example():
    # bins of width 0.5: [0.2, 0.4] -> positive rate 0.5 vs confidence 0.3; [0.6, 0.9] -> 1.0 vs 0.75
    probs, targets = torch.tensor([0.2, 0.4, 0.6, 0.9]), torch.tensor([0, 1, 1, 1])
    expected = 0.5 * abs(0.5 - 0.3) + 0.5 * abs(1.0 - 0.75)
    assert medical_metrics(probs, targets, n_bins=2)["ece"] == pytest.approx(expected)
    bins = reliability_bins(probs, targets, n_bins=2)
    assert bins["ece"] == pytest.approx(expected)
    assert bins["counts"].tolist() == [2, 2] and bins["accuracy"].tolist() == [0.5, 1.0]


def test_hand_counted_confusion_matrix():
    # true:      1 1 1 1 0 0 0 0 0 0 ; prob >= 0.5 ->  TP=3, FN=1, TN=4, FP=2
    probs = torch.tensor([0.9, 0.8, 0.6, 0.1, 0.7, 0.55, 0.4, 0.3, 0.2, 0.1])
    targets = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    row = medical_metrics(probs, targets)["classes"][0]
    assert (row["sensitivity"], row["specificity"]) == (0.75, 4 / 6)
    assert (row["positives"], row["negatives"]) == (4, 6)
    assert row["balanced_accuracy"] == pytest.approx((0.75 + 4 / 6) / 2)


def test_youden_and_sensitivity_rules_match_brute_force(rng):
    probs = rng.random(120)
    targets = (rng.random(120) < probs).astype(int)
    candidates = np.sort(np.unique(probs))[::-1]
    sens = np.array([(probs[targets == 1] >= t).mean() for t in candidates])
    spec = np.array([(probs[targets == 0] < t).mean() for t in candidates])
    youden = choose_threshold(torch.tensor(probs), torch.tensor(targets), "youden")
    assert youden == pytest.approx(candidates[np.argmax(sens + spec - 1)], abs=1e-6)
    at_90 = choose_threshold(torch.tensor(probs), torch.tensor(targets), "sensitivity@0.9")
    assert at_90 == pytest.approx(candidates[np.nonzero(sens >= 0.9)[0][0]], abs=1e-6)
    per_class = choose_threshold(torch.tensor(np.stack([probs, 1 - probs], 1)), torch.tensor(targets), "youden")
    assert len(per_class) == 2


def test_rule_threshold_is_applied_and_degenerate_classes_are_nan():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.2, 0.2]])
    targets = torch.tensor([[1, 0], [1, 0], [0, 0]])
    result = medical_metrics(probs, targets, "multilabel", threshold=0.5)
    assert np.isnan(result["classes"][1]["auroc"]) and result["auroc_macro"] == 1.0
    with pytest.raises(CvftError, match="positives"):
        choose_threshold(probs[:, 1], targets[:, 1], "youden")
    with pytest.raises(CvftError, match="argmax"):
        medical_metrics(torch.eye(3), torch.arange(3), "multiclass", threshold=0.5)
    with pytest.raises(CvftError, match="youden"):
        choose_threshold(probs[:, 0], targets[:, 0], "sensitivity=0.9")


def test_medical_metrics_metric_accumulates_batches(rng):
    probs = torch.tensor(rng.random((60, 3))).softmax(1)
    targets = torch.tensor(rng.integers(0, 3, 60))
    metric = MedicalMetrics("multiclass", 3, class_names=["a", "b", "c"], prefix="val/")
    for start in range(0, 60, 20):
        metric.update(probs[start : start + 20], targets[start : start + 20])
    scalars = metric.compute()
    whole = medical_metrics(probs, targets, "multiclass")
    assert float(scalars["val/auroc_macro"]) == pytest.approx(whole["auroc_macro"], abs=1e-6)
    assert "val/auroc/b" in scalars
