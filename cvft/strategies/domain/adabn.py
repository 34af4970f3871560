"""AdaBN (Li et al., 2016): re-estimate every BatchNorm layer's statistics on unlabelled target-domain images.

A network trained on a source domain keeps its weights; only the running mean and variance of its BatchNorm layers
are replaced by those of the target domain, so each layer's inputs are normalised with target statistics. Domain
shifts that act as per-channel affine changes of a layer's input (colour casts, brightness, contrast, sensor gain)
are undone exactly at the first BatchNorm layer after them.

Three ways to use it:

* :func:`adabn` on a model and a target folder or loader (a hand-written loop, a notebook, after ``Trainer.fit``);
* :class:`AdaBNCallback`, the usual recipe: after source training (``on_fit_end``) and before a test or prediction
  run, so a checkpoint trained on the source domain is evaluated with target statistics;
* the strategy ``adabn`` (:class:`AdaBN`), which re-estimates once *before* fine-tuning starts (in the
  ``calibrate`` hook, before the optimizer exists), for fine-tuning a source-trained model on the target domain
  with BatchNorm statistics kept fixed (``linear_probe``, ``lora``, ``bitfit`` ... freeze them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cvft.errors import StrategyError
from cvft.strategies._freeze import freeze_batchnorm_stats, has_frozen_stats, release_batchnorm_stats
from cvft.strategies.base import LossFn, Strategy
from cvft.strategies.domain.target import target_loader
from cvft.strategies.registry import register_strategy

__all__ = ["adabn", "AdaBN", "AdaBNCallback"]

_logger = logging.getLogger(__name__)


def _batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        raise StrategyError(
            f"AdaBN re-estimates BatchNorm statistics, but {type(model).__name__} has no BatchNorm layer with "
            "running statistics (ViTs, ConvNeXt and other LayerNorm/GroupNorm models normalise each sample on its "
            "own and have nothing to adapt). Use AdaBN on BatchNorm CNNs (ResNet, EfficientNet, MobileNet, RegNet "
            "...), or adapt other models with the 'pseudo_label' strategy."
        )
    return layers


class _PooledMoments:
    """Exact per-channel mean and unbiased variance of everything a BatchNorm layer receives, merged batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None  # sum of squared deviations from the mean

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().to(torch.float64)
        x = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * spatial)
        n = x.shape[1]
        mean = x.mean(1)
        m2 = (x - mean[:, None]).square().sum(1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def write_to(self, layer: _BatchNorm) -> None:
        if self.mean is None or self.m2 is None or self.count < 2:
            return
        assert layer.running_mean is not None and layer.running_var is not None
        layer.running_mean.copy_(self.mean.to(layer.running_mean.dtype))
        layer.running_var.copy_((self.m2 / (self.count - 1)).to(layer.running_var.dtype))


def _images_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["image"] if "image" in batch else next(iter(batch.values()))
    return batch[0]


@torch.no_grad()
def adabn(
    model: nn.Module,
    target: str | Path | Iterable[Any],
    batches: int | None = None,
    image_size: int | Sequence[int] | None = None,
    batch_size: int = 32,
) -> int:
    """Replace every BatchNorm layer's running mean and variance by their values on target-domain images.

    Running statistics are reset, then every target batch goes through the model with BatchNorm layers in train mode
    (each batch normalised with its own statistics, ``momentum=None``) and everything else in eval mode (no dropout,
    no stochastic depth). Each layer's running mean and unbiased running variance become the exact statistics of
    *all* the inputs it received, pooled over images and positions (not an average of per-batch values).
    Parameters, gradients, module modes and momentums are left as they were; layers whose statistics a freezing
    strategy keeps fixed get the new statistics and stay fixed.

    Args:
        model: A model with BatchNorm layers, on the device the images should go to.
        target: A folder of target images (preprocessed with the model's pretrained data config, see
            :func:`~cvft.strategies.domain.target.target_dataset`), or an iterable of batches: image tensors,
            ``(images, ...)`` tuples or ``{"image": ...}`` mappings.
        batches: Use at most this many batches (``None``: all).
        image_size: Input size for a folder (default: the model's pretrained size).
        batch_size: Batch size for a folder.

    Returns:
        The number of images used.

    Raises:
        StrategyError: ``model`` has no BatchNorm layer with running statistics, or ``target`` yields no images.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> shifted = [torch.randn(8, 3, 32, 32) * 0.5 + 2.0 for _ in range(2)]
        >>> adabn(model, shifted)
        16
        >>> model.conv1[1].running_mean.abs().sum() > 0
        tensor(True)
    """
    layers = _batchnorm_layers(model)
    if isinstance(target, (str, Path)):
        target = target_loader(target, model, image_size, batch_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = [(module, module.training) for module in model.modules()]
    guarded = [layer for layer in layers if has_frozen_stats(layer)]
    momentums = [layer.momentum for layer in layers]
    moments = [_PooledMoments() for _ in layers]
    hooks = [layer.register_forward_pre_hook(m) for layer, m in zip(layers, moments, strict=True)]
    seen = 0
    try:
        for layer in guarded:
            release_batchnorm_stats(layer, True)
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        for step, batch in enumerate(target):
            if batches is not None and step >= batches:
                break
            images = _images_of(batch).to(device, non_blocking=True)
            model(images)
            seen += len(images)
        if seen == 0:
            raise StrategyError("AdaBN got no target images: the target folder or loader is empty.")
        for layer, m in zip(layers, moments, strict=True):
            m.write_to(layer)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, momentum in zip(layers, momentums, strict=True):
            layer.momentum = momentum
        for layer in guarded:
            freeze_batchnorm_stats(layer)
        for module, training in modes:
            module.training = training
    return seen


@register_strategy
class AdaBN(Strategy):
    """Re-estimate BatchNorm statistics on a target-domain folder before fine-tuning starts (AdaBN, Li et al. 2016).

    Relation to plain supervised fine-tuning: the supervised cross-entropy on labelled (source) images is unchanged;
    AdaBN adds no loss term and trains nothing. It runs once, after every strategy's ``setup`` and before the
    optimizer exists (the ``calibrate`` hook; not again when a run resumes), on the fit's device. The statistics
    then last only if BatchNorm statistics stay fixed while training: put a parameter strategy that freezes them
    first (``linear_probe``, ``lora``, ``bitfit`` ...); with full fine-tuning they drift back to the training data
    (a warning says so). To adapt a model *after* source training, use :class:`AdaBNCallback` or :func:`adabn`.
    ``Strategy.calibrate`` receives the fit's training batches; AdaBN ignores them and reads ``target_root``.

    Args:
        target_root: Folder of unlabelled target-domain images (searched recursively).
        image_size: Input size (default: the backbone's pretrained size; give the training ``image_size``).
        batch_size: Images per re-estimation batch.
        batches: Use at most this many batches (``None``: the whole folder).

    Example:
        >>> import tempfile, timm
        >>> from cvft.data.demo import write_demo_image_folder
        >>> from cvft.strategies import apply_strategies
        >>> root = write_demo_image_folder("digits", Path(tempfile.mkdtemp()) / "target", limit_per_class=1)
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> stack = apply_strategies(model, ["linear_probe", {"name": "adabn", "target_root": str(root),
        ...                          "image_size": 32}], calibration_data=[])
        >>> int(model.bn1.num_batches_tracked)
        1
    """

    name = "adabn"
    needs_data = True
    #: Not a parameter strategy (it trains nothing): like the objectives, it changes what the model learns from.
    objective = True

    def __init__(
        self,
        target_root: str,
        image_size: int | None = None,
        batch_size: int = 32,
        batches: int | None = None,
    ) -> None:
        if not target_root:
            raise StrategyError("adabn needs target_root, a folder of unlabelled target-domain images.")
        if image_size is not None and image_size < 1:
            raise StrategyError(f"adabn: image_size must be a positive number of pixels, got {image_size}.")
        if batch_size < 1:
            raise StrategyError(f"adabn: batch_size must be >= 1, got {batch_size}.")
        if batches is not None and batches < 1:
            raise StrategyError(f"adabn: batches must be >= 1 or None (all), got {batches}.")
        self.target_root = str(target_root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.batches = batches

    def setup(self, model: nn.Module) -> None:
        """Check that the model has BatchNorm layers (fails early, before any data is read)."""
        _batchnorm_layers(model)

    def calibrate(self, model: nn.Module, batches: Iterable[Any], loss_fn: LossFn) -> None:
        """Re-estimate the BatchNorm statistics on the target folder (the training ``batches`` are not used)."""
        layers = _batchnorm_layers(model)
        if not all(has_frozen_stats(layer) for layer in layers):
            _logger.warning(
                "adabn: some BatchNorm layers keep updating during training, so the target statistics will drift "
                "back to the training data. Put a strategy that freezes BatchNorm statistics (linear_probe, lora, "
                "bitfit ...) before adabn, or apply AdaBN after training with AdaBNCallback."
            )
        used = self.reestimate(model)
        _logger.info("adabn: re-estimated %d BatchNorm layers on %d target images", len(layers), used)

    def reestimate(self, model: nn.Module) -> int:
        """Re-estimate ``model``'s BatchNorm statistics on the target folder (:func:`adabn`); return the images used."""
        return adabn(model, self.target_root, self.batches, self.image_size, self.batch_size)


class AdaBNCallback(pl.Callback):
    """Apply :func:`adabn` to the module's backbone after training and/or before testing or predicting.

    The usual AdaBN recipe: train on the labelled source domain, then re-estimate BatchNorm statistics on the target
    domain before evaluating there. ``on_fit_end`` runs after the last checkpoint was written, so checkpoints hold
    source statistics; keep ``"test"`` / ``"predict"`` in ``stages`` to adapt whatever checkpoint is evaluated.
    Re-estimating twice gives the same statistics (the evaluation transform is deterministic).

    Args:
        target_root: Folder of unlabelled target-domain images (searched recursively).
        stages: When to re-estimate: any of ``"fit_end"``, ``"validate"``, ``"test"``, ``"predict"`` (the start of
            that loop; ``"validate"`` only for ``Trainer.validate``, never between training epochs).
        module_attr: Attribute path of the backbone in the LightningModule (default: the first timm model found).
        **options: ``image_size``, ``batch_size`` and ``batches`` of the re-estimation, checked and documented as
            for the ``adabn`` strategy (:class:`AdaBN`), which the callback runs.

    Example:
        >>> callback = AdaBNCallback("data/target", image_size=32, stages=("test",))
        >>> callback.stages, callback.adaptation.image_size
        (('test',), 32)
    """

    STAGES = ("fit_end", "validate", "test", "predict")

    def __init__(
        self,
        target_root: str,
        stages: Sequence[str] = ("fit_end", "test", "predict"),
        module_attr: str | None = None,
        **options: Any,
    ) -> None:
        unknown = [stage for stage in stages if stage not in self.STAGES]
        if unknown or not stages:
            raise StrategyError(f"AdaBNCallback: unknown stages {unknown}; choose from {', '.join(self.STAGES)}.")
        self.adaptation = AdaBN(target_root, **options)
        """The re-estimation the callback runs (its target folder and options)."""
        self.stages = tuple(stages)
        self.module_attr = module_attr

    def apply(self, pl_module: pl.LightningModule) -> int:
        """Re-estimate now; returns the number of target images used."""
        from cvft.strategies.callback import find_backbone

        backbone = find_backbone(pl_module, self.module_attr)
        used = self.adaptation.reestimate(backbone)
        _logger.info("AdaBN: BatchNorm statistics re-estimated on %d target images", used)
        return used

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After source training."""
        if "fit_end" in self.stages:
            self.apply(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before ``Trainer.validate`` (not the validation runs inside ``fit``)."""
        if "validate" in self.stages and not trainer.training and trainer.state.fn == "validate":
            self.apply(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before testing."""
        if "test" in self.stages:
            self.apply(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before predicting."""
        if "predict" in self.stages:
            self.apply(pl_module)
