import pytest
import torch
from safetensors.torch import save_file

from cvft.backbones.weights import load_state_dict_file, read_checkpoint, strip_key_prefix
from cvft.errors import WeightsError


class NotATensor:
    def __init__(self):
        self.value = 1


def test_safetensors_roundtrip_with_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.ones(2)}, str(path), metadata={"architecture": "test_vit"})
    ckpt = read_checkpoint(path)
    assert ckpt.architecture == "test_vit"
    assert ckpt.metadata["architecture"] == "test_vit"
    assert torch.equal(load_state_dict_file(path)["a.weight"], torch.ones(2))


@pytest.mark.parametrize("nesting", ["state_dict", "model", "model_state"])
def test_nested_state_dicts_unwrapped(tmp_path, nesting):
    path = tmp_path / "w.pth"
    torch.save({nesting: {"fc.weight": torch.zeros(3)}, "epoch": 4, "arch": "resnet18"}, path)
    ckpt = read_checkpoint(path)
    assert list(ckpt.state_dict) == ["fc.weight"]
    assert ckpt.architecture == "resnet18"


def test_lightning_hparams_hint(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(1)}, "hyper_parameters": {"backbone": "test_vit"}}, path)
    assert read_checkpoint(path).architecture == "test_vit"


def test_pickled_object_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "obj": NotATensor()}, path)
    with pytest.raises(WeightsError, match="only plain tensors") as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="nope.safetensors"):
        load_state_dict_file(path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "w.onnx"
    path.write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"\.onnx"):
        read_checkpoint(path)


def test_no_tensors(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(WeightsError, match="No state dict"):
        read_checkpoint(path)


@pytest.mark.parametrize("prefix", ["", "model.", "module.", "model.module."])
def test_strip_key_prefix(prefix):
    sd = {f"{prefix}conv.weight": torch.zeros(1), f"{prefix}fc.bias": torch.zeros(1)}
    if prefix:
        sd["criterion.weight"] = torch.zeros(1)
    out, found = strip_key_prefix(sd, ["conv.weight", "fc.bias"])
    assert found == prefix
    assert set(out) == {"conv.weight", "fc.bias"}
