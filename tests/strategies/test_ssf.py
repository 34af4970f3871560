"""SSF specifics the shared matrix cannot see: the affine map per layout, placement, exact folding on timm models."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from strategy_testkit import IMAGE_SIZE, make_backbone, trainable_names
from timm.layers import LayerNorm2d
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies import build_strategy
from cvft.strategies.ssf import SSF, SSFLayer, find_ssf_targets, fold_ssf, ssf_candidates, ssf_layers


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Scales around 1 and shifts around 0, as training would leave them; BatchNorm statistics away from (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ssf_layers(model).values():
            layer.ssf_scale.copy_(1 + 0.3 * torch.randn(layer.ssf_scale.shape, generator=generator))
            layer.ssf_shift.copy_(0.3 * torch.randn(layer.ssf_shift.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))


# --------------------------------------------------------------------------- the affine map, by hand
def _by_channel_loop(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    """Reference: channel ``c`` of ``y`` along ``dim`` becomes ``scale[c] * y_c + shift[c]``, one channel at a time."""
    pieces = [scale[c] * y.select(dim, c) + shift[c] for c in range(y.shape[dim])]
    return torch.stack(pieces, dim=dim % y.ndim)


LAYOUTS = [
    pytest.param(nn.Linear(6, 5), torch.randn(2, 7, 6), -1, id="linear-tokens"),
    pytest.param(nn.Linear(6, 5), torch.randn(2, 3, 4, 6), -1, id="linear-nhwc"),
    pytest.param(nn.LayerNorm(6), torch.randn(2, 7, 6), -1, id="layernorm-tokens"),
    pytest.param(nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 6, 6), 1, id="conv-nchw"),
    pytest.param(nn.BatchNorm2d(5), torch.randn(2, 5, 4, 4), 1, id="batchnorm-nchw"),
    pytest.param(LayerNorm2d(5), torch.randn(2, 5, 4, 4), 1, id="layernorm2d-nchw"),
    pytest.param(nn.GroupNorm(1, 5), torch.randn(2, 5, 4, 4), 1, id="groupnorm-nchw"),
]


@pytest.mark.parametrize(("base", "x", "dim"), LAYOUTS)
def test_ssf_matches_reference_and_folds(base, x, dim):
    torch.manual_seed(0)
    layer = SSFLayer(base).eval()
    assert layer.channel_dim == dim
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # identity at init
        layer.ssf_scale.normal_(1.0, 0.5)
        layer.ssf_shift.normal_(0.0, 0.5)
        expected = _by_channel_loop(base(x), layer.ssf_scale, layer.ssf_shift, dim)
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
        folded = layer.folded()
        assert folded is base
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_creates_missing_bias():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    layer = SSFLayer(conv)
    with torch.no_grad():
        layer.ssf_shift.fill_(0.5)
    x = torch.randn(1, 3, 5, 5)
    expected = F.conv2d(x, conv.weight) + 0.5
    folded = layer.folded()
    assert folded.bias is not None and not folded.bias.requires_grad
    torch.testing.assert_close(folded(x), expected)


def test_paper_initialisation_is_optional():
    layer = SSFLayer(nn.Linear(4, 64), init_std=0.02)
    assert not torch.equal(layer.ssf_scale, torch.ones(64))
    assert abs(layer.ssf_scale.mean().item() - 1) < 0.02 and layer.ssf_shift.abs().max() < 0.2
    assert torch.equal(SSFLayer(nn.Linear(4, 64)).ssf_scale, torch.ones(64))


# --------------------------------------------------------------------------- placement on timm models
def test_default_placement_on_vit_follows_the_paper():
    model = make_backbone("test_vit")
    names = find_ssf_targets(model)
    assert names[:7] == [
        "patch_embed.proj",
        "blocks.0.norm1",
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.norm2",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    assert names[-1] == "norm" and "head" not in names and len(names) == 2 + 6 * 6


def test_timm_norm_act_and_standardised_convs_are_not_candidates():
    model = timm.create_model("efficientnet_b0", num_classes=3)
    candidates = ssf_candidates(model)
    assert "bn1" not in candidates and "conv_stem" in candidates  # BatchNormAct2d: an activation follows the affine
    assert "classifier" not in candidates
    bit = timm.create_model("resnetv2_50x1_bit", num_classes=3)
    assert "stem.conv" not in ssf_candidates(bit)  # StdConv2d standardises its weight: a scale would not fold


FOLD_MODELS = [
    pytest.param("test_vit", {"img_size": IMAGE_SIZE}, id="test_vit"),
    pytest.param("test_resnet", {}, id="test_resnet"),
    pytest.param("resnet18", {}, id="resnet18"),
    pytest.param("convnext_atto", {}, id="convnext_atto"),  # LayerNorm2d, conv MLP (NCHW)
    pytest.param("test_convnext", {}, id="test_convnext"),  # LayerNorm and Linear MLP on NHWC
]


@pytest.mark.parametrize(("name", "kwargs"), FOLD_MODELS)
def test_fold_is_exact_and_restores_plain_modules(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    keys = set(model.state_dict())
    SSF().setup(model)
    _randomise(model)
    model.eval()
    with torch.no_grad():
        before = model(_images())
        fold_ssf(model)
        after = model(_images())
    assert not ssf_layers(model)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    extra = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert all(key.endswith(".bias") for key in extra)  # only biases of bias-free convs
    plain = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) == extra


def test_convnext_channel_axes():
    model = timm.create_model("convnext_atto", num_classes=3)
    SSF().setup(model)
    layers = ssf_layers(model)
    assert layers["stem.1"].channel_dim == 1  # LayerNorm2d on NCHW
    assert layers["stages.0.blocks.0.mlp.fc1"].channel_dim == 1  # 1x1 conv MLP
    nhwc = timm.create_model("test_convnext", num_classes=3)
    SSF().setup(nhwc)
    assert ssf_layers(nhwc)["stages.0.blocks.0.norm"].channel_dim == -1
    assert ssf_layers(nhwc)["stages.0.blocks.0.mlp.fc1"].channel_dim == -1


def test_trainable_set_and_frozen_batchnorm():
    model = make_backbone("test_resnet")
    SSF(targets="norms", train_head=False).setup(model)
    layers = ssf_layers(model)
    assert layers and all(isinstance(layer.base, nn.BatchNorm2d) for layer in layers.values())
    assert trainable_names(model) == {f"{n}.{p}" for n in layers for p in ("ssf_scale", "ssf_shift")}
    model.train()
    stats = model.bn1.base.running_mean.clone()
    model(_images())
    assert torch.equal(model.bn1.base.running_mean, stats)


def test_errors_are_clear():
    with pytest.raises(StrategyError, match="matches no layer.*Candidates: .*patch_embed.proj"):
        SSF(targets="nonexistent").setup(make_backbone("test_vit"))
    with pytest.raises(StrategyError, match="targets` is empty"):
        build_strategy({"name": "ssf", "targets": []})
    with pytest.raises(StrategyError, match="init_std"):
        build_strategy({"name": "ssf", "init_std": -1})
    with pytest.raises(StrategyError, match="cannot follow a ReLU"):
        SSFLayer(nn.ReLU())
    with pytest.raises(StrategyError, match="train_head=True"):
        SSF().setup(timm.create_model("test_resnet", num_classes=0))
