"""Shared LoRA specifics: one tensor per shape group, gradients from every layer, counts, exact merge and export."""

from __future__ import annotations

import pytest
import timm
import torch
from strategy_testkit import IMAGE_SIZE, make_backbone, trainable_names
from torch import nn

from cvft.adapter_files import adapter_state_dict, load_adapter, save_adapter
from cvft.errors import StrategyError
from cvft.strategies import build_strategy
from cvft.strategies.lora import export_plain_model, lora_layers, merge_lora, unmerge_lora
from cvft.strategies.shared_lora import SharedLoRA, SharedLoRALayer, inject_shared_lora, shared_pairs


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _randomise(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "shared." in name or name.endswith("lora_scale"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator) + (1 if "scale" in name else 0))


def test_one_tensor_per_shape_group_and_named_once():
    model = make_backbone("test_vit")
    SharedLoRA(rank=4, targets="vit_all").setup(model)
    layers = lora_layers(model)
    assert len(layers) == 24 and all(isinstance(layer, SharedLoRALayer) for layer in layers.values())
    # weight shapes: qkv (3D, D) and fc1 (H, D) are both (192, 64) in test_vit, proj and fc2 differ
    pointers = {name: layer.shared.lora_A.data_ptr() for name, layer in layers.items()}
    assert pointers["blocks.0.attn.qkv"] == pointers["blocks.5.attn.qkv"] == pointers["blocks.3.mlp.fc1"]
    assert pointers["blocks.0.attn.qkv"] != pointers["blocks.0.attn.proj"]
    assert len(set(pointers.values())) == 3 == len(shared_pairs(model))
    names = [n for n, _ in model.named_parameters() if ".shared." in n]
    assert names == [
        "blocks.0.attn.qkv.shared.lora_A",
        "blocks.0.attn.qkv.shared.lora_B",
        "blocks.0.attn.proj.shared.lora_A",
        "blocks.0.attn.proj.shared.lora_B",
        "blocks.0.mlp.fc2.shared.lora_A",
        "blocks.0.mlp.fc2.shared.lora_B",
    ]
    # closed form: r * (in + out) per shape group, one scale per layer (D = 64, H = 192)
    r, D, H = 4, 64, 192  # noqa: N806
    expected = r * (D + 3 * D) + r * (D + D) + r * (H + D) + 24
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" not in n) == expected


def test_conv_layers_share_by_weight_shape():
    model = make_backbone("test_resnet")
    SharedLoRA(rank=2, targets="resnet_blocks").setup(model)
    shapes = {tuple(layer.base.weight.shape) for layer in lora_layers(model).values()}
    assert len(shared_pairs(model)) == len(shapes)
    for layer in lora_layers(model).values():
        assert layer.shared.lora_A.shape == (2, layer.base.weight[0].numel())
        assert layer.shared.lora_B.shape == (layer.base.weight.shape[0], 2)


def test_shared_factors_receive_the_gradient_of_every_layer():
    """Parallel independent layers: the loss is a sum of per-layer terms, so the shared gradient is their sum."""
    torch.manual_seed(0)
    model = nn.ModuleDict({f"l{i}": nn.Linear(4, 5) for i in range(3)})
    inject_shared_lora(model, "Linear", rank=2, alpha=2)
    _randomise(model)
    inputs = {name: torch.randn(6, 4) for name in model}

    def loss_of(names):
        return sum((model[name](inputs[name]) ** 2).sum() for name in names)

    shared = model["l0"].shared
    per_layer = []
    for name in model:
        shared.zero_grad()
        loss_of([name]).backward()
        assert shared.lora_A.grad.abs().sum() > 0 and shared.lora_B.grad.abs().sum() > 0
        per_layer.append((shared.lora_A.grad.clone(), shared.lora_B.grad.clone()))
    shared.zero_grad()
    loss_of(list(model)).backward()
    torch.testing.assert_close(shared.lora_A.grad, sum(g[0] for g in per_layer))
    torch.testing.assert_close(shared.lora_B.grad, sum(g[1] for g in per_layer))


def test_delta_is_layer_scale_times_shared_product():
    model = make_backbone("test_resnet")
    SharedLoRA(rank=3, alpha=6, targets="resnet_blocks").setup(model)
    _randomise(model)
    for layer in lora_layers(model).values():
        a, b = layer.shared.lora_A, layer.shared.lora_B
        expected = layer.lora_scale * torch.einsum("or,ri->oi", b, a)
        torch.testing.assert_close(layer.delta_weight(), expected.reshape(layer.base.weight.shape))
        assert layer.scaling == 2.0


@pytest.mark.parametrize(
    ("name", "targets"),
    [("test_vit", "vit_all"), ("test_resnet", "resnet_blocks"), ("convnext_atto", "convnext_blocks")],
)
def test_merge_unmerge_export_are_exact(name, targets):
    torch.manual_seed(0)
    kwargs = {"img_size": IMAGE_SIZE} if name == "test_vit" else {}
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    keys = list(model.state_dict())
    SharedLoRA(rank=2, targets=targets).setup(model)
    _randomise(model)
    model.eval()
    bases = {n: layer.base.weight.detach().clone() for n, layer in lora_layers(model).items()}
    with torch.no_grad():
        unmerged = model(_images())
        merge_lora(model)
        torch.testing.assert_close(model(_images()), unmerged, rtol=1e-4, atol=1e-5)
        unmerge_lora(model)
        for n, layer in lora_layers(model).items():
            torch.testing.assert_close(layer.base.weight, bases[n], rtol=0, atol=1e-6)
        plain = export_plain_model(model)
    assert list(plain.state_dict()) == keys
    fresh = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_images()), unmerged, rtol=1e-4, atol=1e-5)


def test_adapter_file_stores_each_shared_tensor_once_and_keeps_sharing(tmp_path):
    model = make_backbone("test_vit")
    SharedLoRA(rank=2, targets="vit_attention").setup(model)
    _randomise(model)
    tensors = adapter_state_dict(model)
    assert sum(".shared." in key for key in tensors) == 4  # two shape groups x (A, B)
    path = save_adapter(model, tmp_path / "shared", "test_vit", [{"name": "shared_lora"}])
    fresh = make_backbone("test_vit")
    SharedLoRA(rank=2, targets="vit_attention").setup(fresh)
    load_adapter(fresh, path, backbone="test_vit")
    assert fresh.blocks[3].attn.qkv.shared.lora_A is fresh.blocks[0].attn.qkv.shared.lora_A
    torch.testing.assert_close(fresh.blocks[3].attn.qkv.shared.lora_B, model.blocks[0].attn.qkv.shared.lora_B)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(_images()), model.eval()(_images()))
    # a full state dict (Lightning checkpoints) repeats the shared tensor under every layer; loading keeps sharing
    other = make_backbone("test_vit")
    SharedLoRA(rank=2, targets="vit_attention").setup(other)
    other.load_state_dict(model.state_dict())
    assert other.blocks[5].attn.proj.shared.lora_A is other.blocks[0].attn.proj.shared.lora_A
    assert torch.equal(other.blocks[5].attn.proj.shared.lora_A, model.blocks[0].attn.proj.shared.lora_A)


def test_starts_unchanged_and_trains_the_documented_names():
    reference = make_backbone("test_resnet").eval()
    model = make_backbone("test_resnet")
    SharedLoRA(rank=2, targets="resnet_blocks", train_head=False).setup(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(_images()), reference(_images()))
    trainable = trainable_names(model)
    assert all(n.endswith(("shared.lora_A", "shared.lora_B", "lora_scale")) for n in trainable)
    assert all(layer.lora_scale.item() == 1.0 for layer in lora_layers(model).values())


def test_errors_are_clear():
    with pytest.raises(StrategyError, match="shared_lora: rank"):
        build_strategy({"name": "shared_lora", "rank": 0})
    with pytest.raises(StrategyError, match="matches no Linear or Conv2d"):
        SharedLoRA(targets="nothing_here").setup(make_backbone("test_vit"))
    from cvft.strategies.shared_lora import SharedLowRankPair

    with pytest.raises(StrategyError, match="cannot adapt"):
        SharedLoRALayer(nn.Linear(4, 5), SharedLowRankPair(6, 4, rank=2))
