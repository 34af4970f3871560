import logging

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from cvft.backbones.factory import UnknownBackboneError, create_backbone, is_pretrained, weights_source
from cvft.errors import CheckpointMismatchError, HubUnavailableError, WeightsError


def _save(resnet, tmp_path, fmt):
    sd = {k: v.clone() for k, v in resnet.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "resnet.safetensors"
        save_file(sd, str(path))
    elif fmt == "pth":
        path = tmp_path / "resnet.pth"
        torch.save(sd, path)
    else:
        path = tmp_path / "resnet.ckpt"
        ckpt = {"state_dict": {"model." + k: v for k, v in sd.items()}, "hyper_parameters": {"backbone": "test_resnet"}}
        torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "ckpt"])
def test_file_weights_reproduce_outputs(resnet, image, tmp_path, fmt):
    path = _save(resnet, tmp_path, fmt)
    model = create_backbone("test_resnet", weights=path).eval()
    with torch.no_grad():
        assert torch.allclose(model(image), resnet(image), atol=1e-6)
    assert weights_source(model) == f"file:{path.resolve()}"
    assert is_pretrained(model)
    model = create_backbone("test_resnet", weights=str(path), num_classes=1000).eval()
    with torch.no_grad():
        assert torch.allclose(model(image), resnet(image), atol=1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "ckpt"])
def test_new_head_keeps_backbone(resnet, tmp_path, fmt, caplog):
    path = _save(resnet, tmp_path, fmt)
    with caplog.at_level(logging.INFO, logger="cvft.backbones.factory"):
        model = create_backbone("test_resnet", weights=path, num_classes=5)
    assert "new head: 1000 → 5 classes, checkpoint head discarded" in caplog.text
    head = model.get_classifier()
    assert head.weight.shape[0] == 5
    ref = resnet.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith(model.pretrained_cfg["classifier"] + "."):
            assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize("checkpoint_head", [True, False])
def test_a_new_head_gets_the_fan_in_init_whatever_the_class_count(tmp_path, checkpoint_head):
    # timm's EfficientNet draws classifier weights from U(-1/sqrt(num_classes), ...): 0.707 for 2 classes.
    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet").eval()
    head = source.pretrained_cfg["classifier"]
    state = {k: v for k, v in source.state_dict().items() if checkpoint_head or not k.startswith(head + ".")}
    path = tmp_path / "effnet.safetensors"
    save_file(state, str(path))
    timm_two_class = timm.create_model("test_efficientnet", num_classes=2).get_classifier()
    bound = 1 / timm_two_class.in_features**0.5
    assert timm_two_class.weight.abs().max() > 10 * bound  # what the fix is for
    model = create_backbone("test_efficientnet", weights=path, num_classes=2)
    new = model.get_classifier()
    for tensor in (new.weight, new.bias):
        assert tensor.abs().max() <= bound and tensor.std() > bound / 4  # U(-bound, bound): std bound / sqrt(3)
    for key, value in model.state_dict().items():  # the backbone still holds the checkpoint's tensors
        if not key.startswith(head + "."):
            assert torch.equal(value, source.state_dict()[key]), key
    kept = create_backbone("test_efficientnet", weights=path, num_classes=1000) if checkpoint_head else None
    if kept is not None:  # a head the checkpoint fills is loaded, not re-initialised
        assert torch.equal(kept.get_classifier().weight, source.get_classifier().weight)


def test_head_size_inferred_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model("test_convnext", num_classes=7).eval()
    path = tmp_path / "convnext7.safetensors"
    save_file(small.state_dict(), str(path))
    model = create_backbone("test_convnext", weights=path).eval()
    assert model.num_classes == 7
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), small(x), atol=1e-6)


def test_random_init_is_not_pretrained():
    model = create_backbone("test_vit", num_classes=3)
    assert weights_source(model) == "none (random init)"
    assert not is_pretrained(model)
    assert model.get_classifier().out_features == 3


def test_other_backbone_checkpoint_rejected(tmp_path):
    vit = timm.create_model("test_vit")
    path = tmp_path / "vit.safetensors"
    save_file(vit.state_dict(), str(path), metadata={"architecture": "test_vit"})
    with pytest.raises(CheckpointMismatchError) as info:
        create_backbone("test_resnet", weights=path)
    msg = str(info.value)
    assert "test_resnet" in msg and "test_vit" in msg and str(path) in msg
    assert "missing" in msg and "unexpected" in msg and "strict=False" in msg


def test_lightning_hint_in_mismatch(tmp_path):
    vit = timm.create_model("test_vit")
    path = tmp_path / "vit.ckpt"
    torch.save(
        {
            "state_dict": {"model." + k: v for k, v in vit.state_dict().items()},
            "hyper_parameters": {"backbone": "test_vit"},
        },
        path,
    )
    with pytest.raises(CheckpointMismatchError, match="seems to come from backbone 'test_vit'"):
        create_backbone("test_resnet", weights=path)


def test_non_strict_loads_matching_and_warns(resnet, tmp_path, caplog):
    sd = dict(resnet.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    dropped = next(k for k in sd if k.startswith("layer1"))
    del sd[dropped]
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointMismatchError, match="1 missing"):
        create_backbone("test_resnet", weights=path)
    with caplog.at_level(logging.WARNING):
        model = create_backbone("test_resnet", weights=path, strict=False)
    assert "strict=False" in caplog.text
    assert torch.equal(model.state_dict()["fc.weight"], resnet.state_dict()["fc.weight"])


def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(WeightsError, match="absent.safetensors"):
        create_backbone("test_resnet", weights=path)


def test_pretrained_and_weights_conflict(tmp_path):
    with pytest.raises(ValueError, match="choose one"):
        create_backbone("test_resnet", pretrained=True, weights=tmp_path / "w.safetensors")


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownBackboneError, match="test_resnet"):
        create_backbone("test_resnnet")


def test_in_chans_adapts_first_conv(resnet, image, tmp_path):
    path = _save(resnet, tmp_path, "safetensors")
    model = create_backbone("test_resnet", weights=path, in_chans=1).eval()
    conv = model.pretrained_cfg["first_conv"] + ".weight"
    expected = adapt_input_conv(1, resnet.state_dict()[conv])
    assert model.state_dict()[conv].shape[1] == 1
    assert torch.allclose(model.state_dict()[conv], expected)
    with torch.no_grad():  # a grey image summed over RGB filters == the same image repeated on 3 channels
        grey = image[:, :1]
        assert torch.allclose(model(grey), resnet(grey.repeat(1, 3, 1, 1)), atol=1e-5)


def test_hub_unavailable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError) as info:
        create_backbone("test_vit", pretrained=True)
    msg = str(info.value)
    assert "test_vit" in msg and "weights=" in msg and "--model.weights" in msg and "HF_HUB_OFFLINE" in msg


def test_hub_other_errors_propagate(monkeypatch):
    def boom(*args, **kwargs):
        raise KeyError("not a hub problem")

    monkeypatch.setattr(timm, "create_model", boom)
    with pytest.raises(KeyError, match="not a hub problem"):
        create_backbone("test_vit", pretrained=True)


def test_connection_error_becomes_hub_unavailable(monkeypatch):
    def no_network(*args, **kwargs):
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as exc:
            raise ConnectionError("cannot reach huggingface.co") from exc

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(HubUnavailableError, match="test_vit.*cannot reach huggingface.co"):
        create_backbone("test_vit", pretrained=True, num_classes=4)
