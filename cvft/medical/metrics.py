"""Metrics clinicians ask for: per-class AUROC, sensitivity and specificity at an operating point, calibration.

Inputs are probabilities, not logits: softmax outputs for ``task="multiclass"``, sigmoid outputs for ``"binary"``
and ``"multilabel"``. A two-class softmax model is a binary problem whose positive class is index 1: pass its
``(N, 2)`` probabilities (column 1 is used) or column 1 alone.

Conventions:

* Binary and multi-label decisions are ``prob >= threshold`` (one threshold, or one per label); multi-class
  decisions are the argmax, and each class is scored one-vs-rest from the confusion matrix.
* Balanced accuracy is the mean recall over classes (binary: ``(sensitivity + specificity) / 2``; multi-label: the
  mean of that over labels).
* ECE (expected calibration error) uses ``n_bins`` equal-width bins and the l1 norm (torchmetrics): binary compares
  the positive-class probability with the positive rate, multi-class the top-1 confidence with the top-1 accuracy,
  multi-label pools every (image, label) pair as one binary problem (per-label ECE is in the per-class rows).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_calibration_error,
    binary_roc,
    multiclass_auroc,
    multiclass_calibration_error,
    multilabel_auroc,
)

from cvft.errors import CvftError

__all__ = ["TASKS", "MedicalMetrics", "choose_threshold", "flatten_metrics", "medical_metrics", "to_probabilities"]

Task = Literal["binary", "multiclass", "multilabel"]
TASKS: tuple[str, ...] = ("binary", "multiclass", "multilabel")
"""Accepted ``task`` values."""

_RULE = re.compile(r"^(sensitivity|specificity)@(0?\.\d+|1(\.0*)?)$")


def to_probabilities(logits: Tensor, task: Task) -> Tensor:
    """Softmax for multi-class, sigmoid for binary and multi-label outputs.

    Example:
        >>> to_probabilities(torch.tensor([[0.0, 0.0]]), "multiclass")
        tensor([[0.5000, 0.5000]])
    """
    _check_task(task)
    return logits.softmax(-1) if task == "multiclass" else logits.sigmoid()


def choose_threshold(probs: Tensor, targets: Tensor, rule: str) -> float | list[float]:
    """Choose the decision threshold of a binary problem (or of each column) on validation data.

    Rules: ``"youden"`` maximises sensitivity + specificity - 1; ``"sensitivity@0.9"`` is the highest threshold whose
    sensitivity reaches 0.9 (so the best specificity under that constraint); ``"specificity@0.95"`` is the lowest
    threshold whose specificity reaches 0.95. Decisions are ``prob >= threshold``.

    Args:
        probs: ``(N,)`` positive-class probabilities, or ``(N, C)``: one threshold per column.
        targets: ``(N,)`` 0/1 labels for 1-D ``probs``; ``(N, C)`` 0/1 labels, or ``(N,)`` class indices
            (one-vs-rest), for 2-D ``probs``.
        rule: ``"youden"``, ``"sensitivity@<x>"`` or ``"specificity@<x>"``.

    Returns:
        A float for 1-D ``probs``, else a list with one threshold per column.

    Example:
        >>> choose_threshold(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]), "youden")
        0.800000011920929
        >>> choose_threshold(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]), "sensitivity@1.0")
        0.3499999940...
    """
    _parse_rule(rule)
    probs = torch.as_tensor(probs).detach().float().cpu()
    targets = torch.as_tensor(targets).detach().cpu()
    if probs.ndim == 1:
        return _threshold_for(probs, targets.long(), rule)
    if targets.ndim == 1:
        targets = torch.nn.functional.one_hot(targets.long(), probs.shape[1])
    return [_threshold_for(probs[:, c], targets[:, c].long(), rule) for c in range(probs.shape[1])]


def medical_metrics(
    probs: Tensor,
    targets: Tensor,
    task: Task | None = None,
    threshold: float | Sequence[float] | str | None = None,
    class_names: Sequence[str] | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Per-class AUROC, sensitivity, specificity and ECE, plus macro summaries, in one call.

    Args:
        probs: Probabilities: ``(N,)`` or ``(N, 2)`` (binary; column 1 is the positive class), ``(N, C)`` softmax
            (multiclass) or ``(N, C)`` sigmoid (multilabel).
        targets: ``(N,)`` class indices (binary, multiclass) or ``(N, C)`` 0/1 (multilabel).
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``; guessed from the shapes when ``None`` (2-D targets:
            multilabel; one or two probability columns: binary; else multiclass).
        threshold: Binary / multi-label operating point: a float, one float per label, or a rule for
            :func:`choose_threshold` applied to these same data (do that on validation data, then pass the numbers
            to the test set). ``None`` means 0.5. Multi-class decisions are always the argmax.
        class_names: Names of the classes (binary: one name for the positive class, or two names of which the
            second is positive).
        n_bins: Equal-width bins of the ECE.

    Returns:
        ``task``, ``n_samples``, ``n_bins``, ``thresholds`` (``None`` for multiclass), ``classes`` (one row per class:
        ``class``, ``auroc``, ``sensitivity``, ``specificity``, ``balanced_accuracy``, ``ece``, ``threshold``,
        ``positives``, ``negatives``) and the summaries ``auroc_macro``, ``sensitivity_macro``,
        ``specificity_macro``, ``balanced_accuracy``, ``accuracy`` and ``ece``. A class without positives or without
        negatives has AUROC ``nan``; macro means skip ``nan``.

    Example:
        >>> probs = torch.tensor([0.9, 0.2, 0.6, 0.3])
        >>> targets = torch.tensor([1, 0, 0, 1])
        >>> result = medical_metrics(probs, targets, threshold=0.5, class_names=["benign", "malignant"])
        >>> row = result["classes"][0]
        >>> row["class"], row["auroc"], row["sensitivity"], row["specificity"], result["balanced_accuracy"]
        ('malignant', 0.75, 0.5, 0.5, 0.5)
    """
    if n_bins < 1:
        raise CvftError(f"n_bins must be >= 1, got {n_bins}.")
    probs, targets, task, names = _prepare(probs, targets, task, class_names)
    if task == "multiclass":
        if threshold is not None:
            raise CvftError(
                f"threshold={threshold!r} was given for a multiclass problem, whose decision is the argmax; "
                "leave threshold out, or use task='multilabel' for independent per-class decisions."
            )
        return _multiclass(probs, targets, names, n_bins)
    return _binary_columns(probs, targets, task, threshold, names, n_bins)


def flatten_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalars of a :func:`medical_metrics` result for loggers: summaries, then ``auroc/<class>`` and friends.

    Example:
        >>> result = medical_metrics(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]), class_names=["pneumonia"])
        >>> sorted(flatten_metrics(result, "val/"))[:3]
        ['val/accuracy', 'val/auroc/pneumonia', 'val/auroc_macro']
    """
    keys = ("auroc_macro", "sensitivity_macro", "specificity_macro", "balanced_accuracy", "accuracy", "ece")
    flat = {f"{prefix}{key}": float(result[key]) for key in keys}
    for row in result["classes"]:
        for key in ("auroc", "sensitivity", "specificity"):
            flat[f"{prefix}{key}/{row['class']}"] = float(row[key])
    return flat


class MedicalMetrics(Metric):
    """:func:`medical_metrics` as a torchmetrics ``Metric``: accumulate probabilities across batches (and ranks).

    ``compute()`` returns :func:`flatten_metrics`'s scalars as tensors, for ``self.log_dict(...)`` at epoch end.

    Args:
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        num_classes: Number of classes (binary: 1 or 2).
        threshold: Operating point (see :func:`medical_metrics`).
        class_names: Class names used in the metric keys.
        n_bins: ECE bins.
        prefix: Prepended to every key (``"val/"``).

    Example:
        >>> metric = MedicalMetrics("multiclass", 3, prefix="val/")
        >>> metric.update(torch.eye(3)[[0, 1, 2, 2]] * 0.8 + 0.2 / 3, torch.tensor([0, 1, 2, 1]))
        >>> round(float(metric.compute()["val/balanced_accuracy"]), 4)
        0.8333
    """

    full_state_update = False

    def __init__(
        self,
        task: Task,
        num_classes: int,
        threshold: float | Sequence[float] | str | None = None,
        class_names: Sequence[str] | None = None,
        n_bins: int = 15,
        prefix: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_task(task)
        self.task, self.num_classes, self.threshold = task, num_classes, threshold
        self.class_names = list(class_names) if class_names is not None else None
        self.n_bins, self.prefix = n_bins, prefix
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Store a batch of probabilities and targets."""
        self.probs.append(probs.detach().float())
        self.targets.append(targets.detach())

    def compute(self) -> dict[str, Tensor]:
        """Scalars of :func:`medical_metrics` over everything stored."""
        probs = torch.cat(self.probs) if isinstance(self.probs, list) else self.probs
        targets = torch.cat(self.targets) if isinstance(self.targets, list) else self.targets
        result = medical_metrics(probs, targets, self.task, self.threshold, self.class_names, self.n_bins)
        return {k: torch.tensor(v) for k, v in flatten_metrics(result, self.prefix).items()}


# ---------------------------------------------------------------------------------------------------- internals


def _prepare(
    probs: Tensor, targets: Tensor, task: str | None, class_names: Sequence[str] | None
) -> tuple[Tensor, Tensor, str, list[str]]:
    """Validated CPU tensors in canonical shapes (binary: one column), the task and one name per column."""
    probs = torch.as_tensor(probs).detach().float().cpu()
    targets = torch.as_tensor(targets).detach().cpu()
    task = task or _guess_task(probs, targets)
    _check_task(task)
    probs, targets = _canonical(probs, targets, task)
    return probs, targets, task, _class_names(class_names, probs.shape[1], task)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise CvftError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")


def _guess_task(probs: Tensor, targets: Tensor) -> str:
    if targets.ndim == 2:
        return "multilabel"
    return "binary" if probs.ndim == 1 or probs.shape[1] <= 2 else "multiclass"


def _canonical(probs: Tensor, targets: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """Binary becomes one probability column and one 0/1 target column; multiclass keeps (N, C) and (N,)."""
    if task == "binary":
        if probs.ndim == 2 and probs.shape[1] == 2:
            probs = probs[:, 1]
        probs, targets = probs.reshape(-1, 1), targets.reshape(-1, 1)
    if len(probs) != len(targets) or probs.ndim != 2:
        raise CvftError(
            f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} do not fit a {task} problem: expected "
            "(N,) or (N, 2) probabilities for binary, (N, C) for multiclass and multilabel, with N targets."
        )
    if task != "multiclass" and (targets.shape != probs.shape or not set(targets.unique().tolist()) <= {0, 1}):
        raise CvftError(f"{task} targets must be 0/1 of the probabilities' shape {tuple(probs.shape)}.")
    if task == "multiclass" and (targets.ndim != 1 or int(targets.max()) >= probs.shape[1] or int(targets.min()) < 0):
        raise CvftError(f"multiclass targets must be class indices in [0, {probs.shape[1]}), one per image.")
    if probs.numel() and (float(probs.min()) < 0 or float(probs.max()) > 1):
        raise CvftError("probs must be probabilities in [0, 1]: apply softmax or sigmoid (to_probabilities) first.")
    return probs.contiguous(), targets.long().contiguous()


def _class_names(class_names: Sequence[str] | None, columns: int, task: str) -> list[str]:
    if class_names is None:
        return ["positive"] if task == "binary" else [str(i) for i in range(columns)]
    names = [str(n) for n in class_names]
    if task == "binary" and len(names) == 2:
        return names[1:]
    if len(names) != columns:
        raise CvftError(f"{len(names)} class names for {columns} {task} outputs; pass one name per class.")
    return names


def _thresholds(threshold: float | Sequence[float] | str | None, probs: Tensor, targets: Tensor) -> list[float]:
    columns = probs.shape[1]
    if threshold is None:
        return [0.5] * columns
    if isinstance(threshold, str):
        return [_threshold_for(probs[:, c], targets[:, c], threshold) for c in range(columns)]
    values = [float(threshold)] * columns if isinstance(threshold, int | float) else [float(t) for t in threshold]
    if len(values) != columns:
        raise CvftError(f"{len(values)} thresholds for {columns} outputs; pass one float or one per class.")
    return values


def _parse_rule(rule: str) -> tuple[str, float]:
    if rule == "youden":
        return rule, 0.0
    match = _RULE.match(str(rule))
    if not match:
        raise CvftError(
            f"Unknown operating-point rule {rule!r}; use 'youden', 'sensitivity@0.9' or 'specificity@0.95' "
            "(a target rate in (0, 1]), or give the threshold as a number."
        )
    return match.group(1), float(match.group(2))


def _threshold_for(probs: Tensor, targets: Tensor, rule: str) -> float:
    kind, target_rate = _parse_rule(rule)
    positives, negatives = int(targets.sum()), int((1 - targets).sum())
    if positives == 0 or negatives == 0:
        raise CvftError(
            f"Cannot choose a threshold by {rule!r}: the data hold {positives} positives and {negatives} negatives; "
            "choosing needs both (use a larger validation set, or give the threshold as a number)."
        )
    fpr, tpr, thresholds = binary_roc(
        probs.contiguous(), targets
    )  # thresholds descending; point i predicts prob >= thresholds[i]
    if kind == "youden":
        index = int(torch.argmax(tpr - fpr))
    elif kind == "sensitivity":
        index = int(torch.nonzero(tpr >= target_rate - 1e-12)[0])
    else:
        index = int(torch.nonzero(1 - fpr >= target_rate - 1e-12)[-1])
    return min(float(thresholds[index]), 1.0)


def _rate(numerator: Tensor, denominator: Tensor) -> float:
    return float(numerator) / float(denominator) if float(denominator) > 0 else math.nan


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _row(name: str, auroc: float, tp: Tensor, fn: Tensor, tn: Tensor, fp: Tensor) -> dict[str, Any]:
    sensitivity, specificity = _rate(tp, tp + fn), _rate(tn, tn + fp)
    return {
        "class": name,
        "auroc": auroc,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "ece": math.nan,
        "threshold": math.nan,
        "positives": int(tp + fn),
        "negatives": int(tn + fp),
    }


def _auroc_or_nan(value: Tensor, targets: Tensor) -> float:
    return float(value) if 0 < int(targets.sum()) < len(targets) else math.nan


def _binary_columns(
    probs: Tensor, targets: Tensor, task: str, threshold: Any, names: list[str], n_bins: int
) -> dict[str, Any]:
    thresholds = _thresholds(threshold, probs, targets)
    predicted = (probs >= torch.tensor(thresholds)).long()
    with warnings.catch_warnings():  # a label without positives or negatives warns; its AUROC becomes nan below
        warnings.simplefilter("ignore", UserWarning)
        if task == "binary":
            aurocs = binary_auroc(probs[:, 0], targets[:, 0]).reshape(1)
        else:
            aurocs = multilabel_auroc(probs, targets, num_labels=probs.shape[1], average=None)
    rows = []
    for c, name in enumerate(names):
        p, t = predicted[:, c], targets[:, c]
        row = _row(name, _auroc_or_nan(aurocs[c], t), (p & t).sum(), ((1 - p) & t).sum(), ((1 - p) & (1 - t)).sum(),
                   (p & (1 - t)).sum())  # fmt: skip
        row["threshold"] = thresholds[c]
        row["ece"] = float(binary_calibration_error(probs[:, c].contiguous(), t, n_bins=n_bins, norm="l1"))
        rows.append(row)
    pooled_ece = binary_calibration_error(probs.reshape(-1), targets.reshape(-1), n_bins=n_bins, norm="l1")
    return _summary(task, rows, thresholds, float((predicted == targets).float().mean()), float(pooled_ece), n_bins)


def _multiclass(probs: Tensor, targets: Tensor, names: list[str], n_bins: int) -> dict[str, Any]:
    classes = probs.shape[1]
    predicted = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        aurocs = multiclass_auroc(probs, targets, num_classes=classes, average=None)
    rows = []
    for c, name in enumerate(names):
        p, t = predicted == c, targets == c
        rows.append(_row(name, _auroc_or_nan(aurocs[c], t), (p & t).sum(), (~p & t).sum(), (~p & ~t).sum(),
                         (p & ~t).sum()))  # fmt: skip
    ece = multiclass_calibration_error(probs, targets, num_classes=classes, n_bins=n_bins, norm="l1")
    result = _summary("multiclass", rows, None, float((predicted == targets).float().mean()), float(ece), n_bins)
    result["balanced_accuracy"] = _nanmean([row["sensitivity"] for row in rows])  # mean recall
    return result


def _summary(
    task: str, rows: list[dict[str, Any]], thresholds: list[float] | None, accuracy: float, ece: float, n_bins: int
) -> dict[str, Any]:
    return {
        "task": task,
        "n_samples": rows[0]["positives"] + rows[0]["negatives"] if rows else 0,
        "n_bins": n_bins,
        "thresholds": thresholds,
        "classes": rows,
        "auroc_macro": _nanmean([row["auroc"] for row in rows]),
        "sensitivity_macro": _nanmean([row["sensitivity"] for row in rows]),
        "specificity_macro": _nanmean([row["specificity"] for row in rows]),
        "balanced_accuracy": _nanmean([row["balanced_accuracy"] for row in rows]),
        "accuracy": accuracy,
        "ece": ece,
    }
