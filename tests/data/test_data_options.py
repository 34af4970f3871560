"""Every DataModule refuses out-of-range options at construction, naming the option, the value and the range.

Options raise ConfigError; split fractions raise DatasetError, as the split itself does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from cvft.data._options import validate_options
from cvft.data.detection.datamodule import DetectionDataModule
from cvft.data.image_folder import ImageFolderDataModule
from cvft.data.medical.datamodule import MedicalImageDataModule
from cvft.data.multitask import MultiTaskDataModule
from cvft.errors import ConfigError, DatasetError


def _image_folder(**options):
    return ImageFolderDataModule("unused_root", **options)


def _medical(**options):
    return MedicalImageDataModule(csv="unused.csv", **options)


def _detection(**options):
    return DetectionDataModule(coco_json="unused.json", **options)


def _multitask(**options):
    return MultiTaskDataModule({"a": TensorDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2))}, **options)


# (DataModule factory, option, bad value, fragment of the allowed range the message must name)
ROWS = [
    (factory, option, value, allowed)
    for factory in (_image_folder, _medical, _detection)
    for option, value, allowed in [
        ("image_size", 0, "positive number of pixels"),
        ("image_size", -32, "positive number of pixels"),
        ("batch_size", 0, ">= 1"),
        ("num_workers", -1, ">= 0"),
        ("val_fraction", 1.0, "0 <= value < 1"),
        ("val_fraction", -0.1, "0 <= value < 1"),
    ]
] + [
    (_image_folder, "test_fraction", 1.5, "0 <= value < 1"),
    (_image_folder, "image_size", (224, 0), "(height, width)"),
    (_medical, "test_fraction", -0.5, "0 <= value < 1"),
    (_medical, "context", -1, ">= 0"),
    (_detection, "min_visibility", 1.5, "0 <= value <= 1"),
    (_multitask, "batch_size", 0, ">= 1"),
    (_multitask, "num_workers", -2, ">= 0"),
    (_multitask, "batches_per_epoch", 0, ">= 1 or None"),
]


@pytest.mark.parametrize(
    ("factory", "option", "value", "allowed"),
    ROWS,
    ids=[f"{f.__name__.lstrip('_')}-{o}={v}" for f, o, v, _ in ROWS],
)
def test_out_of_range_option_is_refused_naming_option_value_and_range(factory, option, value, allowed):
    expected = DatasetError if option.endswith("_fraction") else ConfigError
    with pytest.raises(expected) as info:
        factory(**{option: value})
    message = str(info.value)
    assert option in message and repr(value) in message and allowed in message


@pytest.mark.parametrize("factory", [_image_folder, _medical])
def test_fractions_must_leave_training_images(factory):
    with pytest.raises(DatasetError, match=r"val_fraction \+ test_fraction must be below 1"):
        factory(val_fraction=0.6, test_fraction=0.4)


def test_image_size_zero_is_not_replaced_by_the_backbone_default():
    """image_size=0 was falsy and silently became the backbone's 160 px."""
    with pytest.raises(ConfigError, match="image_size"):
        ImageFolderDataModule("unused_root", backbone="test_vit", image_size=0)
    assert ImageFolderDataModule("unused_root", backbone="test_vit").image_size == 160


def test_valid_options_pass():
    validate_options(
        image_size=(224, 160), batch_size=1, num_workers=0, val_fraction=0.0, test_fraction=0.5, min_visibility=1.0,
        batches_per_epoch=None, context=0, channels=3,
    )  # fmt: skip
    _multitask(batch_size=1, batches_per_epoch=3)


def test_a_single_class_csv_is_refused_by_the_medical_datamodule(tmp_path: Path):
    for i in range(4):
        Image.new("L", (8, 8), i).save(tmp_path / f"{i}.png")
    rows = ["path,label,patient_id"] + [f"{i}.png,normal,p{i}" for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    data = MedicalImageDataModule(csv=str(tmp_path / "labels.csv"), image_size=8, num_workers=0, val_fraction=0.25)
    with pytest.raises(DatasetError) as info:
        _ = data.num_classes
    message = str(info.value)
    assert "labels.csv" in message and "'normal'" in message and "at least 2 classes" in message
