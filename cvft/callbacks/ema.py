"""Exponential moving average (EMA) of the trained weights, on Lightning's own ``WeightAveraging`` callback.

:class:`EMAWeightAveraging` keeps ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step
(:func:`torch.optim.swa_utils.get_ema_multi_avg_fn` inside a :class:`~torch.optim.swa_utils.AveragedModel`), and
Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` does the rest: validation during the fit runs on the
EMA weights, the EMA weights replace the trained ones when the fit ends (so ``trainer.predict``, the adapter file and
``cvft export`` use them), and every checkpoint's ``state_dict`` holds the EMA weights.

Unlike Lightning's ``EMAWeightAveraging``, which copies the whole LightningModule, only the tensors that change are
averaged and copied: the trainable parameters (for LoRA, the low-rank factors and the head) and, with
``use_buffers`` (the default, as timm's ``ModelEmaV3``), the floating-point buffers such as BatchNorm running
statistics. Frozen weights are neither copied nor averaged, so a PEFT run's EMA costs the size of its adapter.
Integer buffers (BatchNorm's ``num_batches_tracked``) keep their live value.

The first update copies the weights after the first optimizer step (``AveragedModel``'s convention), so the EMA
never includes the untrained initialisation. With ``warmup`` the decay of the ``n``-th later update is
``min(decay, (1 + n) / (10 + n))`` (timm's ``ModelEma`` and TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``), so short runs are not dominated by the first steps.

A checkpoint keeps the EMA in ``state_dict`` (what :meth:`~cvft.tasks.FineTuningModule.from_checkpoint` and
``cvft predict`` load) and the trained values of the averaged tensors under ``checkpoint["cvft_ema"]``, so a fit
resumed from it continues both exactly.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> model[0].requires_grad_(False)
    Linear(in_features=2, out_features=2, bias=True)
    >>> [name for name, _ in trained_tensors(model, use_buffers=True)]
    ['1.weight', '1.bias']
    >>> EMAWeightAveraging(decay=0.9, warmup=True).decay_at(1)  # min(0.9, 2 / 11)
    0.18181818181818182
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cvft.errors import ConfigError

__all__ = ["SHORT_RUN_WEIGHT", "EMAWeightAveraging", "trained_tensors"]

SHORT_RUN_WEIGHT = 0.05
"""Without warm-up, a fit warns when the first step's weights keep more than this share of the final average
(``decay ** steps``): 0.99 needs about 300 steps, 0.999 about 3,000."""


def trained_tensors(module: nn.Module, use_buffers: bool) -> Iterator[tuple[str, Tensor]]:
    """The ``(state_dict key, tensor)`` pairs an EMA of ``module`` averages.

    The parameters that require gradients, then (with ``use_buffers``) the persistent floating-point buffers, except
    those the module lists in ``fitted_buffers`` (values fitted on validation data, not trained: the temperature of
    :class:`~cvft.tasks.ImageClassifier`).

    Args:
        module: The model being trained.
        use_buffers: Include floating-point buffers (BatchNorm running statistics).
    """
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            yield name, parameter
    if use_buffers:
        persistent = set(module.state_dict(keep_vars=True)) - set(getattr(module, "fitted_buffers", ()))
        for name, buffer in module.named_buffers():
            if name in persistent and buffer.is_floating_point():
                yield name, buffer


class _AveragedTensors(nn.Module):
    """The averaged tensors of a model, registered by reference (no copy), in the order of :attr:`names`."""

    def __init__(self, tensors: list[tuple[str, Tensor]]) -> None:
        super().__init__()
        self.names = [name for name, _ in tensors]
        for index, (_, tensor) in enumerate(tensors):
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(f"t{index}", tensor)
            else:
                self.register_buffer(f"t{index}", tensor)

    def tensors(self) -> list[Tensor]:
        """The tensors in the order of :attr:`names`."""
        return [getattr(self, f"t{index}") for index in range(len(self.names))]


class EMAWeightAveraging(WeightAveraging):
    """Keep an exponential moving average of the trainable weights and evaluate, save and predict with it.

    Args:
        decay: Weight of the previous average at each update, in ``(0, 1)``; ``0.999`` averages over about the last
            1,000 optimizer steps, ``0.99`` over about 100 (choose it against the number of steps of the run).
        warmup: Use ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th update (timm's warm-up), so that runs of few
            steps are not an average of mostly early weights.
        use_buffers: Average floating-point buffers (BatchNorm running statistics) too, as timm does; ``False``
            leaves them as training makes them.
        device: Where the averages live (``"cpu"`` saves accelerator memory); ``None``: with the model.

    Raises:
        ConfigError: ``decay`` is not in ``(0, 1)``.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = False,
        use_buffers: bool = True,
        device: torch.device | str | int | None = None,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(
                f"EMA decay must be in (0, 1), got {decay}: 0.999 averages over about the last 1,000 steps, "
                "0.99 over about 100 (on the command line: --model.ema_decay)."
            )
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self._average)
        self.decay = float(decay)
        self.warmup = warmup
        self.average_buffers = use_buffers
        self._averaged: _AveragedTensors | None = None

    @property
    def state_key(self) -> str:
        """One EMA state per configuration in a checkpoint."""
        return self._generate_state_key(decay=self.decay, warmup=self.warmup, use_buffers=self.average_buffers)

    def decay_at(self, num_averaged: int) -> float:
        """The decay of the update that follows ``num_averaged`` earlier ones (``>= 1``; the first one copies)."""
        if self.warmup:
            return min(self.decay, (1 + num_averaged) / (10 + num_averaged))
        return self.decay

    def _average(self, averages: list[Tensor], currents: list[Tensor], num_averaged: Tensor | int) -> None:
        get_ema_multi_avg_fn(self.decay_at(int(num_averaged)))(averages, currents, num_averaged)

    # ------------------------------------------------------------------ what is averaged
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """At fit, average the model's trainable tensors (a copy of those only; frozen weights stay shared)."""
        if stage != "fit":
            return
        self._averaged = _AveragedTensors(list(trained_tensors(pl_module, self.average_buffers)))
        if not self._averaged.names:
            raise ConfigError(
                "EMA of weights (ema_decay) found no trainable tensors to average: every parameter is frozen. "
                "Train something (check the strategies) or leave ema_decay unset."
            )
        device = self._device or pl_module.device
        self._average_model = AveragedModel(self._averaged, device=device, use_buffers=True, **self._kwargs)

    @property
    def averaged_names(self) -> list[str]:
        """The ``state_dict`` keys of the averaged tensors (empty before the fit sets them up)."""
        return [] if self._averaged is None else list(self._averaged.names)

    def average_tensors(self) -> dict[str, Tensor]:
        """The current averages by ``state_dict`` key."""
        if self._average_model is None or self._averaged is None:
            return {}
        return dict(zip(self._averaged.names, self._average_model.module.tensors(), strict=True))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the averages to the model's device (Lightning moves the model after ``setup``).

        Warns when the run is too short for the decay (see :data:`SHORT_RUN_WEIGHT`).
        """
        if self._average_model is not None and self._device is None:
            self._average_model.to(pl_module.device)
        steps = trainer.estimated_stepping_batches
        if not self.warmup and math.isfinite(steps) and self.decay**steps > SHORT_RUN_WEIGHT:
            suggested = SHORT_RUN_WEIGHT ** (1 / max(steps, 1))
            rank_zero_warn(
                f"EMA decay {self.decay} is too high for {int(steps)} optimizer steps: at the end of the fit the "
                f"weights after the first step still make up {self.decay**steps:.0%} of the average, so it lags "
                f"far behind training. Use ema_decay <= {suggested:.3f} or turn on ema_warmup "
                "(--model.ema_decay / --model.ema_warmup true).",
                category=UserWarning,
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        """Refuse tensors that became trainable after setup (gradual unfreezing): their EMA would not exist."""
        if batch_idx == 0 and self._averaged is not None:
            averaged = set(self._averaged.names)
            late = [name for name, p in pl_module.named_parameters() if p.requires_grad and name not in averaged]
            if late:
                raise ConfigError(
                    f"EMA of weights (ema_decay) averages the tensors trainable when the fit starts, but {len(late)} "
                    f"became trainable later (first: {late[0]}), as gradual_unfreeze does. Leave ema_decay unset "
                    "with strategies that unfreeze during training."
                )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Update the averages after each optimizer step."""
        super().on_train_batch_end(trainer, self._averaged, *args)  # type: ignore[arg-type]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch-end updates (none: :meth:`should_update` asks for steps only)."""
        super().on_train_epoch_end(trainer, self._averaged)  # type: ignore[arg-type]

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        """Swap the averaged tensors' values with the model's (validation runs on the EMA)."""
        assert self._average_model is not None and self._averaged is not None
        for average, current in zip(self._average_model.module.tensors(), self._averaged.tensors(), strict=True):
            swap = average.detach().clone()
            average.detach().copy_(current.detach())
            current.detach().copy_(swap)

    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        """Put the EMA into the model (at the end of the fit)."""
        assert self._average_model is not None and self._averaged is not None
        for average, current in zip(self._average_model.module.tensors(), self._averaged.tensors(), strict=True):
            current.detach().copy_(average.detach())

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Write the EMA into ``state_dict`` and the trained values of the averaged tensors to ``cvft_ema``."""
        if self._average_model is None:
            return  # outside a fit: the model already holds the EMA (copied in at the end of the fit)
        state = checkpoint["state_dict"]
        trained = {}
        for name, average in self.average_tensors().items():
            trained[name] = state[name]
            state[name] = average.detach().to(state[name].device, copy=True)
        checkpoint["cvft_ema"] = {"trained": trained, "n_averaged": self._average_model.n_averaged.detach().cpu()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """On resume: the averages from ``state_dict``, the model's trained values from ``cvft_ema``.

        A checkpoint written without EMA starts the average afresh (its first update copies the weights).
        """
        saved = checkpoint.get("cvft_ema")
        if self._average_model is None or self._averaged is None or saved is None:
            return
        missing = sorted(set(self._averaged.names) - set(saved["trained"]))
        if missing:
            raise ConfigError(
                f"The checkpoint's EMA does not cover the tensors this run trains (first missing: {missing[0]}); "
                "resume with the strategies the checkpoint was trained with."
            )
        state = checkpoint["state_dict"]
        with torch.no_grad():
            for name, average, current in zip(
                self._averaged.names, self._average_model.module.tensors(), self._averaged.tensors(), strict=True
            ):
                average.copy_(state[name])
                current.copy_(saved["trained"][name])
            self._average_model.n_averaged.copy_(saved["n_averaged"])
