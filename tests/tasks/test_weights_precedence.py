"""``weights=<file>`` wins over the tasks' default ``pretrained=True``: nothing is fetched from the hub."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from cvft.backbones import create_backbone
from cvft.tasks import ImageClassifier, MultiTaskClassifier, ObjectDetector


@pytest.fixture
def base_weights(tmp_path):
    """A test_resnet state dict (3-class head) in a safetensors file, and the tensors it holds."""
    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=3).state_dict().items()}
    path = tmp_path / "base.safetensors"
    save_file(state, str(path))
    return path, state


def _assert_loaded(backbone: torch.nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    own = backbone.state_dict()
    compared = [k for k in state if k in own and not k.startswith(skip)]
    assert len(compared) > 10
    for key in compared:
        assert torch.equal(own[key], state[key]), key


def test_classifier_weights_take_precedence_over_default_pretrained(base_weights, monkeypatch):
    path, state = base_weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub download would fail loudly, not pass silently
    model = ImageClassifier("test_resnet", num_classes=3, weights=str(path))
    assert model.hparams.pretrained is True  # the default, left as the user gave it
    assert model.weights_source == f"file:{path.resolve()}"
    _assert_loaded(model.backbone, state)


def test_from_adapter_with_weights(base_weights, tmp_path, monkeypatch):
    path, state = base_weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained = ImageClassifier("test_resnet", num_classes=3, weights=str(path), strategies="linear_probe")
    with torch.no_grad():
        trained.backbone.fc.weight.add_(1.0)
    adapter = trained.save_adapter(tmp_path / "adapter.safetensors")
    restored = ImageClassifier.from_adapter(adapter, weights=str(path))
    assert restored.weights_source == f"file:{path.resolve()}"
    _assert_loaded(restored.backbone, state, skip=("fc.",))
    assert torch.equal(restored.backbone.fc.weight, trained.backbone.fc.weight)


def test_detector_and_multitask_weights_take_precedence(base_weights, monkeypatch):
    path, state = base_weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    detector = ObjectDetector(2, backbone="test_resnet", weights=str(path), image_size=64, fpn_channels=32)
    multitask = MultiTaskClassifier({"shape": {"num_classes": 3}}, "test_resnet", weights=str(path))
    for model in (detector, multitask):
        assert model.weights_source == f"file:{path.resolve()}"
        _assert_loaded(model.backbone, state, skip=("fc.",))


def test_create_backbone_still_refuses_both_explicitly(base_weights):
    """At the factory, ``pretrained`` defaults to False: asking for both is a real ambiguity."""
    path, _ = base_weights
    with pytest.raises(ValueError, match="choose one"):
        create_backbone("test_resnet", pretrained=True, weights=path)
