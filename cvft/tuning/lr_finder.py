"""The learning-rate range test (Lightning's LR finder) on a cvft task: ``lr="auto"`` and ``cvft lr-find``.

:func:`find_learning_rate` runs Lightning's ``LearningRateFinder`` the way ``Tuner(trainer).lr_find`` does, in a fit it
ends early: from the task's initial weights it trains ``num_training`` steps while the learning rate grows from
``min_lr`` to ``max_lr``, records the smoothed loss, and restores the weights, strategy state and optimizer from a
checkpoint (:mod:`cvft.tuning._search` puts back what a checkpoint does not hold). The suggestion is Lightning's: the
rate at the steepest fall of the smoothed loss, skipping the first 10 and the last point. It becomes ``hparams.lr``;
when there is none (too few steps, a loss that is NaN throughout, ``fast_dev_run``), the task keeps the rate it uses
when ``lr`` is not given, and the result says why.

cvft's optimizer gives each parameter group its own rate: ``lr`` times the group's scale (``layerwise_lr``, a
detector's ``backbone_lr_scale``, a multitask head's ``head_lr_scale``). Lightning's finder sets every group to the
same swept rate; here each optimizer step runs each group at the swept rate times that group's ratio to ``lr``, so the
sweep trains as the fit will and the suggestion is the base ``lr``. The fit that follows builds its optimizer and
warmup + cosine schedule afresh from the rate found (Lightning's finder callback inside the fit would leave the
schedule on the old rate).

Example:
    >>> LRFinderOptions(num_training=50).mode
    'exponential'
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateFinder
from torch.utils.hooks import RemovableHandle

from cvft.atomic import atomic_path
from cvft.callbacks.report import _pyplot, _save_figure, output_dir
from cvft.errors import ConfigError
from cvft.tuning._search import hooks_removed_after, run_finder

__all__ = ["LRFinderOptions", "LRFinderResult", "find_learning_rate", "scale_groups_during_steps"]

_logger = logging.getLogger(__name__)

#: Points Lightning's suggestion skips at the start and at the end of the curve; it needs two more.
_SKIP_BEGIN, _SKIP_END = 10, 1


@dataclass
class LRFinderOptions:
    """How the learning-rate range test sweeps (``--lr_finder.*``; Lightning's ``Tuner.lr_find`` arguments).

    Args:
        min_lr: The first learning rate of the sweep.
        max_lr: The last learning rate of the sweep.
        num_training: Training steps of the sweep, one learning rate each (the suggestion needs at least 13: it skips
            the first 10 and the last). The sweep runs as many epochs as it needs.
        mode: ``"exponential"`` (rates evenly spaced in log scale) or ``"linear"``.
        early_stop_threshold: Stop when the smoothed loss exceeds this multiple of the best one so far; ``None``:
            sweep to ``max_lr``.

    Raises:
        ConfigError: A value out of range (``min_lr`` must be below ``max_lr``).
    """

    min_lr: float = 1e-8
    max_lr: float = 1.0
    num_training: int = 100
    mode: Literal["exponential", "linear"] = "exponential"
    early_stop_threshold: float | None = 4.0

    def __post_init__(self) -> None:
        if not (0 < self.min_lr < self.max_lr and math.isfinite(self.max_lr)):
            raise ConfigError(
                f"LR finder: min_lr={self.min_lr!r} and max_lr={self.max_lr!r} must satisfy 0 < min_lr < max_lr "
                "(--lr_finder.min_lr, --lr_finder.max_lr)."
            )
        if isinstance(self.num_training, bool) or not isinstance(self.num_training, int) or self.num_training < 1:
            raise ConfigError(
                f"LR finder: num_training={self.num_training!r} must be an integer >= 1; 100 is usual, 13 the fewest "
                "that give a suggestion (--lr_finder.num_training)."
            )
        if self.mode not in ("exponential", "linear"):
            raise ConfigError(f"LR finder: mode={self.mode!r}; choose 'exponential' or 'linear' (--lr_finder.mode).")
        if self.early_stop_threshold is not None and not self.early_stop_threshold > 1:
            raise ConfigError(
                f"LR finder: early_stop_threshold={self.early_stop_threshold!r} must be > 1 (4 is usual) or null "
                "(--lr_finder.early_stop_threshold)."
            )


@dataclass
class LRFinderResult:
    """What a learning-rate range test found and did.

    Attributes:
        lr: The learning rate the task now has (``hparams.lr``).
        lr_origin: Where :attr:`lr` comes from (the finder, or the default it fell back to).
        suggestion: Lightning's suggestion; ``None`` when it could not make one (then :attr:`lr` is the default).
        fallback_reason: Why there is no suggestion, ``None`` when there is one.
        lrs: The swept learning rates, one per step.
        losses: The smoothed training loss at each of them.
        options: How the sweep ran.
        csv_path: The curve (``step,lr,loss,suggested``), when written.
        plot_path: The plot of the curve, when written.
    """

    lr: float
    lr_origin: str
    suggestion: float | None
    fallback_reason: str | None
    lrs: list[float]
    losses: list[float]
    options: LRFinderOptions
    csv_path: Path | None = None
    plot_path: Path | None = None
    suggested_index: int | None = field(default=None, repr=False)

    def summary(self) -> str:
        """What the sweep did and what it chose, in two or three lines, for the command's printout.

        Example:
            >>> options = LRFinderOptions(num_training=2)
            >>> result = LRFinderResult(0.003, "found by the LR finder", 0.003, None, [1e-8, 1.0], [1.1, 0.9], options)
            >>> print(result.summary())
            LR finder: 2 of 2 steps, lr 1e-08 to 1 (exponential)
            Suggested learning rate: 0.003 (steepest fall of the smoothed loss)
        """
        o = self.options
        lines = [
            f"LR finder: {len(self.lrs)} of {o.num_training} steps, lr {o.min_lr:g} to {o.max_lr:g} ({o.mode})"
            + (" (stopped early: the loss diverged)" if 0 < len(self.lrs) < o.num_training else "")
        ]
        if self.suggestion is not None:
            lines.append(f"Suggested learning rate: {self.suggestion:.3g} (steepest fall of the smoothed loss)")
        else:
            lines.append(f"LR finder could not suggest a learning rate: {self.fallback_reason}")
            lines.append(f"Falling back to lr {self.lr:g} ({self.lr_origin})")
        if self.csv_path is not None and self.plot_path is not None:
            lines.append(f"Curve: {self.csv_path} | plot: {self.plot_path}")
        return "\n".join(lines)


def scale_groups_during_steps(optimizer: torch.optim.Optimizer, base_lr: float) -> list[RemovableHandle]:
    """Run each optimizer step with every group at its ``lr`` times its ratio to ``base_lr``, then put ``lr`` back.

    The ratio is the group's ``initial_lr`` (or ``lr``) over ``base_lr`` when this is called: a group built at
    ``base_lr * 0.1`` steps at a tenth of the rate a scheduler writes into it, as in training. Between steps the groups
    hold what the scheduler wrote, so a scheduler setting one rate for all groups (Lightning's finder) sweeps the base.

    Args:
        optimizer: The optimizer, with its groups as the task built them.
        base_lr: The rate the groups' ratios are taken against (the task's ``hparams.lr``).

    Returns:
        The step hooks' handles; ``remove()`` them to stop scaling.

    Example:
        >>> weight = torch.nn.Parameter(torch.zeros(2))
        >>> optimizer = torch.optim.SGD([{"params": [weight], "lr": 0.5}], lr=0.5)
        >>> handles = scale_groups_during_steps(optimizer, base_lr=1.0)  # this group trains at half the base rate
        >>> optimizer.param_groups[0]["lr"] = 2.0  # what a sweep's scheduler writes
        >>> weight.grad = torch.ones(2)
        >>> optimizer.step()  # at 2.0 x 0.5
        >>> weight.tolist(), optimizer.param_groups[0]["lr"]
        ([-1.0, -1.0], 2.0)
    """
    ratios = [float(group.get("initial_lr", group["lr"])) / base_lr for group in optimizer.param_groups]
    written: list[float] = []

    def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        written[:] = [group["lr"] for group in opt.param_groups]
        for group, ratio in zip(opt.param_groups, ratios, strict=True):
            group["lr"] = group["lr"] * ratio

    def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in zip(opt.param_groups, written, strict=True):
            group["lr"] = lr

    return [optimizer.register_step_pre_hook(before_step), optimizer.register_step_post_hook(after_step)]


class _BaseRateFinder(LearningRateFinder):
    """Lightning's finder callback, sweeping the task's base ``lr`` with its groups' ratios kept (module docstring)."""

    def __init__(self, base_lr: float, options: LRFinderOptions) -> None:
        super().__init__(
            min_lr=options.min_lr,
            max_lr=options.max_lr,
            num_training_steps=options.num_training,
            mode=options.mode,
            early_stop_threshold=options.early_stop_threshold,
            update_attr=False,
        )
        self._base_lr = base_lr

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the groups' ratios, then run Lightning's search (it ends the fit)."""
        handles = [h for opt in trainer.optimizers for h in scale_groups_during_steps(opt, self._base_lr)]
        with hooks_removed_after(handles):
            super().on_fit_start(trainer, pl_module)


def find_learning_rate(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    options: LRFinderOptions | None = None,
    folder: str | Path | None = None,
    hidden_callbacks: Sequence[type] = (),
) -> LRFinderResult:
    """Run the learning-rate range test, set ``model.hparams.lr`` and write the curve (module docstring).

    The model leaves with the weights, strategy state and trainable set it came with; ``trainer.fit`` then trains
    from them at the rate chosen. Call it before that fit, with the same Trainer.

    Args:
        trainer: The Trainer of the fit to come.
        model: A cvft task (``hparams.lr`` a number; ``lr="auto"`` gives the default it falls back to).
        datamodule: The fit's data.
        options: How to sweep; ``None``: :class:`LRFinderOptions` defaults.
        folder: Where ``lr_find.csv`` and ``lr_find.png`` go; ``None``: the run's folder
            (:func:`~cvft.callbacks.output_dir`).
        hidden_callbacks: Callback classes kept out of the finder's fit (the CLI's ``SaveConfigCallback``).

    Returns:
        The sweep, the suggestion (or why there is none) and the rate set.
    """
    options = options or LRFinderOptions()
    finder = _BaseRateFinder(float(model.hparams.lr), options)
    run_finder(trainer, model, datamodule, finder, hidden_callbacks, min_epochs=options.num_training)
    search = finder.optimal_lr  # Lightning's _LRFinder, None when the Trainer skipped it
    lrs = [float(v) for v in search.results.get("lr", [])] if search is not None else []
    losses = [float(v) for v in search.results.get("loss", [])] if search is not None else []
    suggestion, reason = _suggestion(search, lrs, losses)
    if suggestion is not None:
        model.hparams.lr = suggestion
        model.lr_origin = "found by the LR finder"
    else:
        _logger.warning("LR finder could not suggest a learning rate: %s; lr stays %g.", reason, model.hparams.lr)
        model.lr_origin = f"{getattr(model, 'lr_origin', 'given as lr')}; the LR finder could not suggest one"
    model.lr_search_pending = False
    result = LRFinderResult(float(model.hparams.lr), model.lr_origin, suggestion, reason, lrs, losses, options)
    result.suggested_index = getattr(search, "_optimal_idx", None) if suggestion is not None else None
    if lrs and trainer.is_global_zero:
        target = Path(folder) if folder is not None else output_dir(trainer)
        result.csv_path = _write_curve(result, target / "lr_find.csv")
        result.plot_path = _plot_curve(search, result, target / "lr_find.png")
    return result


def _suggestion(search: Any, lrs: list[float], losses: list[float]) -> tuple[float | None, str | None]:
    if search is None:
        return None, "the Trainer skipped the sweep (fast_dev_run)"
    finite = sum(math.isfinite(v) for v in losses[_SKIP_BEGIN:-_SKIP_END])
    if finite < 2:
        bad = sum(not math.isfinite(v) for v in losses)
        return None, (
            f"the sweep gave {len(losses)} loss values, {bad} of them NaN or infinite; a suggestion needs 2 finite "
            f"ones after the first {_SKIP_BEGIN} and before the last. Raise --lr_finder.num_training (at least "
            f"{_SKIP_BEGIN + _SKIP_END + 2}), check the loss for NaN, or pass --model.lr"
        )
    suggestion = search.suggestion(skip_begin=_SKIP_BEGIN, skip_end=_SKIP_END)
    if suggestion is None or not math.isfinite(suggestion) or suggestion <= 0:
        return None, f"the suggestion {suggestion!r} is not a positive learning rate; pass --model.lr"
    return float(suggestion), None


def _write_curve(result: LRFinderResult, path: Path) -> Path:
    with atomic_path(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "lr", "loss", "suggested"])
        for step, (lr, loss) in enumerate(zip(result.lrs, result.losses, strict=True)):
            writer.writerow([step, repr(lr), repr(loss), int(step == result.suggested_index)])
    return path


def _plot_curve(search: Any, result: LRFinderResult, path: Path) -> Path:
    plt = _pyplot()
    figure = search.plot(suggest=False)
    axes = figure.axes[0]
    index = result.suggested_index
    if index is not None:
        axes.plot(result.lrs[index], result.losses[index], marker="o", markersize=10, color="red")
    if result.suggestion is not None:
        axes.axvline(result.suggestion, color="red", linestyle=":", linewidth=1)
        axes.set_title(f"LR finder: suggested lr {result.suggestion:.3g}")
    else:
        axes.set_title(f"LR finder: no suggestion (lr {result.lr:g} kept)")
    axes.set_ylabel("smoothed training loss")
    return _save_figure(plt, figure, path)
