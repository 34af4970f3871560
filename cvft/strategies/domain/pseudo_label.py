"""Pseudo-label self-training on unlabelled target-domain images (Lee, 2013), with a confidence threshold.

At every training step the strategy draws the next batch from its own endless stream over a folder of target images,
classifies it with the model being trained, keeps the images whose top softmax probability reaches ``threshold``
(FixMatch's filtering; ``threshold=0`` is Lee's original, every image kept) and adds the cross-entropy between the
model's logits and those hard pseudo-labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cvft.data.dataset import seed_worker
from cvft.data.transforms import AUGMENT_PRESETS
from cvft.errors import StrategyError
from cvft.strategies.base import Strategy
from cvft.strategies.domain.target import CyclingBatchSampler, target_dataset
from cvft.strategies.outputs import StepOutputs
from cvft.strategies.registry import register_strategy

__all__ = ["PseudoLabel"]


@register_strategy
class PseudoLabel(Strategy):
    """Self-training on unlabelled target images with confident pseudo-labels (Lee 2013; FixMatch-style threshold).

    Relation to plain supervised fine-tuning: the supervised cross-entropy on the labelled (source) batch stays as it
    is; this objective adds ``weight * CE(model(target), pseudo_labels)`` averaged over the confident target images of
    the step (a zero term when none is confident). With ``threshold=0`` it is entropy minimisation with hard labels.

    Design decisions:

    * One forward pass over the target batch, in the model's current mode: the pseudo-labels are the argmax of the
      *detached* logits of that same pass, so no gradient flows through the labels (the same values as a separate
      ``no_grad`` prediction in the same mode, at half the cost, with one dropout mask). In train mode BatchNorm
      normalises the target batch with its own statistics, apart from the source batch, which is what lets a
      source-trained network label a shifted domain well.
    * The stream over ``target_root`` is a seeded permutation per pass (every image once per pass) that survives
      checkpoints: the number of batches drawn and the epoch are saved, and a resumed run continues the same stream.
    * Under DDP every rank draws from its own shard of each pass (a
      :class:`~cvft.strategies.domain.target.CyclingBatchSampler` with the process group's rank and world size, read
      when the stream starts): at each step the ranks see different target images, together every image once per
      pass, and they all draw the same number of batches per pass.
    * The weight ramps up linearly from 0 over ``rampup_epochs`` (Lee's schedule, by epoch so that resuming gives the
      same value); the target pass is skipped while it is 0.
    * ``last_kept_fraction`` holds the share of the last target batch that passed the threshold (not a loss term).
    * Put parameter strategies first (they decide what trains); this objective only adds a loss term. Single-label
      classifiers only (softmax pseudo-labels).

    Args:
        target_root: Folder of unlabelled target-domain images (searched recursively).
        threshold: Keep target images whose top softmax probability is at least this (0..1).
        weight: Weight of the pseudo-label loss after ramp-up.
        rampup_epochs: Epochs of linear ramp-up from 0 (0: the full weight from the start).
        batch_size: Target images per training step.
        image_size: Input size (default: the backbone's pretrained size; give the training ``image_size``).
        augment: Augmentation preset for target images (``none``, ``light``, ``default``, ``strong``).
        num_workers: DataLoader workers for the target stream (0: load in the training process).
        seed: Seed of the target stream's order and augmentation.

    Example:
        >>> import tempfile, timm, torch
        >>> from pathlib import Path
        >>> from cvft.data.demo import write_demo_image_folder
        >>> from cvft.strategies import apply_strategies
        >>> root = write_demo_image_folder("digits", Path(tempfile.mkdtemp()) / "target", limit_per_class=1)
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> stack = apply_strategies(model, [{"name": "pseudo_label", "target_root": str(root), "threshold": 0.0,
        ...                                   "batch_size": 2, "image_size": 32}])
        >>> images = torch.randn(2, 3, 32, 32)
        >>> terms = stack.loss_terms(model, (images, torch.tensor([0, 1])), model(images))
        >>> list(terms), stack.strategies[0].last_kept_fraction
        (['pseudo_label/ce'], 1.0)
    """

    name = "pseudo_label"
    objective = True

    def __init__(
        self,
        target_root: str,
        threshold: float = 0.9,
        weight: float = 1.0,
        rampup_epochs: int = 0,
        batch_size: int = 32,
        image_size: int | None = None,
        augment: str = "none",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        if not target_root:
            raise StrategyError("pseudo_label needs target_root, a folder of unlabelled target-domain images.")
        if not 0.0 <= threshold <= 1.0:
            raise StrategyError(f"pseudo_label: threshold is a probability in [0, 1], got {threshold}.")
        if weight < 0:
            raise StrategyError(f"pseudo_label: weight must be >= 0, got {weight}.")
        if rampup_epochs < 0:
            raise StrategyError(f"pseudo_label: rampup_epochs must be >= 0, got {rampup_epochs}.")
        if batch_size < 1 or num_workers < 0:
            raise StrategyError(
                f"pseudo_label: need batch_size >= 1, num_workers >= 0; got {batch_size}, {num_workers}."
            )
        if augment not in AUGMENT_PRESETS:
            raise StrategyError(
                f"pseudo_label: unknown augment {augment!r}; choose one of {', '.join(AUGMENT_PRESETS)}."
            )
        if image_size is not None and image_size < 1:
            raise StrategyError(f"pseudo_label: image_size must be a positive number of pixels, got {image_size}.")
        self.target_root = str(target_root)
        self.threshold = float(threshold)
        self.weight = float(weight)
        self.rampup_epochs = int(rampup_epochs)
        self.batch_size = int(batch_size)
        self.image_size = image_size
        self.augment = augment
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self._last_kept_fraction: float | None = None
        self._dataset: Any = None
        self._stream: Iterator[Any] | None = None
        self._drawn = 0
        self._epoch = 0

    # --- setup and schedule ---------------------------------------------------------------------------------

    def setup(self, model: nn.Module) -> None:
        """Scan and check the target folder with the model's preprocessing (nothing in the model changes)."""
        if not callable(getattr(model, "get_classifier", None)):
            raise StrategyError("pseudo_label needs a timm classifier (a model with get_classifier()).")
        self._dataset = target_dataset(self.target_root, model, self.image_size, self.augment, self.seed)
        self._stream = None

    def on_epoch_start(self, model: nn.Module, epoch: int) -> list[str]:
        """Remember the epoch for the ramp-up; trainability is left alone."""
        self._epoch = epoch
        return []

    @property
    def last_kept_fraction(self) -> float | None:
        """Share of the last target batch whose confidence reached ``threshold`` (None before any target pass)."""
        return self._last_kept_fraction

    def current_weight(self) -> float:
        """The loss weight at the current epoch: ``weight * min(1, epoch / rampup_epochs)``."""
        if self.rampup_epochs == 0:
            return self.weight
        return self.weight * min(1.0, self._epoch / self.rampup_epochs)

    # --- the target stream ----------------------------------------------------------------------------------

    def next_target_batch(self) -> Tensor:
        """The next ``(B, C, H, W)`` batch of target images (CPU) from the endless seeded stream."""
        if self._dataset is None:
            raise StrategyError("pseudo_label was not set up: call setup(model) (apply_strategies does) first.")
        if self._stream is None:
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            sampler = CyclingBatchSampler(
                len(self._dataset), self.batch_size, self.seed, start=self._drawn, rank=rank, num_replicas=world
            )
            loader = DataLoader(
                self._dataset,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                worker_init_fn=seed_worker if self.num_workers > 0 else None,
            )
            self._stream = iter(loader)
        images, _ = next(self._stream)
        self._drawn += 1
        return images

    # --- the loss -------------------------------------------------------------------------------------------

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """``{"ce": weight * mean CE over the confident target images}`` (0 when none is confident)."""
        weight = self.current_weight()
        device = outputs.images.device
        if weight == 0.0:
            self._last_kept_fraction = None
            return {"ce": torch.zeros((), device=device)}
        images = self.next_target_batch().to(device, dtype=outputs.images.dtype, non_blocking=True)
        logits = model(images)
        return {"ce": weight * self.pseudo_label_loss(logits)}

    def pseudo_label_loss(self, logits: Tensor) -> Tensor:
        """Mean cross-entropy of ``logits`` against their own confident argmax labels; sets ``last_kept_fraction``."""
        probs = logits.detach().float().softmax(-1)
        confidence, labels = probs.max(-1)
        keep = confidence >= self.threshold
        self._last_kept_fraction = float(keep.float().mean())
        if not bool(keep.any()):
            return logits.sum() * 0.0  # keeps the graph (DDP) while adding nothing
        return F.cross_entropy(logits[keep].float(), labels[keep])

    # --- checkpoints ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Batches drawn from the target stream and the epoch, so a resumed run continues the same stream."""
        return {"drawn": self._drawn, "epoch": self._epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the stream restarts at the saved position."""
        self._drawn = int(state.get("drawn", 0))
        self._epoch = int(state.get("epoch", 0))
        self._stream = None
