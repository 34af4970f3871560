"""How a finder's fit runs: Lightning's tuner callback in front, and the state a search may touch put back after.

Lightning's finders (``LearningRateFinder``, ``BatchSizeFinder``) run inside a ``trainer.fit`` that they end early
(``_early_exit``, as :class:`lightning.pytorch.tuner.Tuner` sets it): the fit sets the task up, the finder saves a
checkpoint, trains a few steps, and restores the checkpoint (weights, strategy state, EMA, optimizer). What a
checkpoint does not hold, :func:`run_finder` puts back itself: which parameters train (a search that crosses a
``gradual_unfreeze`` milestone unfreezes groups), the task's metric states (a search ends mid-epoch, with updates
that no epoch end reset), the Trainer's ``max_epochs`` (lifted so the search gets its steps on a small data set), and
callbacks that must not act on the search's fit (``config.yaml`` is written by the real fit, with the values found),
and the random state (the finder's fit draws from it to build its DataLoaders, as the real fit will again).

A strategy that calibrates on training batches at the first fit's ``setup`` (``needs_data``) calibrates in the
finder's fit; its choices come back with the weights, but the draws of that calibration are undone with the rest, so
the real fit then sees other shuffles than a fit without the finder would (same weights, other data order).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import lightning.pytorch as pl
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric

__all__ = ["run_finder", "hooks_removed_after"]


@contextmanager
def _search_state(trainer: pl.Trainer, model: pl.LightningModule, min_epochs: int | None) -> Iterator[None]:
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    loop = trainer.fit_loop
    max_epochs = loop.max_epochs
    if min_epochs is not None and max_epochs is not None and 0 <= max_epochs < min_epochs:
        loop.max_epochs = min_epochs
    try:
        yield
    finally:
        loop.max_epochs = max_epochs
        for name, param in model.named_parameters():
            if name in trainable:
                param.requires_grad_(trainable[name])
        for module in model.modules():
            if isinstance(module, Metric):
                module.reset()


@contextmanager
def hooks_removed_after(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Keep the hooks of ``handles`` (e.g. optimizer step hooks a finder's search needs) for the ``with`` block only.

    Args:
        handles: Hooks already registered; each is removed when the block ends, also when it raises.
    """
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_finder(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    finder: pl.Callback,
    hidden: Sequence[type] = (),
    min_epochs: int | None = None,
) -> None:
    """Run ``finder`` (a Lightning tuner callback) in a fit that it ends, as ``Tuner`` does, and restore the rest.

    Args:
        trainer: The Trainer the real fit will use.
        model: The task; its weights and strategy state come back from the finder's checkpoint, its trainable set
            and metric states from here.
        datamodule: The fit's data.
        finder: A ``LearningRateFinder`` or ``BatchSizeFinder``; it runs first at ``on_fit_start``.
        hidden: Callback classes taken out of the Trainer for the finder's fit (put back after, in place).
        min_epochs: Let the fit run at least this many epochs (a search counts steps, not epochs).
    """
    finder._early_exit = True  # type: ignore[attr-defined]  # what Tuner sets: end the fit after the search
    kept = list(trainer.callbacks)
    trainer.callbacks = [finder, *(c for c in kept if not isinstance(c, tuple(hidden)))]
    try:
        with _search_state(trainer, model, min_epochs), isolate_rng():
            trainer.fit(model, datamodule=datamodule)
    finally:
        # the fit attached the model's own callbacks (EMA): keep them; the next fit replaces them by type
        attached = [c for c in trainer.callbacks if c is not finder and not any(c is k for k in kept)]
        trainer.callbacks = [*kept, *attached]
