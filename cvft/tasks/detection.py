"""Object detection: a timm backbone, an FPN (or ViTDet pyramid) and a torchvision FCOS / RetinaNet / Faster R-CNN.

Batches follow :mod:`cvft.data.detection`: ``(images, targets)`` with images ``(3, H, W)`` in ``[0, 1]`` (the
detector normalises them with its backbone's mean/std) and targets ``{"boxes": (N, 4) xyxy pixels, "labels": (N,)
0..C-1}``; at predict time ``(images, metas)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from cvft.checkpoints import with_legacy_hparams
from cvft.detection.fcos_regression import BoxActivation, check_box_activation
from cvft.detection.features import MultiScaleFeatures, feature_levels
from cvft.detection.heads import detection_losses, head_mode, label_offset, shift_labels
from cvft.detection.metrics import detection_map, map_scalars, resolve_map_backend
from cvft.detection.setup import (
    DETECTOR_SUPPORT,
    build_detector_network,
    check_classes,
    check_head,
    check_numbers,
    create_detection_backbone,
    refuse_replaced_feature_maps,
)
from cvft.errors import CvftError
from cvft.strategies._freeze import freeze_batchnorm_stats, is_batchnorm
from cvft.strategies.param_groups import no_weight_decay_names
from cvft.tasks.base import FineTuningModule, head_param_groups
from cvft.tasks.schedules import check_optimizer

__all__ = ["ObjectDetector"]

_logger = logging.getLogger(__name__)
#: Keys of the hyperparameters that shape the network (kept in adapter metadata to rebuild it).
_ARCHITECTURE_KEYS = (
    "num_classes", "class_names", "category_ids", "backbone", "in_chans", "head", "out_indices", "fpn_channels",
    "anchor_sizes", "aspect_ratios", "image_size", "backbone_kwargs", "box_activation",
)  # fmt: skip


class ObjectDetector(FineTuningModule):
    """Fine-tune a timm backbone for object detection with a torchvision FCOS, RetinaNet or Faster R-CNN head.

    The backbone is the whole timm model (``num_classes=0``), kept as ``self.backbone`` under its own parameter
    names; its feature maps come from ``forward_intermediates`` (:mod:`cvft.detection.features`), so parameter
    strategies (``linear_probe``, ``lora``, ``loha``, adapters, ``ssf``, ``bitfit``, ``freeze_layers``,
    ``gradual_unfreeze``, ``layerwise_lr`` ...) act on it exactly as on a classifier, set up by
    :func:`~cvft.strategies.headless.setup_headless`. The neck (``self.neck``: FPN for CNNs, the ViTDet simple
    pyramid for ViTs) and the detection head (``self.detector``) always train. Strategies that calibrate on data,
    add loss terms or need several views are refused, and so are those that break ``forward_intermediates``
    (``vpt``). Layers after the last level read (a ViT's final norm, EfficientNet's ``conv_head``) are pruned.

    Validation logs ``val/loss`` (and each term): after the predictions, the detector's own modules compute their
    training losses on the same batch under ``no_grad``, reusing the backbone features, with the backbone left in
    eval mode (no BatchNorm update, no dropout). Faster R-CNN samples proposals for it in a forked RNG, so training
    randomness does not depend on validation. mAP comes from torchmetrics' ``MeanAveragePrecision``:
    ``val/map``, ``val/map_50``, ``val/map_75``, ``val/map_small``, ..., ``val/mar_100`` and per class
    ``val/ap/<class name>`` (``test/`` likewise).

    The options every task shares (``pretrained``, ``weights``, ``strategies`` for the backbone, the optimiser and
    schedule, the training toolbox; ``channels_last`` here covers the backbone's, the neck's and the head's weights)
    are documented on :class:`~cvft.tasks.base.FineTuningModule`, which handles them. There is no ``drop_rate`` (no
    classifier on the backbone) and no ``compile``: the detector reads the backbone through
    ``forward_intermediates``, not its forward.

    Args:
        num_classes: Object classes (no background); the CLI links it from the data module.
        class_names: Class names (per-class metric names, prediction files).
        category_ids: Original dataset id of each class index, to write predictions back (default ``0..C-1``).
        backbone: timm model name, with an optional pretrained tag.
        head: ``"fcos"``, ``"retinanet"`` or ``"faster_rcnn"``.
        out_indices: ``feature_info`` levels to read (default: last three of a CNN, last block of a ViT).
        fpn_channels: Channels of the neck's outputs and the heads.
        anchor_sizes: One base anchor size per output level (default scaled to ``image_size``, see
            :func:`~cvft.detection.heads.default_anchor_sizes`).
        aspect_ratios: Anchor height/width ratios (RetinaNet, Faster R-CNN; default ``[0.5, 1, 2]``).
        image_size: Side images are resized to (longest side); the data module's size, so no second resize.
        score_thresh: Minimum score of returned detections (low values suit mAP).
        nms_thresh: Per-class NMS IoU threshold (default 0.6 for FCOS, 0.5 otherwise).
        detections_per_img: Most detections per image.
        box_activation: FCOS's box distances: ``"exp"``, ``exp(s_l * x)`` with a trainable scale per level as in the
            FCOS paper, or ``"relu"``, torchvision's ``relu(x)``, which can die when fine-tuned with AdamW on small
            data (see :mod:`cvft.detection.fcos_regression`). Checkpoints and adapters written before this option
            load as ``"relu"``, what they were trained with.
        freeze_bn_stats: Keep the backbone's BatchNorm running statistics fixed (detection batches are small);
            their affine parameters still train where the strategies let them.
        lr: Peak learning rate of the neck and heads. ``"auto"``: Lightning's learning-rate finder picks it before
            the fit (``cvft fit --task detection --model.lr auto``), 1e-4 when it cannot suggest one.
        backbone_lr_scale: Backbone learning rate as a fraction of ``lr`` (times the strategies' scales).
        head_warmup_epochs: Train the neck and head alone for this many epochs first: the backbone's trainable
            tensors (adapters, or every weight with full fine-tuning) join at epoch ``head_warmup_epochs``, so a
            randomly initialised head does not push its first, large gradients into the backbone. Warm-up epochs
            run at a frozen backbone's speed (no backward through it).
        map_backend: ``"auto"``, ``"faster_coco_eval"`` or ``"pycocotools"`` (see :func:`resolve_map_backend`).
        adapter: A detector adapter file (:meth:`save_adapter`) to load after set-up.
        **kwargs: The options every task shares, forwarded to :class:`~cvft.tasks.base.FineTuningModule`.

    Example:
        >>> import torch
        >>> model = ObjectDetector(2, backbone="test_resnet", pretrained=False, image_size=64, fpn_channels=32).eval()
        >>> out = model([torch.rand(3, 64, 64)])
        >>> sorted(out[0])
        ['boxes', 'labels', 'scores']
    """

    strategy_support = DETECTOR_SUPPORT
    checkpoint_overrides = {"adapter": None}
    legacy_hparams = {"box_activation": "relu"}

    def __init__(
        self,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        backbone: str = "resnet50.a1_in1k",
        *,
        head: Literal["fcos", "retinanet", "faster_rcnn"] = "fcos",
        out_indices: list[int] | None = None,
        fpn_channels: int = 256,
        anchor_sizes: list[int] | None = None,
        aspect_ratios: list[float] | None = None,
        image_size: int = 512,
        score_thresh: float = 0.05,
        nms_thresh: float | None = None,
        detections_per_img: int = 100,
        box_activation: BoxActivation = "exp",
        freeze_bn_stats: bool = True,
        lr: float | Literal["auto"] = 1e-4,
        backbone_lr_scale: float = 0.1,
        head_warmup_epochs: int = 0,
        map_backend: Literal["auto", "faster_coco_eval", "pycocotools"] = "auto",
        adapter: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        class_names, category_ids = check_classes(num_classes, class_names, category_ids)
        check_numbers(fpn_channels, image_size, score_thresh, nms_thresh, detections_per_img, backbone_lr_scale)
        if isinstance(head_warmup_epochs, bool) or not isinstance(head_warmup_epochs, int) or head_warmup_epochs < 0:
            raise CvftError(f"head_warmup_epochs must be a whole number >= 0, got {head_warmup_epochs!r}.")
        self.save_task_hparams(check=("anchor_sizes", "aspect_ratios"))
        self.hparams.update(class_names=class_names, category_ids=category_ids, num_classes=len(class_names))
        check_optimizer(self.hparams.optimizer)
        check_head(head)
        check_box_activation(box_activation)
        resolve_map_backend(map_backend)  # fail early when no backend is installed
        self.build_strategy_stack()

        self.backbone = self.create_task_backbone(0, factory=create_detection_backbone)
        levels = feature_levels(self.backbone, out_indices)
        if callable(getattr(self.backbone, "prune_intermediate_layers", None)):
            self.backbone.prune_intermediate_layers(levels.indices, prune_norm=True, prune_head=True)
        # The neck and head draw their initial weights from a seed taken before the strategies set up, so that for
        # one seed every strategy (frozen, LoRA, full ...) starts from the same detection head: on small data sets
        # the head's initialisation moves mAP more than the strategy does.
        head_seed = int(torch.randint(0, 2**62, (1,)))
        self.setup_strategies(headless=True)
        refuse_replaced_feature_maps(self.backbone, self.strategy_stack)
        self._freeze_bn_stats()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            self.neck, self.detector = build_detector_network(
                self.backbone, levels, head, len(class_names), self.hparams.in_chans, fpn_channels, image_size,
                anchor_sizes, aspect_ratios, score_thresh, nms_thresh, detections_per_img, box_activation,
            )  # fmt: skip
        self.num_classes = len(class_names)
        self.class_names = class_names
        self.category_ids = category_ids
        self.label_offset = label_offset(head)
        self.val_map, self.test_map = detection_map(map_backend), detection_map(map_backend)
        self._warned_degenerate = False
        self._held_by_head_warmup: list[nn.Parameter] = []
        if adapter is not None:
            self.load_adapter(adapter)

    # ------------------------------------------------------------------ construction helpers
    def _freeze_bn_stats(self) -> None:
        if self.hparams.freeze_bn_stats:
            for module in self.backbone.modules():
                if is_batchnorm(module):
                    freeze_batchnorm_stats(module)

    @property
    def features(self) -> MultiScaleFeatures:
        """The backbone + neck as the torchvision detector calls them (``images -> OrderedDict`` of maps)."""
        return self.detector.backbone

    # ------------------------------------------------------------------ forward
    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None) -> Any:
        """Detections per image, or with ``targets`` the torchvision loss dict.

        Detections are ``{"boxes": (N, 4) xyxy in input-image pixels, "scores": (N,), "labels": (N,) 0..C-1}``.
        The backbone runs in the mode it is in; the detector's own modules run as predicting (no targets) or as
        training (targets), whatever the module's mode.
        """
        images = list(images)
        if targets is not None:
            return detection_losses(self.detector, images, shift_labels(targets, self.label_offset))
        with head_mode(self.detector, training=False):
            detections = self.detector(images)
        return shift_labels(detections, -self.label_offset)

    def _targets(self, targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Boxes (float) and labels (int64), without degenerate boxes (torchvision refuses them)."""
        result = []
        for target in targets:
            boxes, labels = target["boxes"].float().reshape(-1, 4), target["labels"].long().reshape(-1)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            if not bool(keep.all()) and not self._warned_degenerate:
                self._warned_degenerate = True
                _logger.warning("Dropping boxes with zero width or height from the targets (shown once).")
            result.append({"boxes": boxes[keep], "labels": labels[keep]})
        return result

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        """Sum of the torchvision losses; logs ``train/loss`` and each term (``train/classification`` ...)."""
        images, targets = list(batch[0]), self._targets(batch[1])
        losses = self(images, targets)
        loss = sum(losses.values())
        size = len(images)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_epoch=True, on_step=False, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, on_step=True, batch_size=size)
        return loss

    def _evaluate(self, batch: Sequence[Any], stage: str) -> Tensor:
        images, targets = list(batch[0]), self._targets(batch[1])
        devices = [self.device] if self.device.type == "cuda" else []
        with self.features.reuse_features(), torch.random.fork_rng(devices=devices):
            detections = self(images)
            losses = self(images, targets)
        loss = sum(losses.values())
        size = len(images)
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value, batch_size=size, sync_dist=True)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        (self.val_map if stage == "val" else self.test_map).update(detections, targets)
        return loss

    def validation_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        """Validation loss and mAP update."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        """Test loss and mAP update."""
        return self._evaluate(batch, "test")

    def _log_map(self, metric: MeanAveragePrecision, stage: str) -> None:
        if metric.update_called:
            scalars = map_scalars(metric.compute(), self.class_names, stage)
            metric.reset()
            for name, value in scalars.items():
                self.log(name, value, prog_bar=name in (f"{stage}/map", f"{stage}/map_50"))

    def on_validation_epoch_end(self) -> None:
        """Log ``val/map``, ``val/map_50``, ``val/map_75``, ``val/mar_100`` ... and ``val/ap/<class>``."""
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        """Log the test mAP family as :meth:`on_validation_epoch_end` does for validation."""
        self._log_map(self.test_map, "test")

    def predict_step(self, batch: Sequence[Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"boxes", "scores", "labels"}`` as lists (one tensor per image, input-image pixels) plus ``metas``."""
        images, metas = list(batch[0]), batch[1] if len(batch) > 1 else None
        detections = self(images)
        return {key: [d[key] for d in detections] for key in ("boxes", "scores", "labels")} | {"metas": metas}

    # ------------------------------------------------------------------ strategies during fit
    def on_train_epoch_start(self) -> None:
        """Run the strategies' epoch schedules and the head warm-up; BatchNorm statistics stay fixed if asked."""
        super().on_train_epoch_start()
        self._head_warmup(self.current_epoch)
        self._freeze_bn_stats()

    def _head_warmup(self, epoch: int) -> None:
        """Hold the backbone's trainable tensors frozen before ``head_warmup_epochs``; release them after.

        Decided from ``epoch`` alone, so a run resumed inside or after the warm-up trains the same tensors.
        """
        if epoch < self.hparams.head_warmup_epochs:
            trainable = [p for p in self.backbone.parameters() if p.requires_grad]
            for param in trainable:
                param.requires_grad_(False)
            self._held_by_head_warmup += trainable
            if trainable:
                _logger.info("head warm-up: the backbone trains from epoch %d", self.hparams.head_warmup_epochs)
        elif self._held_by_head_warmup:
            for param in self._held_by_head_warmup:
                param.requires_grad_(True)
            held = len(self._held_by_head_warmup)
            _logger.info("epoch %d: head warm-up over, %d backbone tensors train", epoch, held)
            self._held_by_head_warmup = []

    def backbone_lr_scales(self) -> dict[str, float]:
        """The strategies' learning-rate scales times ``backbone_lr_scale``, for every backbone parameter."""
        scales, factor = super().backbone_lr_scales(), self.hparams.backbone_lr_scale
        return {name: scales.get(name, 1.0) * factor for name, _ in self.backbone.named_parameters()}

    def param_groups(self) -> list[dict[str, Any]]:
        """Named optimizer groups: the backbone's, then ``neck/...`` and ``head/...`` at ``lr``.

        Backbone groups follow layer group x decay x strategy scale, times ``backbone_lr_scale``. Frozen parameters
        are registered too (they cost nothing and can unfreeze later without changing the optimizer's layout).
        """
        hp = self.hparams
        groups = super().param_groups()
        for label, module, prefix in (("neck", self.neck, "neck."), ("head", self.detector, "detector.")):
            named = [(prefix + name, p) for name, p in module.named_parameters()]
            no_decay = {prefix + name for name in no_weight_decay_names(module)}
            groups += head_param_groups(label, named, no_decay, hp.lr, hp.weight_decay)
        return groups

    # ------------------------------------------------------------------ adapter files
    @classmethod
    def adapter_arguments(cls, path: str | Path) -> dict[str, Any]:
        """The architecture (head, classes, pyramid, anchors, image size) and strategies of a detector adapter."""
        from cvft.detection.adapter_files import read_detector_metadata

        architecture, strategies = read_detector_metadata(path)
        return {**with_legacy_hparams(cls, architecture), "strategies": strategies}

    def save_adapter(self, path: str | Path) -> Path:
        """Write the trained tensors (backbone strategy tensors, neck, heads) and the architecture to ``path``."""
        from cvft.detection.adapter_files import save_detector_adapter

        return save_detector_adapter(self, path, {k: self.hparams[k] for k in _ARCHITECTURE_KEYS})

    def load_adapter(self, path: str | Path) -> dict[str, Any]:
        """Copy a detector adapter's tensors into this detector; return the architecture stored with it.

        The detector must have the adapter's backbone, strategies and head (:meth:`from_adapter` builds one).
        """
        from cvft.detection.adapter_files import load_detector_adapter

        return load_detector_adapter(self, path, self.hparams.backbone)
