"""QAT: torchao's int8 fake quantisation in the training forward, alone and under LoRA, on CPU."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from cvft.errors import StrategyError
from cvft.strategies import apply_strategies, convert_qat, merge_lora, unmerge_lora

pytest.importorskip("torchao")
from torchao.quantization.quant_primitives import (  # noqa: E402
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)

from cvft.strategies.qat.layer import QATConv2d, QATLinear  # noqa: E402


def _reference_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """torchao's quantise-dequantise, int8 symmetric, one scale per output channel (rows of the flattened weight)."""
    matrix = weight.detach().reshape(weight.shape[0], -1)
    block = (1, matrix.shape[1])
    scale, zero = choose_qparams_affine(matrix, MappingType.SYMMETRIC, block, torch.int8, -128, 127)
    codes = quantize_affine(matrix, block, scale, zero, torch.int8, -128, 127)
    return dequantize_affine(codes, block, scale, zero, torch.int8, -128, 127).reshape(weight.shape)


def _reference_per_token(x: torch.Tensor) -> torch.Tensor:
    """torchao's quantise-dequantise, int8 asymmetric, one scale and zero point per token (last dimension)."""
    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    scale, zero = choose_qparams_affine(x, MappingType.ASYMMETRIC, block, torch.int8, -128, 127)
    codes = quantize_affine(x, block, scale, zero, torch.int8, -128, 127)
    return dequantize_affine(codes, block, scale, zero, torch.int8, -128, 127)


@pytest.mark.parametrize(
    "layer",
    [torch.nn.Linear(24, 10), torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, groups=8)],
    ids=["linear", "conv", "depthwise"],
)
def test_fake_quantised_weight_equals_torchaos_quantise_dequantise(layer):
    torch.manual_seed(0)
    wrapped = QATLinear(layer) if isinstance(layer, torch.nn.Linear) else QATConv2d(layer)
    expected = _reference_per_channel(layer.weight)
    torch.testing.assert_close(wrapped.fake_quantized_weight(), expected, rtol=0, atol=1e-7)
    assert not torch.equal(expected, layer.weight)  # it really rounds
    x = torch.randn(2, 24) if isinstance(layer, torch.nn.Linear) else torch.randn(2, layer.in_channels, 5, 5)
    reference = F.linear(x, expected, layer.bias) if x.dim() == 2 else layer._conv_forward(x, expected, layer.bias)
    torch.testing.assert_close(wrapped(x), reference, rtol=0, atol=1e-6)


def test_activations_are_fake_quantised_per_token_and_per_pixel():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 4)
    layer = QATLinear(linear, activations="per_token")
    x = torch.randn(2, 5, 16)
    expected = F.linear(_reference_per_token(x), _reference_per_channel(linear.weight), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)

    conv = torch.nn.Conv2d(6, 4, 1)
    layer = QATConv2d(conv, activations="per_token")
    x = torch.randn(2, 6, 3, 3)
    pixels = _reference_per_token(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer(x), conv._conv_forward(pixels, _reference_per_channel(conv.weight), conv.bias),
                               rtol=0, atol=1e-6)  # fmt: skip


def test_gradients_pass_straight_through_the_rounding():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3)
    layer = QATConv2d(conv)
    upstream = torch.randn_like(conv.weight)
    (layer.fake_quantized_weight() * upstream).sum().backward()
    # identity gradient for every value strictly inside the channel's range; zero at the range edge (the absmax,
    # which torchao's scale absmax / 127.5 puts half a step outside [-128, 127], so it is clipped)
    flat = conv.weight.detach().reshape(6, -1)
    inside = (flat.abs() < flat.abs().amax(dim=1, keepdim=True)).reshape(conv.weight.shape)
    torch.testing.assert_close(conv.weight.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    assert (~inside).sum() == 6  # one clipped value per output channel


def test_qat_alone_keeps_parameters_and_keys_and_converts_back():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    keys, params = list(model.state_dict()), {n: p for n, p in model.named_parameters()}
    apply_strategies(model, ["qat"])
    assert isinstance(model.layer1[0].conv1, QATConv2d) and type(model.fc) is torch.nn.Linear
    assert list(model.state_dict()) == keys
    assert all(p is params[n] and p.requires_grad for n, p in model.named_parameters())
    convert_qat(model)
    assert type(model.layer1[0].conv1) is torch.nn.Conv2d and list(model.state_dict()) == keys


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_qat_then_lora_trains_only_lora_and_head_over_a_bit_identical_base(name):
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name == "test_vit" else {}
    model = timm.create_model(name, num_classes=3, **kwargs)
    targets = "vit_attention" if name == "test_vit" else "resnet_blocks"
    apply_strategies(model, ["qat", {"name": "lora", "rank": 2, "targets": targets}])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {f"{model.default_cfg['classifier']}.{n}" for n, _ in model.get_classifier().named_parameters()}
    assert trainable == {n for n in trainable if ".lora_" in n} | head and len(trainable) > len(head)
    base = [m for m in model.modules() if isinstance(m, (QATLinear, QATConv2d))]
    assert base
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)

    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)  # into the fake-quantised base weight
        torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)
        unmerge_lora(model)
        assert torch.equal(model(x), unmerged)


def test_qat_after_lora_is_refused_with_the_order_to_use():
    model = timm.create_model("test_vit", num_classes=3)
    with pytest.raises(StrategyError, match=r"\['qat', 'lora'\]"):
        apply_strategies(model, ["lora", "qat"])


def test_unknown_activation_scheme_and_unsupported_targets_are_refused():
    with pytest.raises(StrategyError, match="per_token"):
        apply_strategies(timm.create_model("test_vit", num_classes=3), [{"name": "qat", "activations": "per_tensor"}])
    with pytest.raises(StrategyError, match="matches no Linear or Conv2d layer"):
        apply_strategies(timm.create_model("test_vit", num_classes=3), [{"name": "qat", "targets": "nope"}])
