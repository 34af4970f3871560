"""Mixup and CutMix on the training batch, with soft-target cross-entropy (timm's ``Mixup``, as its ``train.py``).

:class:`BatchMixer` wraps :class:`timm.data.Mixup`: after the DataLoader (on the batch's device), it blends each
image with the batch's reversed order, ``x_i <- lam * x_i + (1 - lam) * x_{B-1-i}`` (Mixup) or pastes a box of
``x_{B-1-i}`` covering ``1 - lam`` of the image (CutMix), and returns the matching soft targets
``lam * onehot(y) + (1 - lam) * onehot(y.flip(0))`` with label smoothing applied inside (timm's ``mixup_target``:
``off = smoothing / C``, ``on = 1 - smoothing + off``), so the loss, :func:`soft_target_cross_entropy`, must not
smooth again. From ``off_epoch`` on (timm's ``--mixup-off-epoch``) batches pass through untouched and the task's
own loss (cross-entropy with its label smoothing) applies.

:func:`check_mixing` refuses, before anything is built, the set-ups where mixing is wrong: multi-label targets,
the focal loss (hard targets), strategies with several views (contrastive) and strategies that cache per-sample
outputs by dataset index (a mixed image is not the sample its index names).

Example:
    >>> import torch
    >>> mixer = BatchMixer(num_classes=3, mixup=1.0)
    >>> images, soft = mixer(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    >>> soft.shape, bool(torch.allclose(soft.sum(-1), torch.ones(4)))
    (torch.Size([4, 3]), True)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor

from cvft.errors import ConfigError, StrategyError
from cvft.strategies.base import Strategy

__all__ = [
    "MIX_MODES",
    "BatchMixer",
    "check_even_batch_size",
    "check_mixing",
    "dominant_labels",
    "soft_target_cross_entropy",
]

#: timm's ways of drawing the mixing coefficient: one for the batch, one per pair (i, B-1-i), one per image.
MIX_MODES = ("batch", "pair", "elem")

_soft_target_ce = SoftTargetCrossEntropy()


def soft_target_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Soft-target cross-entropy, timm's ``SoftTargetCrossEntropy``: ``mean_i sum_c -t_ic * log_softmax(z_i)_c``.

    Example:
        >>> import torch
        >>> logits, targets = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
        >>> hard = torch.nn.functional.cross_entropy(logits, targets)
        >>> bool(torch.isclose(soft_target_cross_entropy(logits, torch.eye(3)[targets]), hard))
        True
    """
    return _soft_target_ce(logits, soft_targets)


class _RecordingMixup(Mixup):
    """timm's ``Mixup`` that keeps the coefficient it drew last (a float, or per image in 'pair' / 'elem' mode)."""

    last_lam: float | Tensor | None = None

    def _mix_batch(self, x: Tensor) -> float:
        self.last_lam = super()._mix_batch(x)
        return self.last_lam

    def _mix_pair(self, x: Tensor) -> Tensor:
        self.last_lam = super()._mix_pair(x)
        return self.last_lam

    def _mix_elem(self, x: Tensor) -> Tensor:
        self.last_lam = super()._mix_elem(x)
        return self.last_lam


class BatchMixer:
    """Mixup / CutMix of a training batch with soft targets, switched off from ``off_epoch`` on.

    Args:
        num_classes: Classes of the single-label targets.
        mixup: Mixup's Beta(alpha, alpha) parameter; 0 turns Mixup off.
        cutmix: CutMix's Beta(alpha, alpha) parameter; 0 turns CutMix off.
        cutmix_minmax: CutMix box side as a fraction of the image, ``[min, max]``, drawn uniformly instead of from
            Beta(cutmix, cutmix) (timm: then CutMix is on whatever ``cutmix`` is).
        prob: Probability of mixing a batch (or an image, per ``mode``); an unmixed one gets smoothed one-hot
            targets.
        switch_prob: With both on, the probability of CutMix instead of Mixup.
        mode: ``"batch"`` (one coefficient per batch), ``"pair"`` or ``"elem"`` (per pair / image).
        label_smoothing: Label smoothing put into the soft targets.
        off_epoch: Epoch from which batches are no longer mixed (``None``: mix every epoch).

    Example:
        >>> import numpy as np, torch
        >>> mixer = BatchMixer(num_classes=2, mixup=0.4, label_smoothing=0.1, off_epoch=5)
        >>> mixer.active(4), mixer.active(5)
        (True, False)
        >>> np.random.seed(0)
        >>> _, soft = mixer(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
        >>> lam = mixer.last_lam
        >>> bool(torch.allclose(soft[0], lam * torch.tensor([0.95, 0.05]) + (1 - lam) * torch.tensor([0.05, 0.95])))
        True
    """

    def __init__(
        self,
        num_classes: int,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        cutmix_minmax: Sequence[float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.0,
        off_epoch: int | None = None,
    ) -> None:
        self.off_epoch = off_epoch
        self.mixup = _RecordingMixup(
            mixup_alpha=mixup,
            cutmix_alpha=cutmix,
            cutmix_minmax=list(cutmix_minmax) if cutmix_minmax is not None else None,
            prob=prob,
            switch_prob=switch_prob,
            mode=mode,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self._warned_odd = False

    @property
    def last_lam(self) -> float | Tensor | None:
        """The mixing coefficient of the last mixed batch (after CutMix's correction to the pasted box's area)."""
        return self.mixup.last_lam

    def active(self, epoch: int) -> bool:
        """Whether batches of ``epoch`` (0-based, Lightning's ``current_epoch``) are mixed."""
        return self.off_epoch is None or epoch < self.off_epoch

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Mixed images (in place) and their ``(B, num_classes)`` soft targets; ``B`` must be even (timm's rule)."""
        if len(images) % 2:
            raise ConfigError(
                f"Mixup/CutMix pairs image i with image B-1-i and needs an even batch, got {len(images)}; "
                "use an even batch size (--data.batch_size) and drop_last=True in custom DataLoaders."
            )
        return self.mixup(images, targets)

    def even_rows(self, count: int) -> int:
        """How many leading rows of a batch of ``count`` to mix and train on: all but the last of an odd batch.

        An odd batch happens at the end of an epoch when the DataLoader keeps its last partial batch (a dataset no
        larger than one batch, a custom loader without ``drop_last``); its last image is left out of that step, as
        ``drop_last`` would leave out the whole batch. Warns once.
        """
        if count % 2 == 0:
            return count
        if not self._warned_odd:
            self._warned_odd = True
            warnings.warn(
                f"Mixup/CutMix needs even batches; a batch of {count} trains on its first {count - 1} images. Use "
                "an even batch size with drop_last=True to use every image.",
                stacklevel=2,
            )
        return count - 1


def check_mixing(
    *,
    mixup: float,
    cutmix: float,
    cutmix_minmax: Sequence[float] | None,
    mode: str,
    multi_label: bool,
    loss: str,
    strategies: Iterable[Strategy],
    feature_cache: str,
) -> bool:
    """Refuse bad Mixup/CutMix options and set-ups that cannot train on mixed batches; return whether mixing is on.

    Raises:
        ConfigError: A bad ``mode`` or ``cutmix_minmax``, or mixing with multi-label targets, the focal loss or a
            forced feature cache.
        StrategyError: Mixing with a strategy that trains on several views or caches outputs per dataset index.

    Example:
        >>> from cvft.strategies import build_strategies
        >>> check_mixing(mixup=0.2, cutmix=1.0, cutmix_minmax=None, mode="batch", multi_label=False,
        ...              loss="cross_entropy", strategies=build_strategies(["lora"]), feature_cache="auto")
        True
        >>> check_mixing(mixup=0.2, cutmix=0.0, cutmix_minmax=None, mode="batch", multi_label=False,
        ...              loss="cross_entropy", strategies=build_strategies(["supcon"]), feature_cache="auto")
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: Strategy 'supcon' trains on 2 augmented views of each image, which Mixup/CutMix cannot mix (contrastive pairs need each view's hard label); set mixup=0 and cutmix=0 (--model.mixup 0 --model.cutmix 0), or leave 'supcon' out.
    """  # noqa: E501
    if mode not in MIX_MODES:
        raise ConfigError(f"Unknown mix_mode {mode!r}; choose one of {', '.join(MIX_MODES)} (--model.mix_mode).")
    if cutmix_minmax is not None:
        values = list(cutmix_minmax)
        if len(values) != 2 or not 0.0 < values[0] < values[1] <= 1.0:
            raise ConfigError(
                f"cutmix_minmax={values!r} must be two box-side fractions [min, max] with 0 < min < max <= 1, "
                "e.g. [0.2, 0.8]; or leave it out to draw from Beta(cutmix, cutmix)."
            )
    if not (mixup > 0 or cutmix > 0 or cutmix_minmax is not None):
        return False
    off = "set mixup=0 and cutmix=0 (--model.mixup 0 --model.cutmix 0)"
    if multi_label:
        raise ConfigError(
            f"Mixup/CutMix mix single-label targets; multi_label=True is not supported. Either {off}, or "
            "train single-label (multi_label=False)."
        )
    if loss != "cross_entropy":
        raise ConfigError(
            f"Mixup/CutMix train with soft-target cross-entropy, which loss={loss!r} cannot take; use "
            f"loss='cross_entropy', or {off}."
        )
    if feature_cache in ("memory", "disk"):
        raise ConfigError(
            f"feature_cache={feature_cache!r} trains on fixed features, which mixed images change at every step; "
            f"use feature_cache='auto' or 'off', or {off}."
        )
    for strategy in strategies:
        if strategy.num_views > 1:
            raise StrategyError(
                f"Strategy {strategy.name!r} trains on {strategy.num_views} augmented views of each image, which "
                "Mixup/CutMix cannot mix (contrastive pairs need each view's hard label); "
                f"{off}, or leave {strategy.name!r} out."
            )
        if strategy.needs_indices:
            raise StrategyError(
                f"Strategy {strategy.name!r} caches per-sample outputs by dataset index, but a mixed image is not "
                f"the sample its index names; turn that cache off (distillation: cache_logits=false), or {off}."
            )
    return True


def check_even_batch_size(datamodule: Any) -> None:
    """Refuse a DataModule whose ``batch_size`` is odd: timm's Mixup pairs every image with another one."""
    size = getattr(datamodule, "batch_size", None)
    if isinstance(size, int) and size % 2:
        raise ConfigError(
            f"Mixup/CutMix need an even batch (each image is mixed with its mirror in the batch), but "
            f"batch_size={size}; pass an even --data.batch_size such as {size + 1}."
        )


def dominant_labels(soft_targets: Tensor) -> Tensor:
    """The class with the largest share of each mixed target (the label train metrics use on a mixed step).

    Example:
        >>> import torch
        >>> dominant_labels(torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])).tolist()
        [0, 2]
    """
    return soft_targets.argmax(-1) if soft_targets.ndim == 2 else soft_targets.to(torch.long)
