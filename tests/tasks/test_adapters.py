from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import cvft
from cvft.adapter_files import adapter_state_dict, read_adapter, save_adapter
from cvft.errors import CheckpointMismatchError, WeightsError
from cvft.tasks import ImageClassifier

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture
def base_weights(tmp_path):
    """Stand-in pretrained weights, so that a fresh model starts from exactly the same base."""
    path = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _train(model: ImageClassifier, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 3, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize(
    "strategies", [["bitfit"], ["linear_probe"], ["full"], ["norm_only"], ["lora"], ["loha"], ["lokr"]]
)
def test_adapter_round_trip_restores_identical_outputs(tmp_path, base_weights, strategies):
    trained = ImageClassifier("test_resnet", pretrained=False, weights=str(base_weights), class_names=CLASSES,
                              strategies=strategies)  # fmt: skip
    _train(trained)
    path = trained.save_adapter(tmp_path / "adapter")
    assert path.suffix == ".safetensors" and not list(tmp_path.glob("*.tmp"))

    restored = ImageClassifier.from_adapter(path, pretrained=False, weights=str(base_weights)).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained(images), restored(images))
    assert restored.class_names == CLASSES
    assert [s["name"] for s in restored.hparams.strategies] == strategies


def test_adapter_holds_only_trained_tensors(tmp_path, base_weights):
    model = ImageClassifier("test_resnet", pretrained=False, weights=str(base_weights), num_classes=3,
                            strategies=["bitfit"])  # fmt: skip
    tensors, info = read_adapter(model.save_adapter(tmp_path / "a.safetensors"))
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable  # BitFit keeps BatchNorm statistics fixed: no buffers
    assert info.backbone == "test_resnet"
    assert info["cvft_version"] == cvft.__version__
    assert info.strategies[0]["name"] == "bitfit"


def test_full_fine_tune_adapter_includes_batchnorm_statistics():
    model = timm.create_model("test_resnet", num_classes=3)
    names = set(adapter_state_dict(model))
    assert "bn1.running_mean" in names and "bn1.num_batches_tracked" in names


@pytest.mark.parametrize(
    ("backbone", "classes", "match"),
    [
        pytest.param("test_vit", 3, "test_resnet", id="wrong_backbone_says_which_backbone_it_expects"),
        pytest.param("test_resnet", 4, "shape differs", id="another_class_count"),
    ],
)
def test_an_adapter_onto_a_mismatched_model_is_refused(tmp_path, base_weights, backbone, classes, match):
    model = ImageClassifier("test_resnet", pretrained=False, weights=str(base_weights), num_classes=3,
                            strategies=["linear_probe"])  # fmt: skip
    path = model.save_adapter(tmp_path / "a.safetensors")
    with pytest.raises(CheckpointMismatchError, match=match):
        ImageClassifier(backbone, pretrained=False, num_classes=classes, strategies=["linear_probe"], adapter=str(path))


def test_non_adapter_and_corrupt_files_raise(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(WeightsError, match="not a cvft adapter"):
        read_adapter(plain)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="corrupt"):
        read_adapter(corrupt)
    with pytest.raises(WeightsError, match="does not exist"):
        read_adapter(tmp_path / "missing.safetensors")


def test_saving_nothing_trainable_is_an_error(tmp_path):
    model = timm.create_model("test_resnet", num_classes=3).requires_grad_(False)
    with pytest.raises(WeightsError, match="no trainable tensors"):
        save_adapter(model, tmp_path / "x.safetensors", "test_resnet", [])


def test_adapter_set_switches_between_lora_adapters_by_name(tmp_path, base_weights):
    from cvft.adapter_files import AdapterSet

    def trained(seed: int) -> ImageClassifier:
        torch.manual_seed(seed)
        model = ImageClassifier("test_resnet", pretrained=False, weights=str(base_weights), class_names=CLASSES,
                                strategies=["lora"])  # fmt: skip
        _train(model, steps=2)
        return model

    first, second = trained(1), trained(2)
    paths = {"first": first.save_adapter(tmp_path / "first"), "second": second.save_adapter(tmp_path / "second")}
    serving = ImageClassifier("test_resnet", pretrained=False, weights=str(base_weights), class_names=CLASSES,
                              strategies=["lora"]).eval()  # fmt: skip
    adapters = AdapterSet(serving.backbone, "test_resnet")
    for name, path in paths.items():
        adapters.add(name, path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, reference in (("second", second), ("first", first), ("second", second)):
            adapters.use(name)
            assert torch.equal(serving(images), reference(images)), name
    with pytest.raises(WeightsError, match="No adapter named 'third'"):
        adapters.use("third")


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("cvft.adapters", "cvft.adapter_files", "save_adapter"),
        ("cvft.detection.adapter", "cvft.detection.adapter_files", "save_detector_adapter"),
    ],
)
def test_former_adapter_file_modules_still_import_with_a_deprecation_warning(old, new, name):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
