"""``MedicalReport``: ROC curves, reliability diagram, confusion matrix and clinical metrics after fit and test."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from cvft.atomic import atomic_path, write_json_atomic
from cvft.callbacks.report import output_dir
from cvft.errors import CvftError
from cvft.medical.metrics import _parse_rule, choose_threshold, flatten_metrics, medical_metrics
from cvft.medical.plots import plot_confusion, plot_reliability_diagram, plot_roc_curves

__all__ = ["CSV_COLUMNS", "MedicalReport", "collect_probabilities", "write_metrics_table"]

_logger = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = (
    "split",
    "class",
    "auroc",
    "sensitivity",
    "specificity",
    "balanced_accuracy",
    "ece",
    "threshold",
    "positives",
    "negatives",
    "accuracy",
)
"""Columns of ``medical_metrics.csv``: one row per class, then a ``macro`` row with the summaries."""


def collect_probabilities(
    module: torch.nn.Module, batches: Iterable[Sequence[Any]], multi_label: bool
) -> tuple[Tensor, Tensor]:
    """Run ``module`` over ``(images, targets, ...)`` batches in eval mode without gradients.

    Returns:
        CPU ``(probabilities, targets)``: sigmoid outputs for multi-label, softmax outputs otherwise.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> probs, targets = collect_probabilities(model, [(torch.randn(2, 4), torch.tensor([0, 2]))], False)
        >>> probs.shape, targets.tolist()
        (torch.Size([2, 3]), [0, 2])
    """
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    probs, targets = [], []
    try:
        with torch.no_grad():
            for batch in batches:
                logits = module(batch[0].to(device)).float()
                probs.append(_cpu_probabilities(logits, multi_label))
                targets.append(batch[1].cpu())
    finally:
        module.train(was_training)
    if not probs:
        raise CvftError("The dataloader yielded no batches; MedicalReport needs labelled validation or test images.")
    return torch.cat(probs), torch.cat(targets)


def write_metrics_table(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`~cvft.medical.medical_metrics` results (by split) as CSV (:data:`CSV_COLUMNS`), atomically.

    Example:
        >>> import tempfile
        >>> result = medical_metrics(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]))
        >>> path = write_metrics_table({"val": result}, tempfile.mkdtemp() + "/metrics.csv")
        >>> path.read_text().splitlines()[1].split(",")[:3]
        ['val', 'positive', '1']
    """
    rows = []
    for split, result in results.items():
        for row in result["classes"]:
            rows.append({"split": split, **row, "accuracy": ""})
        rows.append(
            {
                "split": split,
                "class": "macro",
                "auroc": result["auroc_macro"],
                "sensitivity": result["sensitivity_macro"],
                "specificity": result["specificity_macro"],
                "balanced_accuracy": result["balanced_accuracy"],
                "ece": result["ece"],
                "threshold": "",
                "positives": sum(row["positives"] for row in result["classes"]),
                "negatives": sum(row["negatives"] for row in result["classes"]),
                "accuracy": result["accuracy"],
            }
        )
    path = Path(path)
    with atomic_path(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows([{key: _cell(row[key]) for key in CSV_COLUMNS} for row in rows])
    return path


class MedicalReport(pl.Callback):
    """After fit (validation data) and after test: plots and clinical metrics in the run folder.

    The model runs over the data module's validation (test) dataloader in eval mode, and its softmax (sigmoid for
    multi-label) probabilities give ``roc_curves.png``, ``reliability_diagram.png``, ``confusion_matrix.png`` (at
    the operating point; it replaces :class:`~cvft.callbacks.TrainingReport`'s argmax matrix, which is the same
    except for a binary threshold other than 0.5), ``medical_metrics.csv`` and ``medical_metrics.json``; test files
    carry a ``test_`` prefix. Scalars go to the loggers as ``medical_val/...`` and ``medical_test/...``.

    When the module's ``validation_step`` / ``test_step`` return ``{"loss", "logits"}`` (as
    :class:`~cvft.tasks.ImageClassifier` does), the report reuses the probabilities of the last validation epoch if
    it ran on the final weights over the whole validation set in one process, and those of the test loop it follows,
    instead of running the model over the images again. Otherwise it runs the model itself.

    A module with two single-label classes is a binary problem whose positive class is index 1. The operating point
    is a threshold, one per label, or a rule chosen on the validation data (``"youden"``, ``"sensitivity@0.9"``,
    ``"specificity@0.95"``) and then applied unchanged to the test data. Multiclass decisions are the argmax.

    Args:
        enabled: Write the report (the CLI adds the callback disabled; ``--medical_report.enabled true``).
        operating_point: Threshold, thresholds per label, or a rule (see above).
        n_bins: Bins of the ECE and of the reliability diagram.
        after_fit: Report on the validation data when fit ends.
        after_test: Report on the test data when test ends.

    Example:
        >>> report = MedicalReport(operating_point="sensitivity@0.9")
        >>> report.enabled, report.thresholds
        (True, None)
    """

    def __init__(
        self,
        enabled: bool = True,
        operating_point: float | list[float] | str = 0.5,
        n_bins: int = 15,
        after_fit: bool = True,
        after_test: bool = True,
    ) -> None:
        if isinstance(operating_point, str):
            _parse_rule(operating_point)
        if n_bins < 1:
            raise CvftError(f"n_bins must be >= 1, got {n_bins}.")
        self.enabled, self.operating_point, self.n_bins = enabled, operating_point, n_bins
        self.after_fit, self.after_test = after_fit, after_test
        self.thresholds: list[float] | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.written: list[Path] = []
        self._outputs = {"val": _LoopOutputs(), "test": _LoopOutputs()}

    @property
    def draws_confusion_matrix(self) -> bool:
        """Whether this report draws ``confusion_matrix.png`` at fit end (``TrainingReport`` then skips it)."""
        return self.enabled and self.after_fit

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start collecting this validation epoch's probabilities."""
        self._outputs["val"].start(self.enabled and self.after_fit and not trainer.sanity_checking)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start collecting the test probabilities."""
        self._outputs["test"].start(self.enabled and self.after_test)

    def _loop_outputs(self, trainer: pl.Trainer) -> _LoopOutputs:
        """What the running loop collects: the test loop's while testing, else the validation loop's."""
        return self._outputs["test" if trainer.testing else "val"]

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        """Keep the batch's probabilities and targets (also ``on_test_batch_end``: the loop that runs)."""
        self._loop_outputs(trainer).add(outputs, batch, dataloader_idx, _multi_label(pl_module))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note the training step the collected probabilities belong to (also ``on_test_epoch_end``)."""
        self._loop_outputs(trainer).finish(trainer)

    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report on the validation data."""
        if self.enabled and self.after_fit:
            loader = _loader(trainer, "val")
            if loader is None:
                _logger.warning("MedicalReport: no validation data, so no report after fit.")
                return
            self._report(trainer, pl_module, "val", loader)

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report on the test data, at the operating point chosen on the validation data."""
        if self.enabled and self.after_test:
            loader = _loader(trainer, "test")
            if loader is not None:
                self._report(trainer, pl_module, "test", loader)

    def _probabilities(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str, loader: Any
    ) -> tuple[Tensor, Tensor]:
        """The loop's own probabilities when they are those of the current weights on all of ``loader``."""
        kept = self._outputs[split].result(trainer, _dataset_size(loader))
        if kept is not None:
            return kept
        return collect_probabilities(pl_module, loader, _multi_label(pl_module))

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str, loader: Any) -> None:
        multi_label = _multi_label(pl_module)
        probs, targets = self._probabilities(trainer, pl_module, split, loader)
        task = "multilabel" if multi_label else "binary" if probs.shape[1] == 2 else "multiclass"
        names = list(getattr(pl_module, "class_names", None) or [str(i) for i in range(probs.shape[1])])
        threshold = self._threshold(trainer, pl_module, task, split, probs, targets)
        result = medical_metrics(probs, targets, task, threshold, names, self.n_bins)
        self.results[split] = result
        folder = output_dir(trainer)
        prefix = "" if split == "val" else f"{split}_"
        label = "Validation" if split == "val" else split.capitalize()
        self.written += [
            plot_roc_curves(probs, targets, folder / f"{prefix}roc_curves.png", task, threshold, names,
                            title=f"{label} ROC curves"),
            plot_reliability_diagram(probs, targets, folder / f"{prefix}reliability_diagram.png", task, self.n_bins,
                                     title=f"{label} reliability"),
            plot_confusion(probs, targets, folder / f"{prefix}confusion_matrix.png", task, threshold, names,
                           title=f"{label} confusion matrix"),
            write_metrics_table({split: result}, folder / f"{prefix}medical_metrics.csv"),
            _write_json(result, folder / f"{prefix}medical_metrics.json"),
        ]  # fmt: skip
        scalars = {k: v for k, v in flatten_metrics(result, f"medical_{split}/").items() if math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            logger.save()
        _logger.info(
            "%s: AUROC %.4f | balanced accuracy %.4f | ECE %.4f | wrote %s",
            split, result["auroc_macro"], result["balanced_accuracy"], result["ece"], folder,
        )  # fmt: skip

    def _threshold(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: str, split: str, probs: Tensor, targets: Tensor
    ) -> list[float] | None:
        if task == "multiclass":
            return None
        if not isinstance(self.operating_point, str):
            values = self.operating_point if isinstance(self.operating_point, list) else [self.operating_point]
            values = [float(v) for v in values]
            return values * probs.shape[1] if len(values) == 1 and task == "multilabel" else values
        if split != "val" and self.thresholds is None:  # test without a fit first: choose on validation data now
            loader = _loader(trainer, "val")
            if loader is None:
                raise CvftError(
                    f"MedicalReport(operating_point={self.operating_point!r}) chooses its threshold on validation "
                    "data, and this run has none; give the threshold as a number instead."
                )
            split = "val"
            probs, targets = collect_probabilities(pl_module, loader, task == "multilabel")
        if split == "val":
            chosen = choose_threshold(probs[:, 1] if task == "binary" else probs, targets, self.operating_point)
            self.thresholds = [chosen] if isinstance(chosen, float) else chosen
            _logger.info("MedicalReport: %s thresholds chosen on validation data: %s", self.operating_point,
                         self.thresholds)  # fmt: skip
        return self.thresholds

    def state_dict(self) -> dict[str, Any]:
        """The thresholds chosen on validation data."""
        return {"thresholds": self.thresholds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the chosen thresholds."""
        self.thresholds = state_dict.get("thresholds")


def _cpu_probabilities(logits: Tensor, multi_label: bool) -> Tensor:
    """A classifier's probabilities on the CPU: sigmoid per label (multi-label), else softmax over classes."""
    return (logits.sigmoid() if multi_label else logits.softmax(-1)).cpu()


class _LoopOutputs:
    """Probabilities and targets of one validation or test epoch, gathered from the step outputs.

    They stand in for a fresh pass over the data only if every batch gave logits, the loop ran in a single process
    over the whole dataset, and no optimizer step happened since (the weights are those of the epoch).
    """

    def __init__(self) -> None:
        self.probs: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.complete = False
        self.step: int | None = None

    def start(self, wanted: bool) -> None:
        self.probs, self.targets, self.complete, self.step = [], [], wanted, None

    def add(self, outputs: Any, batch: Any, dataloader_idx: int, multi_label: bool) -> None:
        if not self.complete:
            return
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        targets = batch.get("target") if isinstance(batch, Mapping) else batch[1]
        if dataloader_idx != 0 or not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
            self.start(False)
            return
        logits = logits.detach().float()
        self.probs.append(_cpu_probabilities(logits, multi_label))
        self.targets.append(targets.detach().cpu())

    def finish(self, trainer: pl.Trainer) -> None:
        if self.complete and self.probs and trainer.world_size == 1:
            self.step = trainer.global_step
        else:
            self.start(False)

    def result(self, trainer: pl.Trainer, dataset_size: int | None) -> tuple[Tensor, Tensor] | None:
        if self.step is None or self.step != trainer.global_step:
            return None
        probs, targets = torch.cat(self.probs), torch.cat(self.targets)
        return (probs, targets) if dataset_size == len(probs) else None


def _multi_label(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "multi_label", False))


def _dataset_size(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _loader(trainer: pl.Trainer, split: str) -> Any:
    """The data module's own dataloader (no distributed sampler), else the trainer's."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        try:
            loader = getattr(datamodule, f"{split}_dataloader")()
        except Exception:  # a data module without this split
            loader = None
        if loader is not None and not isinstance(loader, list):
            return loader
    loaders = getattr(trainer, f"{split}_dataloaders", None)
    if isinstance(loaders, list | tuple):
        loaders = loaders[0] if loaders else None
    return loaders


def _cell(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else ("" if value != value else value)


def _write_json(result: dict[str, Any], path: Path) -> Path:
    return write_json_atomic(path, result)
