"""Medical data and the new augmentation options: the RandAugment / TrivialAugment / AugMix presets, random erasing
and user pipelines on float ``[0, 1]`` images; the crop-and-flip presets of natural images stay refused."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import lightning
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from cvft.data import MedicalImageDataModule
from cvft.data.auto_augment import RandAugment
from cvft.data.medical import MedicalArrayDataset, build_medical_transforms
from cvft.errors import ConfigError


def _npz(path: Path, count: int = 6) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2)[:, None]
    np.savez(path, **arrays)
    return path


def _data(tmp_path: Path, **options) -> MedicalImageDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    defaults = dict(image_size=28, channels=1, batch_size=2, num_workers=0, mean=(0.5,), std=(0.25,))
    return MedicalImageDataModule(medmnist=str(_npz(tmp_path / "tiny.npz")), **{**defaults, **options})


POLICIES = ["randaugment", "trivialaugment", "augmix", "rand-m9-n2-mstd0.5", "augmix-m5-w2-d2"]


def _training_images(data: MedicalImageDataModule) -> list[torch.Tensor]:
    train = data.datasets["train"]
    return [train[i][0] for i in range(len(train))]


@pytest.mark.parametrize("augment", POLICIES)
def test_policy_presets_on_medical_arrays_give_the_tensor_and_repeat_under_the_seed(tmp_path, augment):
    lightning.seed_everything(0)
    data = _data(tmp_path, augment=augment)
    data.setup("fit")
    train = data.datasets["train"]
    assert isinstance(train, MedicalArrayDataset) and not train.deterministic_transform  # no cached tensors
    first = _training_images(data)
    assert all(image.shape == (1, 28, 28) and image.dtype == torch.float32 for image in first)
    plain = [(torch.from_numpy(train.read(i)).permute(2, 0, 1) - 0.5) / 0.25 for i in range(len(train))]
    assert sum(not torch.allclose(a, b, atol=1e-5) for a, b in zip(first, plain, strict=True)) >= 4  # augmented
    lightning.seed_everything(0)
    again = _data(tmp_path / "again", augment=augment)
    again.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip(first, _training_images(again), strict=True))
    lightning.seed_everything(1)
    other = _data(tmp_path / "other", augment=augment)
    other.setup("fit")
    assert any(not torch.equal(a, b) for a, b in zip(first, _training_images(other), strict=True))
    # evaluation stays cvft's deterministic pipeline
    assert data.datasets["val"].deterministic_transform


def test_a_medical_policy_preset_replaces_the_affine_and_never_flips():
    """The policy runs between the fit-and-pad and Normalize, in place of ``medical``'s affine; there is no flip."""
    pipeline = build_medical_transforms(28, (0.5,), (0.25,), train=True, preset="rand-m9-n2", seed=0)
    assert [type(step).__name__ for step in pipeline.transforms] == [
        "LongestMaxSize", "PadIfNeeded", "RandAugment", "Normalize", "ToTensorV2",
    ]  # fmt: skip
    assert pipeline.transforms[2].fill == [0.0]  # uncovered pixels like the padding


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"augment": "default"}, "Unknown medical augmentation preset 'default'.*crop and flip"),
        ({"augment": "rand-m12"}, r"augment 'rand-m12'.*m=12"),
        ({"augment": "rand-x3"}, "unknown key 'x3'"),
        ({"random_erasing": 1.5}, r"random_erasing.*\[0, 1\]"),
        ({"random_erasing": 0.25, "random_erasing_mode": "zeros"}, "Unknown random_erasing_mode 'zeros'"),
    ],
)
def test_bad_medical_augmentation_options_are_refused(tmp_path, options, expected):
    with pytest.raises(ConfigError, match=expected):
        _data(tmp_path, **options)


def test_random_erasing_on_medical_images_erases_after_normalisation(tmp_path):
    data = _data(tmp_path, augment="none", random_erasing=1.0, random_erasing_mode="const")
    data.setup("fit")
    train = data.datasets["train"]
    assert isinstance(train, MedicalArrayDataset) and not train.deterministic_transform  # erasing is random
    image, _ = train[0]
    plain = (torch.from_numpy(train.read(0)).permute(2, 0, 1) - 0.5) / 0.25
    erased = image != plain
    assert erased.any() and bool((image[erased] == 0).all())  # the box holds the normalised mean
    assert data.datasets["val"].deterministic_transform


def test_a_float_user_pipeline_with_a_policy_step_trains_on_medical_arrays(tmp_path):
    normalise = A.Normalize(mean=(0.5,), std=(0.25,), max_pixel_value=1.0)
    pipeline = A.Compose([RandAugment(num_ops=2, magnitude=5), normalise, ToTensorV2()])
    data = _data(tmp_path, train_transform=A.to_dict(pipeline))
    images, _ = next(iter(data.train_dataloader()))
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32
    assert not data.datasets["train"].deterministic_transform


def test_a_uint8_style_pipeline_is_refused_on_float_medical_images(tmp_path):
    pipeline = A.Compose([A.Normalize(mean=(0.5,), std=(0.25,)), ToTensorV2()])  # max_pixel_value=255 on [0, 1]
    data = _data(tmp_path, eval_transform=A.to_dict(pipeline))
    with pytest.raises(ConfigError, match=r"divided by 255 twice.*max_pixel_value=1\)"):
        data.setup("validate")
