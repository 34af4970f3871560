"""Report figures for medical classifiers: ROC curves, reliability diagram and confusion matrices (PNG files).

Every function takes probabilities and targets as :func:`cvft.medical.medical_metrics` does, writes one PNG
atomically and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_roc

from cvft.callbacks.report import _pyplot, _save_figure, plot_confusion_matrix
from cvft.medical.metrics import Task, _prepare, medical_metrics

__all__ = ["plot_confusion", "plot_reliability_diagram", "plot_roc_curves", "reliability_bins"]

_MAX_CURVES = 20


def plot_roc_curves(
    probs: Tensor,
    targets: Tensor,
    path: str | Path,
    task: Task | None = None,
    threshold: float | Sequence[float] | str | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "ROC curves",
) -> Path:
    """One ROC curve per class (one-vs-rest for multiclass) with its AUROC, the chance line and the operating point.

    The operating point (a dot per class) is where the decisions of :func:`~cvft.medical.medical_metrics` lie: the
    threshold for binary / multi-label, the argmax for multiclass. At most 20 curves are drawn (the 20 with the
    most positives).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "roc.png"
        >>> plot_roc_curves(torch.tensor([0.9, 0.2, 0.6, 0.3]), torch.tensor([1, 0, 0, 1]), out).exists()
        True
    """
    result = medical_metrics(probs, targets, task, threshold, class_names)
    probs, targets, task, names = _prepare(probs, targets, task, class_names)
    columns = torch.nn.functional.one_hot(targets, probs.shape[1]) if task == "multiclass" else targets
    rows = sorted(range(len(names)), key=lambda c: -result["classes"][c]["positives"])[:_MAX_CURVES]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for c in sorted(rows):
        row = result["classes"][c]
        if math.isnan(row["auroc"]):
            continue
        fpr, tpr, _ = binary_roc(probs[:, c].contiguous(), columns[:, c].contiguous())
        (line,) = ax.plot(fpr.numpy(), tpr.numpy(), linewidth=1.5, label=f"{row['class']} (AUROC {row['auroc']:.3f})")
        ax.plot(1 - row["specificity"], row["sensitivity"], "o", color=line.get_color(), markersize=7)
    ax.plot([], [], "o", color="black", label="operating point")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(f"{title} (macro AUROC {result['auroc_macro']:.3f})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def reliability_bins(probs: Tensor, targets: Tensor, task: Task | None = None, n_bins: int = 15) -> dict[str, Any]:
    """Equal-width confidence bins: mean confidence, observed accuracy (or positive rate) and count per bin.

    Confidences are those of the ECE (see :mod:`cvft.medical.metrics`): the positive-class probability for binary
    and (pooled) multi-label outputs, the top-1 probability for multiclass. Bin ``i`` holds
    ``edges[i] <= confidence < edges[i + 1]``; a confidence of exactly 1 joins the last bin.

    Returns:
        ``edges`` (``n_bins + 1``), ``confidence``, ``accuracy`` (``nan`` in empty bins) and ``counts`` as numpy
        arrays, and ``ece`` (the count-weighted mean of ``|accuracy - confidence|``).

    Example:
        >>> bins = reliability_bins(torch.tensor([0.1, 0.15, 0.9]), torch.tensor([0, 1, 1]), "binary", n_bins=2)
        >>> bins["counts"].tolist(), bins["accuracy"].tolist()
        ([2, 1], [0.5, 1.0])
    """
    probs, targets, task, _ = _prepare(probs, targets, task, None)
    if task == "multiclass":
        confidence, predicted = probs.max(1)
        correct = (predicted == targets).double()
    else:
        confidence, correct = probs.reshape(-1), targets.reshape(-1).double()
    confidence = confidence.double().numpy()
    correct = correct.numpy()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, n_bins) / counts
        accuracy = np.bincount(index, correct, n_bins) / counts
    filled = counts > 0
    ece = float(np.sum(np.abs(accuracy[filled] - mean_confidence[filled]) * counts[filled]) / max(counts.sum(), 1))
    return {"edges": edges, "confidence": mean_confidence, "accuracy": accuracy, "counts": counts, "ece": ece}


def plot_reliability_diagram(
    probs: Tensor,
    targets: Tensor,
    path: str | Path,
    task: Task | None = None,
    n_bins: int = 15,
    title: str = "Reliability diagram",
) -> Path:
    """Observed accuracy against confidence per bin, with gap bars, the diagonal, the ECE and a count histogram.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "reliability.png"
        >>> plot_reliability_diagram(torch.tensor([0.9, 0.2, 0.6, 0.3]), torch.tensor([1, 0, 0, 1]), out).exists()
        True
    """
    result = medical_metrics(probs, targets, task, n_bins=n_bins)
    bins = reliability_bins(probs, targets, task, n_bins)
    edges, counts = bins["edges"], bins["counts"]
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    filled = counts > 0
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.bar(centres[filled], bins["accuracy"][filled], width=width, edgecolor="black", color="tab:blue", alpha=0.8,
           label="observed")  # fmt: skip
    gap = bins["confidence"][filled] - bins["accuracy"][filled]
    ax.bar(centres[filled], gap, bottom=bins["accuracy"][filled], width=width, edgecolor="tab:red", color="tab:red",
           alpha=0.3, hatch="//", label="gap to mean confidence")  # fmt: skip
    ylabel = "accuracy" if result["task"] == "multiclass" else "fraction positive"
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel=ylabel)
    ax.set_title(f"{title} (ECE {result['ece']:.3f}, {n_bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.bar(centres, counts, width=width, edgecolor="black", color="grey")
    hist.set(xlabel="confidence" if result["task"] == "multiclass" else "predicted probability", ylabel="count")
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def plot_confusion(
    probs: Tensor,
    targets: Tensor,
    path: str | Path,
    task: Task | None = None,
    threshold: float | Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "Confusion matrix",
) -> Path:
    """Confusion matrix at the operating point: one matrix for single-label tasks, a 2 x 2 panel per label else.

    Binary decisions are ``prob >= threshold`` (0.5 by default) and drawn as a 2 x 2 matrix of the two classes.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "cm.png"
        >>> probs = torch.tensor([[0.9, 0.1, 0.7], [0.2, 0.8, 0.1]])
        >>> plot_confusion(probs, torch.tensor([[1, 0, 1], [0, 1, 1]]), out, task="multilabel").exists()
        True
    """
    resolved = _task(probs, targets, task)
    if resolved == "multilabel":
        return _plot_label_panels(probs, targets, path, threshold, class_names, title)
    canonical, labels, resolved, names = _prepare(probs, targets, resolved, class_names)
    if resolved == "binary":
        cut = 0.5 if threshold is None else float(np.ravel(threshold)[0])
        predicted, labels = (canonical[:, 0] >= cut).long(), labels[:, 0]
        names = list(class_names) if class_names is not None and len(class_names) == 2 else ["negative", names[0]]
        title = f"{title} at threshold {cut:.3g}"
    else:
        predicted = canonical.argmax(1)
    size = len(names)
    matrix = torch.bincount(labels * size + predicted, minlength=size * size).reshape(size, size)
    return plot_confusion_matrix(matrix, names, path, title=title)


def _task(probs: Tensor, targets: Tensor, task: Task | None) -> str:
    return _prepare(probs, targets, task, None)[2]


def _plot_label_panels(
    probs: Tensor,
    targets: Tensor,
    path: str | Path,
    threshold: float | Sequence[float] | None,
    class_names: Sequence[str] | None,
    title: str,
) -> Path:
    result = medical_metrics(probs, targets, "multilabel", threshold, class_names)
    probs, targets, _, names = _prepare(probs, targets, "multilabel", class_names)
    predicted = (probs >= torch.tensor(result["thresholds"])).long()
    shown = min(len(names), 30)
    columns = min(shown, 5)
    rows = math.ceil(shown / columns)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for c, ax in enumerate(axes.flat):
        if c >= shown:
            ax.axis("off")
            continue
        p, t = predicted[:, c], targets[:, c]
        cells = np.array([[int(((1 - t) & (1 - p)).sum()), int(((1 - t) & p).sum())],
                          [int((t & (1 - p)).sum()), int((t & p).sum())]])  # fmt: skip
        ax.imshow(cells / max(cells.sum(1, keepdims=True).max(), 1), cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(cells[i, j]), ha="center", va="center", fontsize=9)
        ax.set_xticks([0, 1], ["pred -", "pred +"])
        ax.set_yticks([0, 1], ["true -", "true +"])
        ax.set_title(f"{names[c]} (t={result['thresholds'][c]:.2f})", fontsize=9)
    fig.suptitle(f"{title} per label" + (f" (first {shown} of {len(names)})" if shown < len(names) else ""))
    fig.tight_layout()
    return _save_figure(plt, fig, path)
