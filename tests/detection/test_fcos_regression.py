"""FCOS's box distances: the paper's exp(s_l * x) by default, torchvision's ReLU on request or for old files."""

import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.detection.fcos import FCOSRegressionHead

from cvft.detection.fcos_regression import FCOSBoxRegressionHead
from cvft.errors import CvftError
from cvft.tasks.detection import ObjectDetector


def group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(4, channels)


def levels() -> list[torch.Tensor]:
    return [torch.randn(2, 8, 6, 6), torch.randn(2, 8, 3, 3)]


def tiny_detector(**kwargs) -> ObjectDetector:
    options = {"backbone": "test_resnet", "pretrained": False, "image_size": 64, "fpn_channels": 32}
    return ObjectDetector(class_names=["red", "green"], **{**options, **kwargs})


def test_relu_computes_exactly_what_torchvision_computes():
    torch.manual_seed(0)
    ours = FCOSBoxRegressionHead(8, 1, num_levels=2, activation="relu", norm_layer=group_norm)
    theirs = FCOSRegressionHead(8, 1, norm_layer=group_norm)
    theirs.load_state_dict(ours.state_dict())
    x = levels()
    for mine, reference in zip(ours(x), theirs(x), strict=True):
        assert torch.equal(mine, reference)
    assert ours.scales is None


def test_exp_is_the_exponential_of_the_scaled_outputs_level_by_level():
    torch.manual_seed(0)
    head = FCOSBoxRegressionHead(8, 1, num_levels=2, norm_layer=group_norm)
    with torch.no_grad():
        head.scales.copy_(torch.tensor([0.5, 2.0]))
    x = levels()
    distances, centerness = head(x)
    expected = []
    for level, features in enumerate(x):
        raw = head.bbox_reg(head.conv(features))  # (N, 4, H, W)
        expected.append(torch.exp(head.scales[level] * raw).permute(0, 2, 3, 1).reshape(2, -1, 4))
    torch.testing.assert_close(distances, torch.cat(expected, dim=1))
    assert distances.shape == (2, 36 + 9, 4) and centerness.shape == (2, 45, 1)


def test_exp_distances_keep_a_gradient_where_relu_ones_have_died():
    """With every raw output negative, ReLU passes no gradient (the distance is dead); exp still learns."""
    grads = {}
    for activation in ("relu", "exp"):
        torch.manual_seed(0)
        head = FCOSBoxRegressionHead(8, 1, num_levels=2, activation=activation, norm_layer=group_norm)
        with torch.no_grad():
            head.bbox_reg.bias.fill_(-5.0)
        head(levels())[0].sum().backward()
        grads[activation] = head.bbox_reg.bias.grad.abs().sum().item()
    assert grads["relu"] == 0.0
    assert grads["exp"] > 0.0


def test_detector_uses_exp_by_default_and_relu_on_request():
    assert tiny_detector().detector.head.regression_head.activation == "exp"
    relu = tiny_detector(box_activation="relu").detector.head.regression_head
    assert relu.activation == "relu" and relu.scales is None
    with pytest.raises(CvftError, match="box_activation"):
        tiny_detector(box_activation="softplus")


def test_checkpoint_from_before_the_option_loads_with_relu(tmp_path):
    torch.manual_seed(0)
    model = tiny_detector(box_activation="relu", score_thresh=0.0).eval()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["box_activation"]  # what a checkpoint of an earlier release holds
    torch.save(checkpoint, path)
    loaded = ObjectDetector.from_checkpoint(path).eval()
    assert loaded.hparams.box_activation == "relu"
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected, actual = model(image)[0], loaded(image)[0]
    assert all(torch.equal(expected[k], actual[k]) for k in ("boxes", "scores", "labels"))


def test_adapter_from_before_the_option_rebuilds_with_relu(tmp_path):
    torch.manual_seed(0)
    model = tiny_detector(box_activation="relu", strategies=["lora"], score_thresh=0.0).eval()
    path = model.save_adapter(tmp_path / "old")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    architecture = json.loads(metadata["detector"])
    del architecture["box_activation"]
    save_file(tensors, str(path), metadata={**metadata, "detector": json.dumps(architecture)})
    torch.manual_seed(0)  # the same random base weights: the adapter holds only what trained
    rebuilt = ObjectDetector.from_adapter(path, pretrained=False).eval()
    assert rebuilt.hparams.box_activation == "relu"
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected, actual = model(image)[0], rebuilt(image)[0]
    assert all(torch.equal(expected[k], actual[k]) for k in ("boxes", "scores", "labels"))
