"""Object detection data: COCO / YOLO annotations, box-aware transforms, the dataset and the DataModule.

Example:
    >>> from cvft.data.detection import DetectionDataModule, write_shapes_detection
    >>> root = write_shapes_detection("/tmp/cvft-shapes")  # doctest: +SKIP
    >>> data = DetectionDataModule(coco_json=root / "annotations.json", image_size=128)  # doctest: +SKIP
"""

from cvft.data.detection.annotations import (
    OUT_OF_BOUNDS_MODES,
    DetectionAnnotations,
    DetectionRecord,
    image_size,
    read_coco,
    read_yolo,
)
from cvft.data.detection.datamodule import DetectionDataModule
from cvft.data.detection.dataset import DetectionDataset, detection_collate
from cvft.data.detection.shapes import SHAPE_CLASSES, write_shapes_detection
from cvft.data.detection.transforms import DETECTION_AUGMENT_PRESETS, build_detection_transforms, letterbox

__all__ = [
    "DETECTION_AUGMENT_PRESETS",
    "OUT_OF_BOUNDS_MODES",
    "SHAPE_CLASSES",
    "DetectionAnnotations",
    "DetectionDataModule",
    "DetectionDataset",
    "DetectionRecord",
    "build_detection_transforms",
    "detection_collate",
    "image_size",
    "letterbox",
    "read_coco",
    "read_yolo",
    "write_shapes_detection",
]
