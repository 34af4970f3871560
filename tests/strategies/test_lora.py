"""LoRA specifics the shared matrix cannot see: exact merging, unmerging, export and target selection.

The matrix (``test_matrix.py``) covers the trainable set, closed-form counts, frozen weights, BatchNorm statistics
and the falling loss of the ``lora`` rows.
"""

from __future__ import annotations

import pytest
import torch
from strategy_testkit import (
    IMAGE_SIZE,
    assert_loads_into_plain_timm,
    assert_merge_round_trip,
    head_names,
    make_backbone,
    trainable_names,
)
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies import apply_strategies, build_strategy
from cvft.strategies.lora import (
    LoRA,
    LoRAConv2d,
    LoRALinear,
    export_plain_model,
    find_targets,
    lora_layers,
    lora_parameter_names,
    merge_lora,
    unmerge_lora,
)

TARGETS = {"test_vit": "vit_all", "test_resnet": "resnet_blocks", "test_convnext": "convnext_blocks"}


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _backbone(name: str) -> nn.Module:
    return make_backbone(name) if name != "test_convnext" else make_backbone(name).eval()


def _randomise_updates(model: nn.Module, seed: int = 0) -> None:
    """Give every B a non-zero value, as training would, so that merging has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in lora_parameter_names(model):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def _lora_model(name: str, **kwargs) -> nn.Module:
    model = _backbone(name)
    LoRA(rank=3, alpha=6, targets=TARGETS[name], **kwargs).setup(model)
    return model.eval()


@pytest.mark.parametrize("model_name", list(TARGETS))
def test_output_unchanged_after_setup(model_name):
    reference = _backbone(model_name).eval()
    model = _lora_model(model_name)
    assert lora_layers(model), "nothing was adapted"
    with torch.no_grad():
        assert torch.equal(model(_images()), reference(_images()))


@pytest.mark.parametrize("model_name", list(TARGETS))
def test_merge_matches_unmerged_and_unmerge_restores_base(model_name):
    model = _lora_model(model_name, qkv_parts=["q", "v"])
    _randomise_updates(model)
    unmerged = assert_merge_round_trip(model, lora_layers, merge_lora, unmerge_lora, _images(), every_base_moves=False)
    with torch.no_grad():
        assert (model(_images()) - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("model_name", ["test_vit", "test_resnet", "test_convnext"])
def test_export_loads_strictly_into_plain_timm_model(model_name):
    model = _lora_model(model_name)
    _randomise_updates(model)
    with torch.no_grad():
        expected = model(_images())
    exported = export_plain_model(model)
    assert not lora_layers(exported)
    assert_loads_into_plain_timm(exported, model_name, expected, _images())


def test_qkv_split_leaves_k_untouched():
    model = _lora_model("test_vit", qkv_parts=["v", "q"])
    _randomise_updates(model)
    qkv = model.blocks[0].attn.qkv
    assert qkv.split == ("q", "v")
    dim = model.embed_dim
    delta = qkv.delta_weight()
    assert delta.shape == qkv.base.weight.shape
    assert torch.equal(delta[dim : 2 * dim], torch.zeros(dim, dim))
    assert delta[:dim].abs().sum() > 0 and delta[2 * dim :].abs().sum() > 0
    tokens = torch.randn(2, 5, dim)
    with torch.no_grad():
        out, base = qkv(tokens), qkv.base(tokens)
    assert torch.equal(out[..., dim : 2 * dim], base[..., dim : 2 * dim])
    assert not torch.equal(out[..., :dim], base[..., :dim])
    # the output projection is not split
    assert model.blocks[0].attn.proj.split is None


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(nn.Conv2d(6, 6, 3, padding=1, groups=6), id="depthwise"),
        pytest.param(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), id="grouped"),
        pytest.param(nn.Conv2d(4, 6, (3, 1), bias=False), id="plain"),
    ],
)
def test_conv_delta_folds_exactly(conv):
    torch.manual_seed(0)
    layer = LoRAConv2d(conv, rank=2, alpha=3).eval()
    kh, kw = conv.kernel_size
    assert sum(p.numel() for _, p in layer.lora_parameters()) == 2 * (conv.in_channels * kh * kw + conv.out_channels)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, conv.in_channels, 9, 9)
    with torch.no_grad():
        unmerged = layer(x)
        weight = conv.weight + layer.scaling * layer.delta_weight()
        direct = nn.functional.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        layer.merge()
        merged = layer(x)
    assert (unmerged - direct).abs().max() < 1e-5
    assert (merged - unmerged).abs().max() < 1e-5


def test_linear_wrapper_scaling_and_counts():
    base = nn.Linear(5, 12)
    assert LoRALinear(base, rank=4, alpha=8).scaling == 2.0
    layer = LoRALinear(nn.Linear(5, 12), rank=4, alpha=8, use_rslora=True)
    assert layer.scaling == 4.0
    assert sum(p.numel() for _, p in layer.lora_parameters()) == 4 * (5 + 12)
    split = LoRALinear(nn.Linear(5, 12), rank=4, alpha=8, split=("k",))
    assert sum(p.numel() for _, p in split.lora_parameters()) == 4 * (5 + 4)
    assert not any(p.requires_grad for p in split.base.parameters())
    with pytest.raises(StrategyError, match="split"):
        LoRALinear(nn.Linear(5, 10), rank=2, alpha=2, split=("q",))


def test_no_match_lists_candidates():
    model = make_backbone("test_vit")
    with pytest.raises(StrategyError, match=r"'attn\.query'.*Candidates: .*blocks\.0\.attn\.qkv \(Linear\)"):
        LoRA(targets=["attn.query"]).setup(model)
    with pytest.raises(StrategyError, match="matches no"):
        find_targets(model, "head")  # the classifier head is never a target
    with pytest.raises(StrategyError, match="matches no"):
        find_targets(make_backbone("test_resnet"), "vit_attention")


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "shared_lora"])
def test_a_target_that_matches_nothing_is_refused_in_the_methods_own_name(method):
    with pytest.raises(StrategyError, match=rf"^{method}: target 'attn\.query' matches no"):
        build_strategy({"name": method, "targets": ["attn.query"]}).setup(make_backbone("test_vit"))


def test_target_kinds():
    vit = make_backbone("test_vit")
    assert find_targets(vit, "auto") == find_targets(vit, "vit_attention")
    assert len(find_targets(vit, "vit_attention")) == 2 * len(vit.blocks)
    assert len(find_targets(vit, "vit_all")) == 4 * len(vit.blocks)
    linears = find_targets(vit, "Linear")
    assert "head" not in linears and len(linears) == 4 * len(vit.blocks)
    assert find_targets(vit, ["blocks.1.mlp.fc2", r"blocks\.0\.attn\..*"]) == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.1.mlp.fc2",
    ]
    resnet = make_backbone("test_resnet")
    assert find_targets(resnet, "auto") == find_targets(resnet, "resnet_blocks")
    assert all(".conv" in name and "downsample" not in name for name in find_targets(resnet, "auto"))
    convnext = make_backbone("test_convnext")
    assert find_targets(convnext, "auto") == find_targets(convnext, "convnext_blocks")


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"qkv_parts": ["q", "x"]}, {"qkv_parts": []}, {"targets": []}],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(StrategyError, match="lora"):
        build_strategy({"name": "lora", **kwargs})


def test_train_bias_and_no_head():
    model = make_backbone("test_vit")
    LoRA(rank=2, targets="vit_mlp", train_bias=True, train_head=False).setup(model)
    expected = lora_parameter_names(model) | {f"blocks.{i}.mlp.fc{j}.base.bias" for i in range(6) for j in (1, 2)}
    assert trainable_names(model) == expected


def test_gradual_unfreeze_after_lora_only_unfreezes_lora_parameters():
    model = make_backbone("test_resnet")
    stack = apply_strategies(model, [{"name": "lora", "rank": 2}, {"name": "gradual_unfreeze", "milestones": [1, 2]}])
    allowed = lora_parameter_names(model) | head_names(model)
    assert trainable_names(model) == head_names(model)
    for epoch in range(4):
        newly = stack.on_epoch_start(model, epoch)
        assert set(newly) <= allowed
        assert trainable_names(model) <= allowed
    assert trainable_names(model) == allowed


def test_dropout_only_in_training():
    model = make_backbone("test_vit")
    LoRA(rank=2, dropout=0.5, targets="vit_attention").setup(model)
    _randomise_updates(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(_images()), model(_images()))


@pytest.mark.parametrize("groups", [1, 8])
def test_lora_on_timm_conv2d_same_merges_exactly(groups):
    """TF-style "same" padding (tf_efficientnet_*): the update pads like the base, so merging stays exact."""
    from timm.layers import Conv2dSame

    from cvft.strategies.lora.layer import LoRAConv2d

    torch.manual_seed(0)
    layer = LoRAConv2d(Conv2dSame(8, 16, 3, stride=2, groups=groups), rank=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 8, 15, 17)  # odd sizes: asymmetric dynamic padding
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert unmerged.shape == (2, 16, 8, 9)
    assert (merged - unmerged).abs().max() < 1e-5
