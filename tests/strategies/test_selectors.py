"""Named target selectors (``pointwise``, ``attention``, ``auto`` ...) on timm CNNs and ViTs, built on the meta device.

Expected sets are written from the architectures (layer types, kernel sizes, groups), not from cvft's code.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies.lora import find_targets
from cvft.strategies.lora.targets import candidate_modules
from cvft.strategies.selectors import resolve_auto, select_layers


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def _convs(model: nn.Module, kernel: int | None = None, depthwise: bool | None = None) -> set[str]:
    found = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if kernel is not None and m.kernel_size != (kernel, kernel):
            continue
        if depthwise is not None and (m.groups == m.in_channels and m.groups > 1) != depthwise:
            continue
        found.add(name)
    return found


def test_pointwise_on_efficientnet_lite0_is_every_conv_pw_and_conv_pwl():
    model = _meta("tf_efficientnet_lite0")
    chosen = find_targets(model, "pointwise")
    assert len(chosen) == 31
    # 1 depthwise-separable block (conv_pw only) + 15 inverted residuals (conv_pw and conv_pwl)
    assert sum(n.endswith(".conv_pw") for n in chosen) == 16
    assert sum(n.endswith(".conv_pwl") for n in chosen) == 15
    assert "conv_head" not in chosen and "conv_stem" not in chosen  # 1x1 but not in a block / a stem
    assert not set(chosen) & _convs(model, depthwise=True)
    assert find_targets(model, "auto") == chosen


def test_pointwise_on_mobilenetv3_leaves_out_depthwise_and_squeeze_excitation():
    model = _meta("mobilenetv3_small_100")
    chosen = set(find_targets(model, "pointwise"))
    assert chosen == {
        name for name in _convs(model, kernel=1, depthwise=False) if name.startswith("blocks.") and ".se." not in name
    }
    assert all(model.get_submodule(n).groups == 1 for n in chosen)
    assert set(find_targets(model, "auto")) == chosen


def test_attention_on_vit_and_swin_is_qkv_and_proj_of_every_block():
    vit = timm.create_model("test_vit")
    expected = [f"blocks.{i}.attn.{p}" for i in range(len(vit.blocks)) for p in ("qkv", "proj")]
    assert find_targets(vit, "attention") == expected
    assert find_targets(vit, "auto") == expected
    assert find_targets(vit, "mlp") == [f"blocks.{i}.mlp.{p}" for i in range(len(vit.blocks)) for p in ("fc1", "fc2")]
    swin = _meta("swin_tiny_patch4_window7_224")
    attention = find_targets(swin, "auto")
    depths = [len(stage.blocks) for stage in swin.layers]
    expected = [
        f"layers.{s}.blocks.{b}.attn.{p}" for s, d in enumerate(depths) for b in range(d) for p in ("qkv", "proj")
    ]
    assert attention == expected  # patch merging (downsample.reduction) and the head are not attention


def test_auto_on_resnet_is_conv1_to_conv3_of_every_block_without_shortcuts():
    model = timm.create_model("test_resnet")
    expected = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and name.startswith("layer") and "downsample" not in name
    ]
    assert find_targets(model, "auto") == expected
    assert find_targets(model, "block_convs") == expected


def test_auto_on_convnext_is_depthwise_conv_and_mlp_of_every_block():
    model = timm.create_model("test_convnext")
    expected = [
        name
        for name, _ in model.named_modules()
        if ".blocks." in name and name.endswith(("conv_dw", "mlp.fc1", "mlp.fc2"))
    ]
    assert find_targets(model, "auto") == expected
    assert "head.fc" not in find_targets(model, "all_linear")  # the head is never a candidate


def test_all_linear_and_all_conv_exclude_the_head():
    model = timm.create_model("test_vit", num_classes=3)
    linear = find_targets(model, "all_linear")
    assert "head" not in linear and len(linear) == 4 * len(model.blocks)
    assert find_targets(model, "all_conv") == ["patch_embed.proj"]


def test_a_selector_matching_nothing_is_an_error_naming_the_selectors():
    with pytest.raises(StrategyError, match="pointwise"):
        find_targets(timm.create_model("test_vit"), "pointwise")


@pytest.mark.parametrize("name", ["regnetx_002", "eva02_tiny_patch14_224", "deit_tiny_patch16_224"])
def test_auto_finds_layers_on_other_families(name):
    model = _meta(name)
    kind, chosen = resolve_auto(model, candidate_modules(model))
    assert chosen
    if "patch" in name:
        assert kind == "attention" and all(n.rsplit(".", 1)[-1] in {"qkv", "proj"} for n in chosen)
    else:  # RegNet: grouped 3x3 and 1x1 convs of every block, shortcuts excluded
        assert kind == "block_convs+mlp" and not any("downsample" in n for n in chosen)
        assert set(select_layers(model, "pointwise", candidate_modules(model))) - set(chosen) == {
            n for n in _convs(model, kernel=1) if "downsample" in n
        }
