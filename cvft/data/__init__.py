"""Image data: reading images, finding samples, splitting, transforms and the DataModules (classification, detection).

Example:
    >>> from cvft.data import ImageFolderDataModule, write_demo_image_folder
    >>> root = write_demo_image_folder("digits", "/tmp/cvft-digits", limit_per_class=20)  # doctest: +SKIP
    >>> data = ImageFolderDataModule(root, backbone="tf_efficientnet_lite0", image_size=64)  # doctest: +SKIP
"""

from cvft.data.dataset import ImageDataset, seed_worker
from cvft.data.demo import DEMO_SOURCES, write_demo_image_folder
from cvft.data.detection import DetectionDataModule, write_shapes_detection
from cvft.data.image_folder import CHECK_IMAGES_MODES, ImageFolderDataModule
from cvft.data.io import IMAGE_SUFFIXES, check_image, is_image_file, load_image
from cvft.data.labelled_module import LabelledDataModule
from cvft.data.medical import MedicalImageDataModule
from cvft.data.multitask import MultiTaskDataModule, TaskBatchSampler
from cvft.data.normalization import per_channel
from cvft.data.samples import (
    Sample,
    SplitRoots,
    find_split_roots,
    is_ignored_file,
    read_label_csv,
    scan_class_folders,
    scan_split_folders,
    scan_unlabelled,
)
from cvft.data.split import stratified_split
from cvft.data.transforms import (
    AUGMENT_PRESETS,
    IMAGENET_DATA_CONFIG,
    INTERPOLATIONS,
    build_transforms,
    data_config_for,
    eval_resize_size,
)

__all__ = [
    "AUGMENT_PRESETS",
    "CHECK_IMAGES_MODES",
    "DEMO_SOURCES",
    "DetectionDataModule",
    "IMAGENET_DATA_CONFIG",
    "IMAGE_SUFFIXES",
    "INTERPOLATIONS",
    "MedicalImageDataModule",
    "ImageDataset",
    "ImageFolderDataModule",
    "LabelledDataModule",
    "MultiTaskDataModule",
    "Sample",
    "SplitRoots",
    "TaskBatchSampler",
    "build_transforms",
    "check_image",
    "data_config_for",
    "eval_resize_size",
    "find_split_roots",
    "is_ignored_file",
    "is_image_file",
    "load_image",
    "per_channel",
    "read_label_csv",
    "scan_class_folders",
    "scan_split_folders",
    "scan_unlabelled",
    "seed_worker",
    "stratified_split",
    "write_demo_image_folder",
    "write_shapes_detection",
]
