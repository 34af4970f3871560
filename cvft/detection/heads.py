"""torchvision detectors (FCOS, RetinaNet, Faster R-CNN) around cvft's multi-scale features.

The detectors are torchvision's own; cvft chooses what depends on the backbone and the image size:

* **Levels.** FCOS and RetinaNet read P3-P7 style pyramids (the neck's levels plus P6/P7 from
  ``LastLevelP6P7``); Faster R-CNN reads the pyramid plus a max-pooled level (``LastLevelMaxPool``) for its RPN and
  pools regions from the pyramid levels. On a ViT the simple pyramid builds strides 8-32 for FCOS/RetinaNet (as in
  ViTDet's RetinaNet) and 4-32 for Faster R-CNN.
* **Anchors.** One base size per level, by default ``max(stride, image_size / 25 * 2**level)``: at 800 px these are
  torchvision's 32, 64, ..., 512, and small images get proportionally small anchors (never finer than the stride).
  FCOS's "anchors" are its per-level sizes that set the regression ranges; they default to the strides.
* **Transform.** torchvision's ``GeneralizedRCNNTransform`` normalises with the backbone's pretrained mean/std and
  resizes with ``min_size = max_size = image_size``, so a data set already at ``image_size`` is not resized again
  while any other size still works at predict time (boxes come back in the input image's pixels).
* **Faster R-CNN's box head** is torchvision's two-layer MLP, ``4 * fpn_channels`` wide (1024 at the usual 256).
* **Labels** are ``0..C-1`` outside. Faster R-CNN reserves 0 for background: :func:`shift_labels` adds
  :func:`label_offset` going in and removes it coming out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

from timm.data import resolve_data_config
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from cvft.data.normalization import per_channel
from cvft.detection.fcos_regression import BoxActivation, FCOSBoxRegressionHead
from cvft.detection.features import VITDET_SCALES, MultiScaleFeatures
from cvft.errors import CvftError

__all__ = [
    "HEADS",
    "HeadName",
    "extra_block",
    "vit_scale_factors",
    "default_anchor_sizes",
    "image_normalisation",
    "label_offset",
    "shift_labels",
    "extra_levels",
    "build_detection_model",
    "head_mode",
    "detection_losses",
]

HeadName = Literal["fcos", "retinanet", "faster_rcnn"]
HEADS: tuple[str, ...] = ("fcos", "retinanet", "faster_rcnn")
_DEFAULT_RATIOS = (0.5, 1.0, 2.0)


def _check_head(head: str) -> str:
    if head not in HEADS:
        raise CvftError(f"Unknown detection head {head!r}; choose one of {list(HEADS)}.")
    return head


def extra_block(head: str, channels: int) -> ExtraFPNBlock:
    """The coarse levels ``head`` adds after the pyramid: P6/P7 (FCOS, RetinaNet) or a max-pooled level.

    Example:
        >>> type(extra_block("faster_rcnn", 64)).__name__, type(extra_block("fcos", 64)).__name__
        ('LastLevelMaxPool', 'LastLevelP6P7')
    """
    if _check_head(head) == "faster_rcnn":
        return LastLevelMaxPool()
    return LastLevelP6P7(channels, channels)  # from P5, as FCOS and ViTDet do


def extra_levels(head: str) -> int:
    """Number of levels :func:`extra_block` adds.

    Example:
        >>> extra_levels("retinanet"), extra_levels("faster_rcnn")
        (2, 1)
    """
    return 1 if _check_head(head) == "faster_rcnn" else 2


def vit_scale_factors(head: str) -> tuple[float, ...]:
    """Scales of the ViT simple pyramid for ``head``: strides 4-32 for Faster R-CNN, 8-32 otherwise (P6/P7 follow).

    Example:
        >>> vit_scale_factors("fcos"), vit_scale_factors("faster_rcnn")
        ((2.0, 1.0, 0.5), (4.0, 2.0, 1.0, 0.5))
    """
    return VITDET_SCALES if _check_head(head) == "faster_rcnn" else VITDET_SCALES[1:]


def default_anchor_sizes(head: str, strides: Sequence[int], image_size: int) -> list[int]:
    """One base anchor size per level: the strides for FCOS, else ``max(stride, image_size / 25 * 2**level)``.

    Example:
        >>> default_anchor_sizes("retinanet", [8, 16, 32, 64, 128], 800)
        [32, 64, 128, 256, 512]
        >>> default_anchor_sizes("retinanet", [8, 16, 32, 64, 128], 96)
        [8, 16, 32, 64, 128]
        >>> default_anchor_sizes("fcos", [8, 16, 32, 64, 128], 96)
        [8, 16, 32, 64, 128]
    """
    if _check_head(head) == "fcos":
        return [int(s) for s in strides]
    return [max(int(s), round(image_size / 25 * 2**i)) for i, s in enumerate(strides)]


def _anchor_generator(head: str, anchor_sizes: Sequence[int], aspect_ratios: Sequence[float] | None) -> AnchorGenerator:
    if head == "fcos":
        if aspect_ratios is not None and [float(r) for r in aspect_ratios] != [1.0]:
            raise CvftError(
                f"aspect_ratios={list(aspect_ratios)}: FCOS predicts one box per location (aspect_ratios=[1.0]); "
                "leave aspect_ratios out or choose head='retinanet' / 'faster_rcnn'."
            )
        ratios: tuple[float, ...] = (1.0,)
    else:
        ratios = tuple(float(r) for r in (aspect_ratios or _DEFAULT_RATIOS))
        if not ratios or any(r <= 0 for r in ratios):
            raise CvftError(f"aspect_ratios must be positive height/width ratios, got {list(aspect_ratios or [])}.")
    if head == "retinanet":  # three octave scales per level, as RetinaNet does
        sizes = tuple(tuple(int(round(b * 2 ** (k / 3))) for k in range(3)) for b in anchor_sizes)
    else:
        sizes = tuple((int(b),) for b in anchor_sizes)
    return AnchorGenerator(sizes, (ratios,) * len(sizes))


def image_normalisation(backbone: nn.Module, in_chans: int = 3) -> tuple[list[float], list[float]]:
    """Mean and std the backbone was pretrained with (timm's data config), one value per input channel.

    Other channel counts than the pretrained one get the average of the pretrained values for every channel
    (:func:`~cvft.data.normalization.per_channel`).

    Example:
        >>> import timm
        >>> image_normalisation(timm.create_model("resnet18"))[0]
        [0.485, 0.456, 0.406]
        >>> image_normalisation(timm.create_model("resnet18", in_chans=1), in_chans=1)[0]
        [0.449]
    """
    config = resolve_data_config({}, model=backbone)
    mean, std = (per_channel(config[name], in_chans, name) for name in ("mean", "std"))
    return [round(v, 6) for v in mean], [round(v, 6) for v in std]


def label_offset(head: str) -> int:
    """What ``head`` adds to the 0-based labels: 1 for Faster R-CNN (0 is its background), else 0.

    Example:
        >>> label_offset("faster_rcnn"), label_offset("fcos")
        (1, 0)
    """
    return 1 if _check_head(head) == "faster_rcnn" else 0


def shift_labels(dicts: Sequence[dict[str, Any]], offset: int) -> list[dict[str, Any]]:
    """Copies of target or prediction dicts with ``offset`` added to ``labels`` (the originals are left alone).

    Example:
        >>> import torch
        >>> shift_labels([{"labels": torch.tensor([0, 2])}], 1)[0]["labels"].tolist()
        [1, 3]
    """
    if not offset:
        return list(dicts)
    return [{**d, "labels": d["labels"] + offset} for d in dicts]


def _group_norm(channels: int) -> partial:
    # up to 32 groups of at least 2 channels: a 1x1 level (P7 of a small image) needs 2+ values per group
    groups = max(g for g in range(1, min(32, channels // 2) + 1) if channels % g == 0)
    return partial(nn.GroupNorm, groups)


def build_detection_model(
    head: str,
    features: MultiScaleFeatures,
    num_classes: int,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    anchor_sizes: Sequence[int] | None = None,
    aspect_ratios: Sequence[float] | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    box_activation: BoxActivation = "exp",
) -> nn.Module:
    """A torchvision FCOS, RetinaNet or Faster R-CNN that reads ``features``.

    Args:
        head: ``"fcos"``, ``"retinanet"`` or ``"faster_rcnn"``.
        features: Backbone + neck; ``features.strides`` lists every output level's stride.
        num_classes: Object classes, without background.
        image_size: Side the transform resizes to (``min_size = max_size``).
        image_mean: Normalisation mean per channel (images come in ``[0, 1]``).
        image_std: Normalisation std per channel.
        anchor_sizes: One base anchor size per output level (:func:`default_anchor_sizes` when ``None``).
        aspect_ratios: Anchor height/width ratios (RetinaNet, Faster R-CNN); FCOS allows only ``[1.0]``.
        score_thresh: Minimum score of a returned detection.
        nms_thresh: IoU threshold of the per-class non-maximum suppression.
        detections_per_img: Most detections returned per image.
        box_activation: FCOS only: box distances as ``exp(s_l * x)`` (the paper) or ``relu(x)`` (torchvision), see
            :mod:`cvft.detection.fcos_regression`.

    Raises:
        CvftError: Unknown head, or ``anchor_sizes`` / ``aspect_ratios`` that do not fit the levels.

    Example:
        >>> import timm
        >>> from cvft.detection.features import build_neck, feature_levels, neck_strides
        >>> body = timm.create_model("test_resnet", num_classes=0)
        >>> levels = feature_levels(body)
        >>> neck = build_neck(levels, 32, extra_block("retinanet", 32), ())
        >>> features = MultiScaleFeatures(body, neck, levels, 32, neck_strides(levels, (), 2))
        >>> model = build_detection_model("retinanet", features, 3, 64, [0.5] * 3, [0.5] * 3)
        >>> model.anchor_generator.sizes[0], model.transform.min_size
        ((8, 10, 13), (64,))
    """
    _check_head(head)
    levels = len(features.strides)
    sizes = list(anchor_sizes) if anchor_sizes is not None else default_anchor_sizes(head, features.strides, image_size)
    if len(sizes) != levels or any(int(s) <= 0 for s in sizes):
        raise CvftError(
            f"anchor_sizes={list(anchor_sizes or [])} must give one positive size per feature level: this {head} "
            f"reads {levels} levels with strides {features.strides}."
        )
    anchors = _anchor_generator(head, sizes, aspect_ratios)
    channels = features.out_channels
    common: dict[str, Any] = {
        "min_size": image_size,
        "max_size": image_size,
        "image_mean": list(image_mean),
        "image_std": list(image_std),
    }
    if head == "fcos":
        fcos_head = FCOSHead(channels, 1, num_classes)
        norm = _group_norm(channels)  # torchvision's default GroupNorm(32) needs a multiple of 32 channels
        fcos_head.classification_head = FCOSClassificationHead(channels, 1, num_classes, norm_layer=norm)
        fcos_head.regression_head = FCOSBoxRegressionHead(channels, 1, levels, box_activation, norm_layer=norm)
        return FCOS(
            features,
            num_classes,
            anchor_generator=anchors,
            head=fcos_head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            **common,
        )
    if head == "retinanet":
        num_anchors = anchors.num_anchors_per_location()[0]
        retina_head = RetinaNetHead(channels, num_anchors, num_classes, norm_layer=_group_norm(channels))
        return RetinaNet(
            features,
            num_classes,
            anchor_generator=anchors,
            head=retina_head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            **common,
        )
    pyramid = [str(i) for i in range(levels - 1)]  # the pooled level only feeds the RPN
    width = 4 * channels  # torchvision's 1024 at the usual 256 channels; narrower necks get narrower box heads
    return FasterRCNN(
        features,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(pyramid, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, width),
        box_predictor=FastRCNNPredictor(width, num_classes + 1),
        box_score_thresh=score_thresh,
        box_nms_thresh=nms_thresh,
        box_detections_per_img=detections_per_img,
        **common,
    )


@contextmanager
def head_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put the detector's own modules (everything but ``model.backbone``, the features) in ``training`` mode.

    torchvision detectors switch between losses (training) and detections (eval) on their ``training`` flags;
    this picks the behaviour without touching the backbone, whose BatchNorm and dropout keep their mode.

    Example:
        >>> import torch
        >>> model = nn.Module()
        >>> model.backbone, model.head = nn.BatchNorm1d(2), nn.Linear(2, 2)
        >>> with head_mode(model.eval(), training=True):
        ...     model.training, model.head.training, model.backbone.training
        (True, True, False)
        >>> model.head.training
        False
    """
    own = [m for name, m in model.named_modules() if name != "backbone" and not name.startswith("backbone.")]
    modes = [(m, m.training) for m in own]
    try:
        for module in own:
            module.training = training
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def detection_losses(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The torchvision loss dict of ``model`` for ``images`` and ``targets`` (labels already shifted).

    The detector's own modules compute as in training (matching, sampling, losses, see :func:`head_mode`); the
    features keep their mode, so a call under ``torch.no_grad()`` on a model in eval mode measures a validation
    loss without moving BatchNorm statistics or sampling dropout in the backbone.

    Example:
        >>> import torch
        >>> from cvft.tasks import ObjectDetector
        >>> detector = ObjectDetector(2, backbone="test_resnet", pretrained=False, image_size=64, fpn_channels=32)
        >>> target = {"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([1])}
        >>> with torch.no_grad():
        ...     losses = detection_losses(detector.detector.eval(), [torch.rand(3, 64, 64)], [target])
        >>> sorted(losses), detector.detector.training
        (['bbox_ctrness', 'bbox_regression', 'classification'], False)
    """
    with head_mode(model, training=True):
        return model(images, targets)
