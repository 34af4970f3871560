"""Pictures written at the end of a fit: learning curves, the validation confusion matrix and the calibration."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from cvft.atomic import atomic_path, write_json_atomic

__all__ = [
    "CALIBRATION_COLUMNS",
    "TrainingReport",
    "output_dir",
    "plot_calibration",
    "plot_learning_curves",
    "plot_confusion_matrix",
    "write_calibration_table",
]

CALIBRATION_COLUMNS: tuple[str, ...] = ("probabilities", "temperature", "nll", "ece", "accuracy", "samples", "epoch")
"""Columns of ``calibration.csv``: one row before temperature scaling (``T`` 1), one after."""

_logger = logging.getLogger(__name__)
_CURVE_PANELS = (
    ("loss", ("train/loss_epoch", "val/loss")),
    ("metric", ("train/acc", "val/acc", "val/f1_macro", "val/auroc", "val/map", "val/map_50")),  # map: detection
)


def output_dir(trainer: pl.Trainer) -> Path:
    """The folder of this run: the first logger's version folder, else ``default_root_dir``.

    Unlike ``trainer.log_dir`` this does not broadcast, so it is safe on rank zero alone under DDP.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = getattr(logger, "log_dir", None) or logger.save_dir
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, fig, path: str | Path) -> Path:
    """Save ``fig`` atomically (:func:`cvft.atomic.atomic_path`) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as partial:
            fig.savefig(partial, dpi=110, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path


def plot_learning_curves(history: list[Mapping[str, float]], path: str | Path) -> Path:
    """Plot loss and metric curves by epoch into a PNG.

    Args:
        history: One mapping of metric name to value per epoch (``train/loss_epoch``, ``val/acc`` ...).
        path: Output PNG path.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "curves.png"
        >>> plot_learning_curves([{"train/loss_epoch": 1.0, "val/acc": 0.5}, {"train/loss_epoch": 0.5}], out).exists()
        True
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (ylabel, keys) in zip(axes, _CURVE_PANELS, strict=True):
        for key in keys:
            points = [(i + 1, row[key]) for i, row in enumerate(history) if key in row and math.isfinite(row[key])]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("Learning curves")
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def plot_confusion_matrix(
    matrix: Tensor, class_names: list[str], path: str | Path, normalize: bool = True, title: str | None = None
) -> Path:
    """Draw a confusion matrix (rows: true class, columns: predicted) as a PNG, with counts in the cells.

    The title (default ``"Validation confusion matrix"``) is followed by the accuracy.

    Example:
        >>> import tempfile, pathlib, torch
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "cm.png"
        >>> plot_confusion_matrix(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"], out).exists()
        True
    """
    plt = _pyplot()
    counts = matrix.detach().cpu().double()
    shown = counts / counts.sum(1, keepdim=True).clamp_min(1) if normalize else counts
    n = len(class_names)
    size = min(4 + 0.45 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(shown.numpy(), cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        threshold = shown.max().item() / 2
        for i in range(n):
            for j in range(n):
                colour = "white" if shown[i, j] > threshold else "black"
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", color=colour, fontsize=8)
    accuracy = counts.diag().sum() / counts.sum().clamp_min(1)
    ax.set_title(f"{title or 'Validation confusion matrix'} (accuracy {accuracy:.3f})")
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def plot_calibration(fit: Any, path: str | Path) -> Path:
    """Reliability diagram before and after temperature scaling, from a :class:`~cvft.tasks.temperature.TemperatureFit`.

    The observed accuracy of each confidence bin against its mean confidence (the diagonal is perfect calibration),
    one line before and one after scaling, with the bins' image counts below.

    Example:
        >>> import tempfile, pathlib, torch
        >>> from cvft.tasks.temperature import calibrate_temperature
        >>> fit = calibrate_temperature(torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]), torch.tensor([0, 1, 1]))
        >>> plot_calibration(fit, pathlib.Path(tempfile.mkdtemp()) / "calibration.png").exists()
        True
    """
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    width = 1.0 / fit.n_bins
    for offset, (label, bins, ece) in enumerate(
        (
            ("before", fit.bins_before, fit.ece_before),
            (f"after (T {fit.temperature:.3g})", fit.bins_after, fit.ece_after),
        )
    ):
        points = [(c, a) for c, a, n in zip(bins.confidence, bins.accuracy, bins.counts, strict=True) if n]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=f"{label}: ECE {ece:.3f}")
        centres = [
            (low + high) / 2 + (offset - 0.5) * width / 2
            for low, high in zip(bins.edges[:-1], bins.edges[1:], strict=True)
        ]
        hist.bar(centres, bins.counts, width=width / 2, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy (multi-label: positive rate)")
    ax.set_title(f"Validation calibration ({fit.samples} images, {fit.n_bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.set(xlabel="confidence", ylabel="count")
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def write_calibration_table(fit: Any, path: str | Path) -> Path:
    """Write a temperature fit as CSV (:data:`CALIBRATION_COLUMNS`), atomically: before and after scaling."""
    rows = [
        ("before", 1.0, fit.nll_before, fit.ece_before),
        ("after", fit.temperature, fit.nll_after, fit.ece_after),
    ]
    with atomic_path(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CALIBRATION_COLUMNS)
        for when, temperature, nll, ece in rows:
            writer.writerow([when, f"{temperature:.6g}", f"{nll:.6g}", f"{ece:.6g}", f"{fit.accuracy:.6g}",
                             fit.samples, fit.epoch])  # fmt: skip
    return Path(path)


class TrainingReport(pl.Callback):
    """Write ``learning_curves.png``, ``confusion_matrix.png`` and ``confusion_matrix.csv`` when a fit ends.

    When the fit starts, the images the DataModule left out as unreadable (its ``skipped_images``, e.g.
    :class:`~cvft.data.ImageFolderDataModule` with ``on_bad_image="skip"``) are listed in ``skipped_images.txt``,
    one ``path<TAB>reason`` line each.

    Epoch metrics are collected from ``trainer.callback_metrics``; the history is saved in checkpoints so a resumed
    run draws the whole curve. The confusion matrix comes from the LightningModule's ``last_val_confusion`` (as in
    :class:`cvft.tasks.ImageClassifier`); modules without it only get learning curves.

    A module calibrated by temperature scaling (its ``temperature_fit``, from ``temperature_scaling=True``) also gets
    ``calibration.json`` (the fit: temperature, NLL and ECE before and after, the reliability bins),
    ``calibration.csv`` (:data:`CALIBRATION_COLUMNS`) and ``calibration.png`` (:func:`plot_calibration`), for the
    weights the fit ended with (the last validation's).

    Args:
        curves: Draw the learning curves.
        confusion: Draw the confusion matrix.
        normalize: Colour confusion cells by row-normalised rate (the numbers show counts).
        calibration: Write the calibration files when the module has a temperature fit.
    """

    def __init__(
        self, curves: bool = True, confusion: bool = True, normalize: bool = True, calibration: bool = True
    ) -> None:
        self.curves = curves
        self.confusion = confusion
        self.normalize = normalize
        self.calibration = calibration
        self.history: list[dict[str, float]] = []
        self.written: list[Path] = []

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """List the images the DataModule skipped in ``skipped_images.txt`` in the run folder."""
        skipped = getattr(trainer.datamodule, "skipped_images", None)
        if skipped:
            path = output_dir(trainer) / "skipped_images.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = (f"{file}\t{' '.join(str(reason).split())}\n" for file, reason in dict(skipped).items())
            path.write_text("".join(lines), encoding="utf-8")
            _logger.warning("%d unreadable image(s) were skipped; listed in %s", len(skipped), path)
            self.written.append(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record this epoch's metrics (validation of the epoch has already run)."""
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, Tensor) and v.numel() == 1}
        self.history.append(row)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the PNGs (and the confusion matrix as CSV) into the run folder."""
        folder = output_dir(trainer)
        if self.curves and self.history:
            self.written.append(plot_learning_curves(self.history, folder / "learning_curves.png"))
        matrix = getattr(pl_module, "last_val_confusion", None)
        if self.confusion and matrix is not None:
            names = list(getattr(pl_module, "class_names", [str(i) for i in range(len(matrix))]))
            if not any(getattr(callback, "draws_confusion_matrix", False) for callback in trainer.callbacks):
                self.written.append(
                    plot_confusion_matrix(matrix, names, folder / "confusion_matrix.png", self.normalize)
                )
            with open(folder / "confusion_matrix.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["true\\predicted", *names])
                for name, row in zip(names, matrix.tolist(), strict=True):
                    writer.writerow([name, *row])
        fit = getattr(pl_module, "temperature_fit", None)
        if self.calibration and fit is not None:
            self.written += [
                write_json_atomic(folder / "calibration.json", fit.as_dict()),
                write_calibration_table(fit, folder / "calibration.csv"),
                plot_calibration(fit, folder / "calibration.png"),
            ]
        for path in self.written:
            _logger.info("wrote %s", path)

    def state_dict(self) -> dict[str, Any]:
        """The metric history so far."""
        return {"history": self.history}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the metric history."""
        self.history = [dict(row) for row in state_dict.get("history", [])]
