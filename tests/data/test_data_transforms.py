from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import timm
import torch

from cvft.backbones.factory import UnknownBackboneError
from cvft.data.transforms import AUGMENT_PRESETS, build_transforms, data_config_for, eval_resize_size

MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)


@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
@pytest.mark.parametrize("train", [True, False])
def test_output_size_and_dtype(preset, train):
    pipeline = build_transforms(24, MEAN, STD, train=train, preset=preset)
    assert isinstance(pipeline, A.Compose)
    for shape in [(50, 70, 3), (10, 12, 3)]:  # larger and smaller than the output
        out = pipeline(image=np.full(shape, 100, np.uint8))["image"]
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 24, 24)


def test_non_square_and_grayscale():
    pipeline = build_transforms((16, 32), (0.5,), (0.5,), train=True, preset="strong")
    assert pipeline(image=np.zeros((40, 40, 1), np.uint8))["image"].shape == (1, 16, 32)
    pipeline = build_transforms((16, 32), (0.5,), (0.5,), train=False)
    assert pipeline(image=np.zeros((40, 40, 1), np.uint8))["image"].shape == (1, 16, 32)


@pytest.mark.parametrize("train", [True, False])
def test_normalisation(train):
    value = np.array([51, 102, 204], np.uint8)
    image = np.broadcast_to(value, (40, 40, 3)).copy()
    preset = "default" if train else "none"
    out = build_transforms(16, MEAN, STD, train=train, preset=preset)(image=image)["image"]
    expected = (value / 255.0 - np.array(MEAN)) / np.array(STD)
    for c in range(3):
        torch.testing.assert_close(out[c], torch.full((16, 16), float(expected[c])), atol=1e-5, rtol=0)


def test_eval_resizes_shorter_side_then_center_crops():
    assert eval_resize_size(224, 0.875) == (256, 256)
    assert eval_resize_size((32, 64), 0.5) == (64, 128)
    image = np.tile(np.arange(128, dtype=np.uint8), (64, 1))[:, :, None].repeat(3, axis=2)  # 64 x 128
    out = build_transforms(32, (0, 0, 0), (1, 1, 1), train=False, interpolation="nearest", crop_pct=0.5)(image=image)
    expected = torch.from_numpy(image[16:48, 48:80, 0] / 255.0).float()
    torch.testing.assert_close(out["image"][0], expected)


def test_eval_is_deterministic_and_seeded_train_reproducible():
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    pipeline = build_transforms(16, MEAN, STD, train=False)
    assert torch.equal(pipeline(image=image)["image"], pipeline(image=image)["image"])
    first = build_transforms(16, MEAN, STD, train=True, seed=7)
    second = build_transforms(16, MEAN, STD, train=True, seed=7)
    for _ in range(3):
        assert torch.equal(first(image=image)["image"], second(image=image)["image"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="preset"):
        build_transforms(16, MEAN, STD, train=True, preset="extreme")
    with pytest.raises(ValueError, match="interpolation"):
        build_transforms(16, MEAN, STD, train=True, interpolation="fancy")
    with pytest.raises(ValueError, match="crop_pct"):
        build_transforms(16, MEAN, STD, train=False, crop_pct=1.5)
    with pytest.raises(ValueError, match="image_size"):
        build_transforms((16, 16, 3), MEAN, STD, train=False)


def test_data_config_for_test_vit():
    config = data_config_for("test_vit")
    assert config == {
        "input_size": (3, 160, 160),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
        "crop_pct": 0.95,
    }


def test_data_config_for_efficientnet_lite0():
    config = data_config_for("tf_efficientnet_lite0")
    assert config["input_size"] == (3, 224, 224)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    assert config["crop_pct"] == 0.875 and config["interpolation"] == "bicubic"


def test_data_config_for_pretrained_tag_and_model():
    assert data_config_for("vit_small_patch16_224.augreg_in21k")["crop_pct"] == 0.9
    assert data_config_for("resnet18")["mean"] == pytest.approx((0.485, 0.456, 0.406))
    model = timm.create_model("test_resnet", pretrained=False)
    assert data_config_for(model)["input_size"] == data_config_for("test_resnet")["input_size"]


def test_data_config_for_unknown():
    with pytest.raises(UnknownBackboneError, match="resnett50"):
        data_config_for("resnett50")
    with pytest.raises(UnknownBackboneError, match="tag"):
        data_config_for("resnet18.no_such_tag")
