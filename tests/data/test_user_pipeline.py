"""User pipelines (``train_transform`` / ``eval_transform``): albumentations files and mappings round-trip, Python
callables work, and broken pipelines are refused at setup naming the step."""

from __future__ import annotations

import json
import logging

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from cvft.data import ImageFolderDataModule
from cvft.data.auto_augment import RandAugment
from cvft.data.random_erasing import RandomErasing
from cvft.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def image_root(make_class_folders):
    return make_class_folders({"cat": 4, "dog": 4})


def _data(root, **options) -> ImageFolderDataModule:
    defaults = dict(image_size=32, batch_size=2, num_workers=0, val_fraction=0.5, check_images="none", augment="none")
    return ImageFolderDataModule(root, **{**defaults, **options})


def _training_pipeline() -> A.Compose:
    return A.Compose(
        [
            A.RandomResizedCrop(size=(32, 32), scale=(0.3, 1.0)),
            A.HorizontalFlip(p=0.5),
            RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5),
            A.Normalize(mean=MEAN, std=STD),
            RandomErasing(p=0.5),
            ToTensorV2(),
        ]
    )


def _eval_mapping(size: int = 32, normalise: dict | None = None) -> dict:
    normalise = {"__class_fullname__": "Normalize", "mean": list(MEAN), "std": list(STD), "p": 1.0, **(normalise or {})}
    steps = [{"__class_fullname__": "Resize", "height": size, "width": size, "p": 1.0}, normalise]
    return {
        "transform": {
            "__class_fullname__": "Compose",
            "transforms": [*steps, {"__class_fullname__": "ToTensorV2", "p": 1.0}],
        }
    }


def test_a_saved_yaml_pipeline_round_trips_to_the_same_training_images(image_root, tmp_path):
    pipeline = _training_pipeline()
    path = tmp_path / "train.yaml"
    A.save(pipeline, str(path), data_format="yaml")
    data = _data(image_root, train_transform=str(path))
    data.setup("fit")
    dataset = data.datasets["train"]
    pipeline.set_random_seed(torch.initial_seed() % 2**32)  # the DataModule seeds its training pipeline so
    for index in range(len(dataset)):
        expected = pipeline(image=dataset.read(index))["image"]
        image, _ = dataset[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert torch.equal(image, expected)
    # the run saves the pipeline itself, not the path of a file that may change
    assert data.hparams["train_transform"]["transform"]["transforms"][2]["__class_fullname__"] == (
        "cvft.data.auto_augment.RandAugment"
    )


def _as_saved(pipeline: A.BaseCompose) -> dict:
    return json.loads(json.dumps(A.to_dict(pipeline)))


def test_an_inline_eval_mapping_gives_the_documented_tensor(image_root, tmp_path):
    data = _data(image_root, eval_transform=_eval_mapping())
    data.setup("validate")
    dataset = data.datasets["val"]
    image, _ = dataset[0]
    resized = cv2.resize(dataset.read(0), (32, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    expected = torch.from_numpy((resized - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).permute(2, 0, 1)
    assert image.dtype == torch.float32 and torch.allclose(image, expected, atol=1e-5)
    assert data.hparams["eval_transform"] == _as_saved(A.from_dict(_eval_mapping()))
    # a JSON file holding the same mapping is recorded the same way
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(_eval_mapping()))
    assert _data(image_root, eval_transform=str(path)).hparams["eval_transform"] == data.hparams["eval_transform"]


def test_a_python_callable_is_used_but_not_saved(image_root, caplog):
    def to_tensor(image: np.ndarray) -> torch.Tensor:
        resized = cv2.resize(image, (32, 32)).astype(np.float32) / 255
        return torch.from_numpy((resized - 0.5) / 0.25).permute(2, 0, 1)

    with caplog.at_level(logging.WARNING, logger="cvft.data.user_pipeline"):
        data = _data(image_root, eval_transform=to_tensor)
    assert "cannot be saved" in caplog.text
    assert data.hparams["eval_transform"] is None
    data.setup("validate")
    dataset = data.datasets["val"]
    assert torch.equal(dataset[0][0], to_tensor(dataset.read(0)))


def test_an_albumentations_object_from_python_is_saved(image_root):
    data = _data(image_root, eval_transform=A.from_dict(_eval_mapping()))
    assert data.hparams["eval_transform"] == _as_saved(A.from_dict(_eval_mapping()))


def _step_mapping(*steps: dict) -> dict:
    return {"__class_fullname__": "Compose", "transforms": list(steps)}


RESIZE = {"__class_fullname__": "Resize", "height": 32, "width": 32}
NORMALIZE = {"__class_fullname__": "Normalize", "mean": list(MEAN), "std": list(STD)}
TO_TENSOR = {"__class_fullname__": "ToTensorV2"}


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            (RESIZE, {"__class_fullname__": "GausianBlur"}, NORMALIZE, TO_TENSOR),
            "step 1 (GausianBlur): unknown transform",
        ),
        (
            (RESIZE, {"__class_fullname__": "GaussianBlur", "blur_limit": "big"}, NORMALIZE, TO_TENSOR),
            "step 1 (GaussianBlur): GaussianBlur(blur_limit='big') is misconfigured",
        ),
        ((RESIZE, {"__class_fullname__": "Lambda"}, TO_TENSOR), "step 1 (Lambda): Lambda holds Python code"),
    ],
    ids=["unknown-name", "bad-argument", "lambda"],
)
def test_a_broken_pipeline_is_refused_on_construction_naming_the_step(image_root, steps, expected):
    with pytest.raises(ConfigError) as error:
        _data(image_root, train_transform=_step_mapping(*steps))
    assert expected in str(error.value) and "train_transform (inline mapping)" in str(error.value)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            ({**RESIZE, "height": 64, "width": 64}, NORMALIZE, TO_TENSOR),
            "shape (3, 64, 64) (C x H x W) for an image of shape (16, 16, 3), but the model takes (3, 32, 32): the "
            "last step that sets the size is step 0 (Resize)",
        ),
        ((RESIZE, TO_TENSOR), "returns a torch.uint8 tensor; end the pipeline with Normalize(mean=(0.485, 0.456"),
        ((RESIZE, {"__class_fullname__": "ToFloat"}, TO_TENSOR), "not normalised: no value is below 0"),
        ((RESIZE, {**NORMALIZE, "max_pixel_value": 1.0}, TO_TENSOR), "not normalised: values reach"),
        ((RESIZE, NORMALIZE), "returns a ndarray, not a torch tensor"),
        (
            (RESIZE, {"__class_fullname__": "Crop", "x_max": 100, "y_max": 100}, NORMALIZE, TO_TENSOR),
            "fails at step 1 (Crop)",
        ),
    ],
    ids=["wrong-size", "uint8", "not-normalised", "0-255", "no-tensor", "step-raises"],
)
def test_a_pipeline_with_the_wrong_output_is_refused_at_setup(image_root, steps, expected):
    data = _data(image_root, eval_transform=_step_mapping(*steps))
    with pytest.raises(ConfigError) as error:
        data.setup("validate")
    assert expected in str(error.value), str(error.value)


def test_a_yaml_file_is_read_safely_and_a_missing_one_is_named(image_root, tmp_path):
    exploit = tmp_path / "exploit.yaml"
    exploit.write_text("transform: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        _data(image_root, train_transform=str(exploit))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        _data(image_root, train_transform=str(tmp_path / "missing.yaml"))


def test_a_step_without_p_gets_its_class_default_not_albumentations_half(image_root):
    data = _data(image_root, eval_transform=_step_mapping(RESIZE, NORMALIZE, TO_TENSOR))
    assert [step.p for step in data.user_pipelines["eval"].transform.transforms] == [1.0, 1.0, 1.0]


def test_random_erasing_goes_into_a_user_pipeline_not_beside_it(image_root):
    with pytest.raises(ConfigError, match="Put the erasing into your pipeline"):
        _data(image_root, train_transform=_step_mapping(RESIZE, NORMALIZE, TO_TENSOR), random_erasing=0.25)


def test_random_training_pipelines_are_named_for_the_feature_cache(image_root):
    assert _data(image_root).random_training_pipeline() is None
    assert "random_erasing=0.25" in _data(image_root, random_erasing=0.25).random_training_pipeline()
    mapping = _step_mapping(RESIZE, NORMALIZE, TO_TENSOR)
    assert "train_transform" in _data(image_root, train_transform=mapping).random_training_pipeline()


def test_grayscale_data_with_a_policy_preset_and_random_erasing(make_class_folders):
    root = make_class_folders({"a": 3, "b": 3})
    data = _data(root, channels=1, augment="rand-m9-n2-mstd0.5", random_erasing=0.5)
    images, _ = next(iter(data.train_dataloader()))
    assert images.shape == (2, 1, 32, 32) and images.dtype == torch.float32
