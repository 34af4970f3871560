"""Bottleneck adapter specifics the shared matrix cannot see.

The matrix (``rows_adapters.py``) covers trainable sets, closed-form sizes on the test models, frozen weights,
BatchNorm statistics, the falling loss, adapter files and the refused family. Here: identity at initialisation on
real timm architectures, each placement against a reference formula written from the block's own sub-modules, weight
sharing, closed-form sizes on larger models, and argument errors.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from strategy_testkit import make_backbone, trainable_names
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies import build_strategy
from cvft.strategies.adapters import (
    ConvAdapter,
    SharedAdapter,
    ViTAdapter,
    adapter_wrappers,
    conv_blocks,
    remove_adapters,
)

CNNS = ["resnet18", "convnext_atto", "efficientnet_b0", "tf_efficientnet_lite0"]
CONV_SPECS = [
    {"placement": "parallel_block", "kind": "pointwise"},
    {"placement": "parallel_block", "kind": "depthwise"},
    {"placement": "parallel_conv", "kind": "depthwise"},
    {"placement": "parallel_conv", "kind": "pointwise"},
    {"placement": "sequential", "kind": "depthwise", "scale": "scalar"},
]
VIT_SPECS = [
    {"name": "vit_adapter"},
    {"name": "vit_adapter", "style": "adaptformer", "learnable_scale": True},
    {"name": "vit_adapter", "style": "houlsby", "positions": ["mlp"], "blocks": [0, -1]},
    {"name": "shared_adapter"},
    {"name": "shared_adapter", "style": "adaptformer"},
]


def _cnn(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3).eval()


def _vit(**kwargs) -> nn.Module:
    """A ViT-Tiny for 32x32 inputs with 4 register tokens, no class token and LayerScale."""
    torch.manual_seed(0)
    options = dict(img_size=32, reg_tokens=4, class_token=False, global_pool="avg", dynamic_img_size=True)
    options.update(init_values=0.1, num_classes=3, depth=4)
    options.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **options).eval()


def _images(size: int = 32, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise(model: nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Non-zero adapter weights and scales, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in adapter_wrappers(model).values():
            for _, param in wrapper.named_parameters():
                if param.requires_grad:
                    param.copy_(std * torch.randn(param.shape, generator=generator) + (param == 1).float())


def _bottleneck(c_in: int, c_out: int, width: int) -> int:
    return c_in * width + width + width * c_out + c_out


# --------------------------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("spec", CONV_SPECS, ids=lambda s: f"{s['placement']}-{s['kind']}")
@pytest.mark.parametrize("model_name", CNNS)
def test_conv_adapter_starts_as_identity(model_name, spec):
    reference, model = _cnn(model_name), _cnn(model_name)
    ConvAdapter(**spec).setup(model)
    assert adapter_wrappers(model)
    for size in (32, 33):  # odd sizes: strided adapters must land on the block's resolution
        with torch.no_grad():
            assert torch.equal(model(_images(size)), reference(_images(size)))


@pytest.mark.parametrize("model_name", CNNS)
def test_shared_adapter_starts_as_identity_on_cnns(model_name):
    reference, model = _cnn(model_name), _cnn(model_name)
    SharedAdapter(kind="depthwise").setup(model)
    with torch.no_grad():
        assert torch.equal(model(_images()), reference(_images()))


@pytest.mark.parametrize("spec", VIT_SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_vit_adapters_start_as_identity(spec):
    reference, model = _vit(), _vit()
    build_strategy(spec).setup(model)
    for size in (32, 48):  # dynamic image size: more tokens
        with torch.no_grad():
            assert torch.equal(model(_images(size)), reference(_images(size)))


@pytest.mark.parametrize("name", ["conv_adapter", "vit_adapter", "shared_adapter"])
def test_up_projections_get_gradients_at_init(name):
    if name == "conv_adapter":  # timm zero-initialises each block's last BN scale, which would cut the gradient
        model = timm.create_model("resnet18", pretrained=False, num_classes=3, zero_init_last=False)
    else:
        model = _vit()
    build_strategy(name).setup(model)
    F.cross_entropy(model.train()(_images()), torch.tensor([0, 1])).backward()
    ups = [w.adapter.up.weight for w in adapter_wrappers(model).values()]
    assert ups and all(up.grad is not None and up.grad.abs().sum() > 0 for up in ups)


# --------------------------------------------------------------------------------------------- reference formulas
def _conv_bottleneck_reference(adapter, x, stride=1, padding=0, groups_conv=None):
    """``up(relu(down(depthwise(x))))`` with F.conv2d on the adapter's own tensors."""
    if groups_conv is not None:
        x = F.conv2d(x, adapter.depthwise.weight, None, stride, padding, groups=groups_conv)
        stride = 1
    hidden = F.relu(F.conv2d(x, adapter.down.weight, adapter.down.bias, stride))
    return F.conv2d(hidden, adapter.up.weight, adapter.up.bias)


def test_parallel_block_matches_reference_on_a_downsampling_block():
    model = _cnn("resnet18")
    ConvAdapter(placement="parallel_block", kind="pointwise").setup(model)
    _randomise(model)
    wrapper = model.layer2[0]  # 64 -> 128 channels, stride 2
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        expected = wrapper.base(x) + wrapper.scale.view(1, -1, 1, 1) * _conv_bottleneck_reference(
            wrapper.adapter, x, stride=2
        )
        assert expected.shape == (2, 128, 8, 8)
        torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-6)


def test_parallel_conv_matches_reference_beside_a_depthwise_conv():
    model = _cnn("convnext_atto")
    ConvAdapter(placement="parallel_conv", kind="depthwise", scale="scalar").setup(model)
    _randomise(model)
    block = model.stages[1].blocks[0]
    wrapper = block.conv_dw  # 7x7 depthwise conv on 80 channels
    conv = wrapper.base
    assert conv.kernel_size == (7, 7) and conv.groups == conv.in_channels == 80
    x = torch.randn(2, 80, 8, 8)
    with torch.no_grad():
        branch = _conv_bottleneck_reference(wrapper.adapter, x, padding=3, groups_conv=80)
        expected = F.conv2d(x, conv.weight, conv.bias, 1, 3, groups=80) + wrapper.scale * branch
        torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-6)
        # and the whole block, recomputed from its sub-modules with the adapted conv
        shortcut = x
        assert block.use_conv_mlp  # convnext_atto keeps NCHW through its 1x1-conv MLP
        y = block.mlp(block.norm(branch * wrapper.scale + F.conv2d(x, conv.weight, conv.bias, 1, 3, groups=80)))
        y = y.mul(block.gamma.reshape(1, -1, 1, 1)) if block.gamma is not None else y
        torch.testing.assert_close(block(x), y + shortcut, rtol=1e-5, atol=1e-6)


def test_sequential_matches_reference_on_efficientnet_block():
    model = _cnn("efficientnet_b0")
    ConvAdapter(placement="sequential", kind="pointwise").setup(model)
    _randomise(model)
    wrapper = model.blocks[1][0]  # InvertedResidual 16 -> 24, stride 2
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        y = wrapper.base(x)
        expected = y + wrapper.scale.view(1, -1, 1, 1) * _conv_bottleneck_reference(wrapper.adapter, y)
        torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-6)


def _linear_reference(adapter, h, act):
    return F.linear(act(F.linear(h, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias)


def test_houlsby_matches_reference_with_layer_scale():
    model = _vit()
    ViTAdapter(style="houlsby", width=16).setup(model)
    _randomise(model)
    block = model.blocks[1]
    with torch.no_grad():
        block.ls1.gamma.normal_()
        block.ls2.gamma.normal_()
    x = torch.randn(2, 8, 192)
    attn, mlp = block.attn.base, block.mlp.base
    with torch.no_grad():
        h = attn(block.norm1(x))
        h = h + _linear_reference(block.attn.adapter, h, F.gelu)  # adapter before LayerScale and the residual
        x1 = x + block.ls1.gamma * h
        m = mlp(block.norm2(x1))
        m = m + _linear_reference(block.mlp.adapter, m, F.gelu)
        expected = x1 + block.ls2.gamma * m
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_adaptformer_matches_reference():
    model = _vit()
    ViTAdapter(style="adaptformer", width=16).setup(model)
    _randomise(model)
    block = model.blocks[2]
    assert block.mlp.scale == 0.1 and isinstance(block.attn, nn.Module) and not adapter_wrappers(block.attn)
    x = torch.randn(2, 8, 192)
    with torch.no_grad():
        x1 = x + block.ls1.gamma * block.attn(block.norm1(x))
        z = block.norm2(x1)
        expected = x1 + block.ls2.gamma * (block.mlp.base(z) + 0.1 * _linear_reference(block.mlp.adapter, z, F.relu))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- weight sharing
def test_shared_vit_adapter_is_one_tensor_and_sums_gradients():
    model = _vit()
    SharedAdapter(width=8, train_head=False).setup(model)
    _randomise(model)
    wrappers = list(adapter_wrappers(model).values())
    assert len(wrappers) == 2 * len(model.blocks)
    assert len({w.adapter.down.weight.data_ptr() for w in wrappers}) == 1
    assert len({w.scale.data_ptr() for w in wrappers}) == len(wrappers)
    # an unshared copy with the same values: the shared gradient is the sum of the per-position gradients
    unshared = copy.deepcopy(model)
    for wrapper in adapter_wrappers(unshared).values():
        wrapper.adapter = copy.deepcopy(wrapper.adapter)
    images, targets = _images(), torch.tensor([0, 2])
    for net in (model, unshared):
        F.cross_entropy(net(images), targets).backward()
    shared_grad = wrappers[0].adapter.down.weight.grad
    per_position = [w.adapter.down.weight.grad for w in adapter_wrappers(unshared).values()]
    assert all(g.abs().sum() > 0 for g in per_position)
    torch.testing.assert_close(shared_grad, torch.stack(per_position).sum(0), rtol=1e-4, atol=1e-6)


def test_shared_cnn_adapter_is_one_per_width():
    model = _cnn("resnet18")
    SharedAdapter(reduction=16).setup(model)
    blocks = list(conv_blocks(model))
    assert blocks == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert model.layer1[0].adapter is model.layer1[1].adapter
    assert model.layer1[0].adapter is not model.layer2[0].adapter
    assert model.layer4[0].adapter.up.weight.data_ptr() == model.layer4[1].adapter.up.weight.data_ptr()
    widths = [64, 128, 256, 512]
    expected = sum(_bottleneck(c, c, c // 16) for c in widths) + len(blocks) + (512 * 3 + 3)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    # the shared tensors are listed under the first block that uses them
    assert "layer1.0.adapter.down.weight" in trainable_names(model)
    assert "layer1.1.adapter.down.weight" not in trainable_names(model)


# --------------------------------------------------------------------------------------------- closed-form sizes
def test_closed_form_sizes_on_larger_models():
    vit = _vit(depth=12)
    ViTAdapter(train_head=False).setup(vit)  # reduction 8: 192 -> 24
    assert sum(p.numel() for p in vit.parameters() if p.requires_grad) == 12 * 2 * _bottleneck(192, 192, 24)

    resnet = _cnn("resnet18")
    ConvAdapter(placement="parallel_conv", kind="depthwise", train_head=False).setup(resnet)
    # every BasicBlock has two 3x3 convs: (in, out) per stage, the first block of stages 2-4 downsamples
    convs = [(64, 64)] * 4 + [(64, 128), (128, 128), (128, 128), (128, 128)]
    convs += [(128, 256), (256, 256), (256, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    expected = sum(i * 9 + _bottleneck(i, o, i // 4) + o for i, o in convs)
    assert sum(p.numel() for p in resnet.parameters() if p.requires_grad) == expected


def test_blocks_and_positions_select_where_adapters_go():
    model = _vit()
    ViTAdapter(positions=["attn"], blocks=[0, -1], width=4).setup(model)
    assert sorted(adapter_wrappers(model)) == ["blocks.0.attn", "blocks.3.attn"]


def test_remove_adapters_restores_the_original_model():
    reference, model = _cnn("convnext_atto"), _cnn("convnext_atto")
    keys = list(model.state_dict())
    ConvAdapter(placement="parallel_block").setup(model)
    _randomise(model)
    remove_adapters(model)
    assert list(model.state_dict()) == keys and not adapter_wrappers(model)
    with torch.no_grad():
        assert torch.equal(model(_images()), reference(_images()))


# --------------------------------------------------------------------------------------------- errors
def test_wrong_family_names_the_supported_ones():
    with pytest.raises(StrategyError, match="supports CNNs.*use vit_adapter"):
        ConvAdapter().setup(make_backbone("test_vit"))
    with pytest.raises(StrategyError, match="supports ViT-family.*use conv_adapter"):
        ViTAdapter().setup(make_backbone("test_resnet"))


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("conv_adapter", {"reduction": 0}, "reduction must be a positive integer"),
        ("conv_adapter", {"reduction": 2.5}, "reduction must be a positive integer"),
        ("vit_adapter", {"reduction": True}, "reduction must be a positive integer"),
        ("shared_adapter", {"width": -1}, "width must be a positive integer"),
        ("conv_adapter", {"placement": "inside"}, "placement must be one of"),
        ("conv_adapter", {"kind": "full"}, "kind must be one of"),
        ("conv_adapter", {"kernel_size": 4}, "kernel_size must be odd"),
        ("conv_adapter", {"scale_init": 0}, "scale_init must not be 0"),
        ("conv_adapter", {"act": "nope"}, "Unknown activation 'nope'"),
        ("vit_adapter", {"style": "pfeiffer"}, "style must be one of"),
        ("vit_adapter", {"positions": ["ffn"]}, "positions must be a non-empty subset"),
        ("vit_adapter", {"scale": 0.0}, "scale must not be 0"),
        ("vit_adapter", {"blocks": []}, "blocks must be a non-empty list"),
        ("shared_adapter", {"kind": "full"}, "kind must be one of"),
    ],
)
def test_invalid_arguments(name, kwargs, match):
    with pytest.raises(StrategyError, match=match):
        build_strategy({"name": name, **kwargs})


def test_setup_errors():
    with pytest.raises(StrategyError, match="out of range"):
        ViTAdapter(blocks=[6]).setup(make_backbone("test_vit"))
    with pytest.raises(StrategyError, match="train_head=True needs a classifier head"):
        ConvAdapter().setup(make_backbone("test_resnet", num_classes=0))
