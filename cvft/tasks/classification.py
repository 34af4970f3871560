"""Image classification on a timm backbone, single- or multi-label, with pluggable fine-tuning strategies."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)

from cvft.data.preference import PreferencePairDataset, split_pair_targets
from cvft.errors import ConfigError, CvftError, DatasetError
from cvft.strategies.callback import calibrate_before_fit
from cvft.strategies.outputs import StepBatch, StepOutputs, forward_with_features, split_views
from cvft.strategies.support import TaskSupport
from cvft.tasks.base import DEFAULT_LR, FineTuningModule
from cvft.tasks.feature_cache import FEATURE_CACHE_MODES, ActiveFeatureCache, activate_feature_cache, head_logits
from cvft.tasks.losses import LOSSES, focal_loss
from cvft.tasks.mixing import (
    BatchMixer,
    check_even_batch_size,
    check_mixing,
    dominant_labels,
    soft_target_cross_entropy,
)
from cvft.tasks.temperature import MAX_TEMPERATURE, MIN_TEMPERATURE, TemperatureFit, calibrate_temperature
from cvft.tasks.tta import check_tta, tta_logits

if TYPE_CHECKING:
    from cvft.adapter_files import AdapterInfo

__all__ = ["DEFAULT_LR", "ImageClassifier", "label_metrics", "metric_inputs"]

_logger = logging.getLogger(__name__)

MAX_AUROC_CLASSES = 100
"""Single-label validation / test AUROC (macro, one-vs-rest; binary: the AUROC) is logged up to this many classes."""


def label_metrics(
    num_classes: int, multi_label: bool, prefix: str, extra: Mapping[str, Metric] | None = None
) -> MetricCollection:
    """The metrics every classification head logs: ``acc``, ``f1_macro`` and, for multi-label, ``auroc``.

    Single-label accuracy is top-1 over all images (micro); F1 and AUROC are macro averages over the classes.

    Args:
        num_classes: Classes of the head (labels, for multi-label).
        multi_label: Score independent sigmoid labels (:func:`metric_inputs`) instead of one class per image.
        prefix: Prefix of the logged names (``"val/"``, ``"val/<task>/"``).
        extra: Further metrics by name, after those.

    Example:
        >>> list(label_metrics(4, multi_label=True, prefix="val/").keys())
        ['val/acc', 'val/auroc', 'val/f1_macro']
    """
    if multi_label:
        metrics: dict[str, Metric] = {
            "acc": MultilabelAccuracy(num_classes),
            "f1_macro": MultilabelF1Score(num_classes, average="macro"),
            "auroc": MultilabelAUROC(num_classes, average="macro"),
        }
    else:
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        }
    # no compute groups: torchmetrics merges metrics whose states match after the first update, which silently
    # made macro F1 (top-1) report top-5 statistics whenever the first batch had equal top-1 and top-5 counts
    return MetricCollection({**metrics, **(extra or {})}, prefix=prefix, compute_groups=False)


def metric_inputs(logits: Tensor, targets: Tensor, multi_label: bool) -> tuple[Tensor, Tensor]:
    """What :func:`label_metrics` are updated with: probabilities (sigmoid for multi-label, else softmax), targets.

    Multi-label 0/1 targets become int64, as torchmetrics wants them.
    """
    if multi_label:
        return logits.sigmoid(), targets.long()
    return logits.softmax(-1), targets


class ImageClassifier(FineTuningModule):
    """Fine-tune a timm backbone for image classification.

    The backbone keeps its own classifier head (``num_classes`` outputs), so strategies see a plain timm model
    and the trained backbone exports as one. Every parameter goes into named optimizer groups (layer group x weight
    decay x learning-rate scale); frozen ones cost nothing and can unfreeze later without changing the optimizer's
    layout. Mixed precision is the Trainer's ``precision`` switch (``"bf16-mixed"``, ``"16-mixed"``).

    The options every task shares (``pretrained``, ``weights``, ``strategies``, the optimiser and schedule, the
    training toolbox) and ``drop_rate``, ``compile`` and ``compile_mode`` are documented on
    :class:`~cvft.tasks.base.FineTuningModule`, which handles them for every task.

    Args:
        backbone: timm model name, with an optional pretrained tag (``vit_small_patch16_224.augreg_in21k``).
        num_classes: Number of classes; the CLI links it from the data module.
        class_names: Class names, stored in checkpoints and used in prediction files.
        multi_label: Independent sigmoid outputs with binary cross-entropy instead of a softmax.
        label_smoothing: Label smoothing for single-label cross-entropy.
        pos_weight: Per-class positive weights for multi-label BCE (for imbalanced labels).
        lr: Peak learning rate (scaled per parameter by strategies such as ``layerwise_lr``). ``None``: the
            strategies' measured default (:attr:`~cvft.strategies.Strategy.default_lr`: ``linear_probe`` 1e-2,
            ``lora`` and ``bitfit`` 3e-3; the smallest when several have one), else :data:`DEFAULT_LR`. The value
            used is what ``hparams.lr`` and checkpoints record. ``"auto"``: Lightning's learning-rate finder picks it
            before the fit (``cvft fit --model.lr auto``, :func:`cvft.tuning.find_learning_rate`); the rate found,
            or that default when the finder cannot suggest one, is what checkpoints record.
        adapter: An adapter file (``.safetensors`` from :meth:`save_adapter`) to put on the backbone after the
            strategies are set up; it must come from the same backbone.
        loss: ``"cross_entropy"`` (BCE for multi-label) or ``"focal"`` (:func:`cvft.tasks.losses.focal_loss`, for
            imbalanced data such as rare findings); focal uses ``pos_weight`` too but not ``label_smoothing``.
        focal_gamma: Focal loss focusing parameter (0 gives cross-entropy).
        focal_alpha: Focal loss class weighting: one weight per class (single-label), or for multi-label a value in
            ``[0, 1]`` (or one per class) weighting positives by ``alpha`` and negatives by ``1 - alpha``.
            ``None``: no weighting.
        feature_cache: Train the head on the frozen backbone's cached features instead of decoding images every
            epoch (:mod:`cvft.tasks.feature_cache`). ``auto`` caches on disk (``$CVFT_CACHE/features``) when the
            features cannot change during the fit: ``linear_probe`` (without ``train_bn``) or ``classifier_only``,
            ``augment: none``, a cvft DataModule; the log says whether it is on and why. ``memory`` / ``disk``
            insist (a fit where the features would change is refused); ``off`` never caches. The training is the
            same either way (same batches, same head weights).
        mixup: Mixup's Beta(alpha, alpha) parameter (timm's ``--mixup``; 0.2-0.8 is usual); 0 turns it off. Mixing
            (:mod:`cvft.tasks.mixing`, timm's ``Mixup``) runs on the training batch after the DataLoader, on its
            device; the loss is soft-target cross-entropy, with ``label_smoothing`` put into the mixed targets
            (applied once). Validation, test and prediction see plain images. Single-label cross-entropy only; a
            contrastive strategy (several views) or a per-sample cache (``distillation`` with ``cache_logits``) is
            refused, the feature cache stays off, and the batch size must be even (an odd last batch trains on all
            but its last image). Train metrics on a mixed step use each image's dominant label.
        cutmix: CutMix's Beta(alpha, alpha) parameter (timm's ``--cutmix``; 1.0 is usual); 0 turns it off.
        cutmix_minmax: CutMix box side as fractions ``[min, max]`` of the image, drawn uniformly instead of from
            Beta(cutmix, cutmix); turns CutMix on.
        mix_prob: Probability of mixing a batch (``mix_mode="batch"``) or an image.
        mix_switch_prob: With both Mixup and CutMix on, the probability of CutMix instead of Mixup.
        mix_mode: ``"batch"`` (one coefficient per batch), ``"pair"`` or ``"elem"`` (one per pair or image).
        mix_off_epoch: Epoch (0-based) from which batches are no longer mixed and the plain loss applies (timm's
            ``--mixup-off-epoch``); ``None`` mixes every epoch.
        temperature_scaling: Calibrate the probabilities after every validation of the fit: fit one temperature ``T``
            minimising the validation NLL of ``logits / T`` (:mod:`cvft.tasks.temperature`; Guo et al. 2017) on the
            weights just validated (the EMA when ``ema_decay`` is set), so every checkpoint (``best.ckpt``,
            ``last.ckpt``) holds the ``T`` of its own weights in the ``temperature`` buffer. Test and predict divide
            the logits by ``T`` (the argmax does not change), the adapter file records it, ``val/temperature``,
            ``val/nll``, ``val/nll_scaled``, ``val/ece`` and ``val/ece_scaled`` are logged and the fit's report
            writes ``calibration.json`` / ``.csv`` / ``.png``. Multi-label: one ``T`` for all labels. Needs
            validation data.
        tta: Test-time augmentation in ``test`` and ``predict`` (:mod:`cvft.tasks.tta`): ``"none"``, ``"flip"``
            (image and mirror), ``"crops"`` (five crops of the batch resized by ``1 / tta_crop_pct``) or
            ``"flip_crops"`` (the ten-crop); the views' probabilities are averaged. Training and validation never
            use it. Outside ``fit`` a value given on the command line overrides the checkpoint's.
        tta_crop_pct: Side fraction each TTA crop covers, in ``(0, 1]`` (timm's ``crop_pct``).
        **kwargs: The options every task shares, forwarded to :class:`~cvft.tasks.base.FineTuningModule`.

    Example:
        >>> import torch
        >>> model = ImageClassifier("test_vit", pretrained=False, num_classes=3, strategies="linear_probe")
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 3])
        >>> sum(p.requires_grad for p in model.parameters())
        2
    """

    strategy_support = TaskSupport(
        "ImageClassifier", calibration=True, loss_terms=True, views=True, indices=True, own_steps=True,
        pair_targets=True,
    )  # fmt: skip
    #: Buffers fitted on validation data rather than trained: the EMA of weights leaves them alone.
    fitted_buffers: ClassVar[tuple[str, ...]] = ("temperature",)
    #: Arguments that change only test and predict: outside ``fit`` the command line overrides the checkpoint's.
    inference_options: ClassVar[tuple[str, ...]] = ("tta", "tta_crop_pct")

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224.augreg_in21k",
        *,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        multi_label: bool = False,
        label_smoothing: float = 0.0,
        pos_weight: list[float] | None = None,
        lr: float | Literal["auto"] | None = None,
        adapter: str | None = None,
        loss: Literal["cross_entropy", "focal"] = "cross_entropy",
        focal_gamma: float = 2.0,
        focal_alpha: float | list[float] | None = None,
        feature_cache: Literal["auto", "memory", "disk", "off"] = "auto",
        mixup: float = 0.0,
        cutmix: float = 0.0,
        cutmix_minmax: list[float] | None = None,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
        mix_mode: Literal["batch", "pair", "elem"] = "batch",
        mix_off_epoch: int | None = None,
        drop_rate: float | None = None,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None,
        temperature_scaling: bool = False,
        tta: Literal["none", "flip", "crops", "flip_crops"] = "none",
        tta_crop_pct: float = 0.875,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if num_classes is None:
                num_classes = len(class_names)
            elif num_classes != len(class_names):
                raise CvftError(
                    f"num_classes={num_classes} but {len(class_names)} class names were given; "
                    "pass matching values or leave num_classes out."
                )
        if num_classes is None:
            raise ConfigError(
                "ImageClassifier needs num_classes >= 2 (or class_names). On the command line the data module "
                "provides it; in Python pass num_classes=... ."
            )
        self.save_task_hparams(
            check=(
                "num_classes", "label_smoothing", "pos_weight", "focal_gamma",
                "mixup", "cutmix", "mix_prob", "mix_switch_prob", "mix_off_epoch",
            )
        )  # fmt: skip
        if pos_weight is not None and (not multi_label or len(pos_weight) != num_classes):
            raise CvftError(f"pos_weight needs multi_label=True and one value per class ({num_classes}).")
        if feature_cache not in FEATURE_CACHE_MODES:
            raise ConfigError(
                f"Unknown feature_cache {feature_cache!r}; choose one of {', '.join(FEATURE_CACHE_MODES)}."
            )
        focal_weights = _focal_alpha(loss, focal_gamma, focal_alpha, label_smoothing, num_classes, multi_label)
        check_tta(tta, tta_crop_pct)

        self.build_strategy_stack()
        # ppo / trpo take several optimizer steps (or a line search) per batch: Lightning's manual optimisation
        self.automatic_optimization = not self.strategy_stack.steps_itself
        # what both the check and the mixer read
        mix_options = {"mixup": mixup, "cutmix": cutmix, "cutmix_minmax": cutmix_minmax, "mode": mix_mode}
        mixing = check_mixing(
            **mix_options,
            multi_label=multi_label,
            loss=loss,
            strategies=self.strategy_stack,
            feature_cache=feature_cache,
        )
        self.mixer: BatchMixer | None = None
        """Mixup / CutMix of the training batches (``None``: off)."""
        if mixing:
            self.mixer = BatchMixer(
                num_classes,
                **mix_options,
                prob=mix_prob,
                switch_prob=mix_switch_prob,
                label_smoothing=label_smoothing,
                off_epoch=mix_off_epoch,
            )
        self.backbone = self.create_task_backbone(num_classes)
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.multi_label = multi_label
        self.register_buffer("temperature", torch.tensor(1.0))
        """Temperature scaling's ``T`` (1: none): test and predict divide the logits by it."""
        self.register_load_state_dict_pre_hook(_default_temperature)
        self.temperature_fit: TemperatureFit | None = None
        """The latest temperature fit of this fit (``None``: none yet, or ``temperature_scaling`` off)."""
        self._validation_outputs: list[tuple[Tensor, Tensor]] | None = None
        self.setup_strategies()
        if adapter is not None:
            self.load_adapter(adapter)

        if multi_label:
            weight = torch.tensor(pos_weight, dtype=torch.float32) if pos_weight is not None else None
            self.register_buffer("pos_weight", weight, persistent=False)
        self.register_buffer("focal_alpha", focal_weights, persistent=False)
        self.train_metrics = self._metrics("train/")
        self.val_metrics = self._metrics("val/")
        self.test_metrics = self._metrics("test/")
        self.val_confusion = None if multi_label else MulticlassConfusionMatrix(num_classes)
        self.last_val_confusion: Tensor | None = None
        self._calibrated = False
        self.feature_cache: ActiveFeatureCache | None = None
        """The cached features of the running (or last) fit; ``None``: that fit decoded images."""

    # ------------------------------------------------------------------ adapter files
    @classmethod
    def adapter_arguments(cls, path: str | Path) -> dict[str, Any]:
        """Backbone, strategies and class names stored in a classifier adapter file."""
        from cvft.adapter_files import read_adapter

        _, info = read_adapter(path)
        kwargs: dict[str, Any] = {"backbone": info.backbone, "strategies": info.strategies}
        if info.class_names:
            kwargs["class_names"] = info.class_names
        return kwargs

    def save_adapter(self, path: str | Path) -> Path:
        """Write the trained tensors (adapter, head, updating BatchNorm statistics) and metadata to ``path``."""
        from cvft.adapter_files import save_adapter

        return save_adapter(
            self.backbone,
            path,
            self.hparams.backbone,
            self.strategy_stack.config(),
            class_names=self.class_names,
            temperature=float(self.temperature),
        )

    def load_adapter(self, path: str | Path) -> AdapterInfo:
        """Copy an adapter file's tensors onto the backbone (same backbone and strategies) and its temperature."""
        from cvft.adapter_files import load_adapter

        info = load_adapter(self.backbone, path, backbone=self.hparams.backbone)
        self.temperature.fill_(info.temperature)
        return info

    def _metrics(self, prefix: str) -> MetricCollection:
        n = self.num_classes
        extra: dict[str, Metric] = {}
        if not self.multi_label:
            if n > 5:
                extra["acc_top5"] = MulticlassAccuracy(n, top_k=5, average="micro")
            if prefix != "train/" and n <= MAX_AUROC_CLASSES:  # exact AUROC keeps every probability of the epoch
                extra["auroc"] = MulticlassAUROC(n, average="macro")
        return label_metrics(n, self.multi_label, prefix, extra)

    # ------------------------------------------------------------------ forward and loss
    def forward(self, images: Tensor) -> Tensor:
        """Logits of shape ``(batch, num_classes)``."""
        return self.backbone(images)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy (with label smoothing) or, for multi-label, BCE with ``pos_weight``; or the focal loss."""
        if self.hparams.loss == "focal":
            pos_weight = self.pos_weight if self.multi_label else None
            return focal_loss(
                logits, targets, self.hparams.focal_gamma, self.focal_alpha, self.multi_label, pos_weight=pos_weight
            )
        if self.multi_label:
            return nn.functional.binary_cross_entropy_with_logits(
                logits, targets.to(logits.dtype), pos_weight=self.pos_weight
            )
        return nn.functional.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)

    def _metric_inputs(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return metric_inputs(logits, targets, self.multi_label)

    def training_step(self, batch: Sequence[Tensor] | Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """Task loss (weighted by the strategies' ``task_loss_weight``) plus every strategy's loss terms.

        A batch is ``(images, targets[, indices])``; images of shape ``(B, V, C, H, W)`` carry ``V`` augmented views
        (strategies with ``num_views > 1``), and every view is classified. With the feature cache on, a batch is
        ``{"features", "target"}`` and only the head runs. With ``mixup`` / ``cutmix`` on (before ``mix_off_epoch``),
        the images are mixed, the task loss is soft-target cross-entropy, strategies see the soft targets and the
        train metrics the dominant labels.
        """
        if isinstance(batch, Mapping):
            return self._feature_training_step(batch)
        if not self.automatic_optimization:
            return self._self_stepping_training_step(batch)
        if self.strategy_stack.pair_targets:
            return self._pair_training_step(batch)
        images, targets, views = split_views(batch[0], batch[1])
        indices = batch[2] if len(batch) > 2 else None
        soft_targets = None
        if self.mixer is not None and self.mixer.active(self.current_epoch) and len(images) > 1:
            rows = self.mixer.even_rows(len(images))
            if rows < len(images):
                images, targets = images[:rows], targets[:rows]
                indices = indices[:rows] if isinstance(indices, Tensor) else indices
            images, soft_targets = self.mixer(images, targets)
        stack = self.strategy_stack
        if stack.needs_features:
            logits, features = forward_with_features(self.backbone, images)
        else:
            logits, features = self(images), None
        size = len(images)
        if soft_targets is None:
            task_loss = self.loss(logits, targets)
        else:  # label smoothing is already in the soft targets
            task_loss = soft_target_cross_entropy(logits, soft_targets)
            targets = soft_targets
        self.log("train/task_loss", task_loss, on_epoch=True, on_step=False, batch_size=size)
        weight = stack.task_loss_weight
        loss = task_loss * weight if weight != 1.0 else task_loss
        if len(stack):
            outputs = StepOutputs(logits, images, targets, features, num_views=views, indices=indices)
            for name, term in stack.loss_terms(self.backbone, batch, outputs).items():
                self.log(f"train/{name}", term, on_epoch=True, on_step=False, batch_size=size)
                loss = loss + term
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, on_step=True, batch_size=size)
        labels = targets if soft_targets is None else dominant_labels(soft_targets)
        self.train_metrics.update(*self._metric_inputs(logits.detach(), labels))
        self.log_dict(self.train_metrics, on_epoch=True, on_step=False, batch_size=size)
        return loss

    def _pair_training_step(self, batch: Sequence[Tensor]) -> Tensor:
        """The step of objectives trained on preference pairs (``dpo``, ``reward_model``): their terms only."""
        images, targets, views = split_views(batch[0], batch[1])
        indices = batch[2] if len(batch) > 2 else None
        logits = self(images)
        split_pair_targets(targets, num_classes=logits.shape[-1], multi_label=self.multi_label)  # refuse labels
        size = len(images)
        outputs = StepOutputs(logits, images, targets, None, num_views=views, indices=indices)
        loss = logits.new_zeros(())
        for name, term in self.strategy_stack.loss_terms(self.backbone, batch, outputs).items():
            self.log(f"train/{name}", term, on_epoch=True, on_step=False, batch_size=size)
            loss = loss + term
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, on_step=True, batch_size=size)
        return loss

    def _self_stepping_training_step(self, batch: Sequence[Tensor]) -> Tensor:
        """Manual optimisation for an objective that takes its own steps (``ppo``, ``trpo``).

        The objective writes gradients and calls the task's optimizer (:meth:`Strategy.optimisation_step`); the
        learning-rate schedule then advances once per training batch. Gradient clipping and accumulation of the
        Trainer do not apply (Lightning refuses them under manual optimisation).
        """
        images, targets, views = split_views(batch[0], batch[1])
        if views > 1:
            raise ConfigError("ppo / trpo train on one view per image; drop the strategy asking for several views.")
        step_batch = StepBatch(images, targets, batch[2] if len(batch) > 2 else None)
        optimizer = self.optimizers()

        def optimizer_step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        stats = self.strategy_stack.optimisation_step(self.backbone, step_batch, optimizer_step)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        for name, value in stats.items():
            self.log(f"train/{name}", value.float(), on_epoch=True, on_step=False, batch_size=len(images))
        return images.new_zeros(())

    def _feature_training_step(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The training step on cached features (frozen backbone, no strategy loss terms)."""
        features, targets = batch["features"], batch["target"]
        dropout = self.feature_cache.decision.head_dropout if self.feature_cache is not None else 0.0
        logits = head_logits(self.backbone, features, dropout)
        size = len(features)
        loss = self.loss(logits, targets)
        self.log("train/task_loss", loss, on_epoch=True, on_step=False, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, on_step=True, batch_size=size)
        self.train_metrics.update(*self._metric_inputs(logits.detach(), targets))
        self.log_dict(self.train_metrics, on_epoch=True, on_step=False, batch_size=size)
        return loss

    def inference_logits(self, images: Tensor) -> Tensor:
        """What test and predict classify with: the logits divided by :attr:`temperature`, averaged over ``tta``.

        With TTA the result is the logarithm of the views' mean probability (:func:`cvft.tasks.tta.averaged_logits`),
        so its softmax (sigmoid) is the averaged prediction.
        """
        hp = self.hparams
        tta, crop_pct = hp.get("tta", "none"), hp.get("tta_crop_pct", 0.875)
        return tta_logits(self, images, tta, crop_pct, self.multi_label, self.temperature)

    def _evaluate(
        self, batch: Sequence[Tensor] | Mapping[str, Tensor], metrics: MetricCollection, stage: str
    ) -> dict[str, Tensor]:
        if isinstance(batch, Mapping):  # cached features
            images, targets = batch["features"], batch["target"]
            logits = head_logits(self.backbone, images)
            if stage != "val":
                if self.hparams.get("tta", "none") != "none":
                    raise ConfigError("tta needs images, not cached features; test on an image DataLoader.")
                logits = logits / self.temperature
        else:
            images, targets = batch[0], batch[1]
            logits = self(images) if stage == "val" else self.inference_logits(images)
        loss = self.loss(logits, targets)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(images))
        probs, labels = self._metric_inputs(logits, targets)
        metrics.update(probs, labels)
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=len(images))
        if stage == "val" and self.val_confusion is not None:
            self.val_confusion.update(probs, labels)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Validation loss and metrics on the plain logits (no temperature, no TTA); returns ``{"loss", "logits"}``
        for callbacks (``MedicalReport``). With ``temperature_scaling`` during a fit, the logits are kept for the fit.
        """  # noqa: D205
        outputs = self._evaluate(batch, self.val_metrics, "val")
        if self._validation_outputs is not None:
            targets = batch["target"] if isinstance(batch, Mapping) else batch[1]
            self._validation_outputs.append((outputs["logits"].float(), targets.detach()))
        return outputs

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Test loss and metrics on :meth:`inference_logits` (temperature, TTA); returns ``{"loss", "logits"}``."""
        return self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Probabilities (softmax, or sigmoid for multi-label) of :meth:`inference_logits` and the dataset indices."""
        images, index = batch[0], batch[1]
        logits = self.inference_logits(images)
        probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
        return {"probs": probs, "index": index}

    def on_validation_epoch_start(self) -> None:
        """With ``temperature_scaling``, start keeping the logits of a fit's validation (not the sanity check)."""
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        wanted = self.hparams.get("temperature_scaling", False) and fitting and not self.trainer.sanity_checking
        self._validation_outputs = [] if wanted else None

    def on_validation_epoch_end(self) -> None:
        """Keep the epoch's confusion matrix for the plotting callback; fit the temperature on the epoch's logits.

        This runs before ``ModelCheckpoint`` saves (at validation end or train epoch end), so the checkpoint of these
        weights holds their temperature.
        """
        if self.val_confusion is not None:
            self.last_val_confusion = self.val_confusion.compute().cpu()
            self.val_confusion.reset()
        outputs, self._validation_outputs = self._validation_outputs, None
        if outputs:
            self._fit_temperature(torch.cat([logits for logits, _ in outputs]), torch.cat([t for _, t in outputs]))

    def _fit_temperature(self, logits: Tensor, targets: Tensor) -> None:
        """Fit ``T`` on every process's validation logits (the same ``T`` everywhere), set it and log the change."""
        if self.trainer.world_size > 1:
            logits, targets = self.all_gather(logits).flatten(0, 1), self.all_gather(targets).flatten(0, 1)
        fit = calibrate_temperature(logits, targets, self.multi_label, epoch=self.current_epoch, step=self.global_step)
        self.temperature.fill_(fit.temperature)
        self.temperature_fit = fit
        if fit.temperature in (MIN_TEMPERATURE, MAX_TEMPERATURE):
            _logger.warning(
                "temperature_scaling: the validation NLL is lowest at the bound T=%g (%d validation images, accuracy "
                "%.3f): a validation set classified right with a margin every time says nothing about calibration. "
                "Use more validation data.",
                fit.temperature, fit.samples, fit.accuracy,
            )  # fmt: skip
        scalars = {
            "val/temperature": fit.temperature,
            "val/nll": fit.nll_before,
            "val/nll_scaled": fit.nll_after,
            "val/ece": fit.ece_before,
            "val/ece_scaled": fit.ece_after,
        }
        self.log_dict(scalars, sync_dist=True)  # equal on every process

    # ------------------------------------------------------------------ strategies during fit
    def setup(self, stage: str) -> None:
        """At the first fit, calibrate strategies that choose from data on the training batches (before optimizers).

        With Mixup/CutMix on, an odd ``batch_size`` of the DataModule is refused first. Calibration is skipped when
        the selection comes from elsewhere: an ``adapter`` file, or a checkpoint being resumed
        (Lightning restores the state dict, sparse indices included, right after this hook). Then, at every fit,
        decide on the feature cache (``feature_cache``) and, when it is on, give the DataModule feature placeholders
        for its train / val DataLoaders (filled at the start of :meth:`configure_optimizers`).
        """
        if stage != "fit":
            return
        if self.mixer is not None and self._trainer is not None:
            check_even_batch_size(self.trainer.datamodule)
        if not self._calibrated:
            self._calibrated = True
            if self.hparams.adapter is None:
                calibrate_before_fit(self.trainer, self, self.backbone, self.strategy_stack, self.loss)
        # after calibration (which reads images), before Lightning builds the DataLoaders
        self.feature_cache = activate_feature_cache(self.trainer, self, self.hparams.get("feature_cache", "auto"))

    def on_fit_start(self) -> None:
        """Refuse ``temperature_scaling`` without validation data; without it, forget an earlier fit's ``T``."""
        super().on_fit_start()
        self.temperature_fit = None
        if not self.hparams.get("temperature_scaling", False):
            self.temperature.fill_(1.0)  # the weights change: a temperature fitted on the old ones no longer holds
        elif not _validates(self.trainer):
            raise ConfigError(
                "temperature_scaling fits the temperature on the validation data after each validation, and this fit "
                "validates on nothing (no val DataLoader, or limit_val_batches=0). Give validation data or set "
                "temperature_scaling=false (on the command line: --model.temperature_scaling false)."
            )

    def on_train_start(self) -> None:
        """Refuse preference pairs (a :class:`~cvft.data.preference.PreferencePairDataset`) for labelled objectives.

        Raises:
            DatasetError: The training data are pairs but no strategy trains on pairs.
        """
        super().on_train_start()
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, PreferencePairDataset) and not self.strategy_stack.pair_targets:
            raise DatasetError(
                "The training data are preference pairs, but no strategy trains on pairs (the supervised loss needs "
                "labels). Add dpo or reward_model to the strategies, or train on labelled data (leave the "
                "DataModule's preference_pairs, --data.preference_pairs, unset)."
            )

    def on_fit_end(self) -> None:
        """Warn when the weights changed after the last temperature fit (no validation after the last epoch)."""
        if not self.hparams.get("temperature_scaling", False):
            return
        fit = self.temperature_fit
        if fit is None:
            _logger.warning("temperature_scaling: no validation ran during the fit, so the temperature stays 1.")
        elif fit.step != self.global_step:
            _logger.warning(
                "temperature_scaling: the temperature was fitted at step %d, but training went on to step %d without "
                "validating (check_val_every_n_epoch does not divide max_epochs): the final weights' temperature is "
                "that of step %d.",
                fit.step, self.global_step, fit.step,
            )  # fmt: skip

    def on_train_end(self) -> None:
        """Give the DataModule its image datasets back once training is over, before callbacks' ``on_fit_end``.

        Reports that run the model over the validation images at fit end (``MedicalReport``) must get images, not
        the cached features.
        """
        if self.feature_cache is not None:
            self.feature_cache.restore()

    def teardown(self, stage: str) -> None:
        """Give the DataModule its image datasets back after a fit that used cached features."""
        if stage == "fit" and self.feature_cache is not None:
            self.feature_cache.restore()

    def on_train_epoch_start(self) -> None:
        """Run the strategies' epoch schedules (gradual unfreezing); log ``trainable_params``."""
        super().on_train_epoch_start()
        trainable = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
        self.log("trainable_params", float(trainable), on_epoch=True, on_step=False, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW or SGD over named param groups, with per-step warmup + cosine."""
        if self.feature_cache is not None and self._trainer is not None:
            # the last hook before Lightning builds the DataLoaders, with the model on its device and weights restored
            self.feature_cache.fill(self.trainer, self)
        return super().configure_optimizers()


def _focal_alpha(
    loss: str,
    gamma: float,
    alpha: float | list[float] | None,
    label_smoothing: float,
    num_classes: int,
    multi_label: bool,
) -> Tensor | None:
    """Validate the loss options; return focal ``alpha`` as a tensor (``None``: no class weighting)."""
    if loss not in LOSSES:
        raise CvftError(f"Unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
    if loss != "focal":
        return None
    if gamma < 0:
        raise CvftError(f"focal_gamma must be >= 0, got {gamma}.")
    if label_smoothing:
        raise CvftError(
            "label_smoothing is not applied by the focal loss; set label_smoothing=0 or loss='cross_entropy'."
        )
    if alpha is None:
        return None
    if isinstance(alpha, (int, float)) and not multi_label:
        raise CvftError(
            f"focal_alpha={alpha} is one number; single-label focal loss needs one weight per class ({num_classes})."
        )
    values = torch.full((num_classes,), float(alpha)) if isinstance(alpha, (int, float)) else torch.tensor(alpha)
    if values.ndim != 1 or len(values) != num_classes:
        raise CvftError(f"focal_alpha needs one value per class ({num_classes}), got {alpha}.")
    if multi_label and not bool(((values >= 0) & (values <= 1)).all()):
        raise CvftError(f"Multi-label focal_alpha values must lie in [0, 1], got {alpha}.")
    return values.float()


def _default_temperature(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load state dicts written before temperature scaling existed: a missing ``temperature`` means 1 (no scaling)."""
    state_dict.setdefault(f"{prefix}temperature", torch.tensor(1.0))


def _validates(trainer: Any) -> bool:
    """Whether this fit has validation data (``True`` when it cannot be told)."""
    if trainer.limit_val_batches == 0:
        return False
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    is_defined = getattr(source, "is_defined", None)
    return bool(is_defined()) if callable(is_defined) else True
