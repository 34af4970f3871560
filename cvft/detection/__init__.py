"""Object detection building blocks: multi-scale features from timm backbones and torchvision detection heads.

:class:`~cvft.tasks.ObjectDetector` puts them together; these modules are for custom detectors.

Example:
    >>> from cvft.detection import feature_levels
    >>> import timm
    >>> feature_levels(timm.create_model("test_convnext", num_classes=0)).strides
    [8, 16, 32]
"""

from cvft.detection.features import (
    VITDET_SCALES,
    FeatureLevels,
    MultiScaleFeatures,
    SimpleFeaturePyramid,
    build_neck,
    feature_levels,
    neck_strides,
)
from cvft.detection.heads import (
    HEADS,
    build_detection_model,
    default_anchor_sizes,
    detection_losses,
    extra_block,
    extra_levels,
    head_mode,
    image_normalisation,
    label_offset,
    shift_labels,
    vit_scale_factors,
)
from cvft.detection.metrics import MAP_BACKENDS, detection_map, map_scalars, resolve_map_backend

__all__ = [
    "HEADS",
    "MAP_BACKENDS",
    "VITDET_SCALES",
    "FeatureLevels",
    "MultiScaleFeatures",
    "SimpleFeaturePyramid",
    "build_detection_model",
    "build_neck",
    "default_anchor_sizes",
    "detection_map",
    "detection_losses",
    "extra_block",
    "extra_levels",
    "feature_levels",
    "head_mode",
    "image_normalisation",
    "label_offset",
    "map_scalars",
    "neck_strides",
    "resolve_map_backend",
    "shift_labels",
    "vit_scale_factors",
]
