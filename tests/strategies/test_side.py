"""Side and top modules: placement on timm's final features, the original path untouched, references by hand."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies import build_strategy
from cvft.strategies.side import SideNetwork, SideTuning, TopBottleneck, TopTransformer

MODELS = [
    pytest.param("test_vit", {"img_size": 32}, id="test_vit"),
    pytest.param("test_resnet", {}, id="test_resnet"),
    pytest.param("resnet18", {}, id="resnet18"),
    pytest.param("convnext_atto", {}, id="convnext_atto"),
    pytest.param("vit_tiny_patch16_224", {"img_size": 32, "reg_tokens": 4}, id="vit_tiny_reg4"),
    pytest.param(
        "vit_tiny_patch16_224",
        {"img_size": 32, "dynamic_img_size": True, "class_token": False, "global_pool": "avg"},
        id="vit_tiny_dynamic_no_cls",
    ),
]
MODES = ["top", "side"]


def _pair(name: str, kwargs: dict) -> tuple[nn.Module, nn.Module]:
    """The same randomly initialised model twice: one stays original, the other gets the strategy."""
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    return original, copy.deepcopy(original)


def _images(n: int = 2, size: tuple[int, int] = (32, 32), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _train(model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    images, targets = _images(4, seed=2), torch.tensor([0, 1, 2, 0])
    for _ in range(steps):
        model.train()
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "kwargs"), MODELS)
def test_original_untouched_at_init_and_after_training(name, kwargs, mode):
    original, model = _pair(name, kwargs)
    SideTuning(mode=mode, side_width=8, side_stages=2).setup(model)
    x = _images()
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), original.forward_features(x))
        assert torch.equal(model(x), original(x))
    _train(model)
    side_names = {n for n, _ in model.named_parameters() if n.startswith("side_module.")}
    classifier = {id(p) for p in model.get_classifier().parameters()}
    head_names = {n for n, p in model.named_parameters() if id(p) in classifier}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == side_names | head_names
    for key, value in original.state_dict().items():
        if key not in head_names:  # the classifier trains; everything else of the original stays
            assert torch.equal(model.state_dict()[key], value), f"original {key} changed"
    with torch.no_grad():
        active = model.forward_features(x)
        model.side_module.enabled = False
        base_part = model.forward_features(x)
        model.side_module.enabled = True
    assert torch.equal(base_part, original.forward_features(x))  # the original path alone is bit-identical
    assert not torch.equal(active, base_part)  # and the added module now acts


def _last_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of the model's final feature module (``feature_info[-1]``), captured from the original model."""
    captured = []
    module = model.get_submodule(model.feature_info[-1]["module"])
    handle = module.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    return captured[0]


def test_vit_top_block_sits_before_the_final_norm():
    original, model = _pair("test_vit", {"img_size": 32})
    SideTuning(mode="top", depth=2).setup(model)
    _train(model)
    x = _images()
    with torch.no_grad():
        tokens = _last_features(original, x)
        for block in model.side_module.net:  # timm Blocks: x + ls1(attn(norm1(x))) + ls2(mlp(norm2(x)))
            tokens = tokens + block.ls1(block.attn(block.norm1(tokens)))
            tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
        expected = original.norm(tokens)
        torch.testing.assert_close(model.forward_features(x), expected)
        # the head is timm's own forward_head on those features
        torch.testing.assert_close(model(x), model.forward_head(expected))


def test_cnn_top_bottleneck_reference():
    original, model = _pair("resnet18", {})
    SideTuning(mode="top", reduction=8).setup(model)
    _train(model)
    x = _images()
    bottleneck = model.side_module.net[0]
    with torch.no_grad():
        f = _last_features(original, x)
        h = F.relu(bottleneck.bn1(F.conv2d(f, bottleneck.conv1.weight)))
        h = F.relu(bottleneck.bn2(F.conv2d(h, bottleneck.conv2.weight, padding=1)))
        expected = f + bottleneck.bn3(F.conv2d(h, bottleneck.conv3.weight))
        torch.testing.assert_close(model.forward_features(x), expected)
    assert bottleneck.conv1.out_channels == 512 // 8


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        pytest.param("resnet18", {}, (32, 32), id="resnet18"),
        pytest.param("vit_tiny_patch16_224", {"img_size": 32, "reg_tokens": 4}, (32, 32), id="vit_reg4"),
        pytest.param(
            "vit_tiny_patch16_224", {"img_size": 32, "dynamic_img_size": True}, (48, 32), id="vit_dynamic_48x32"
        ),
    ],
)
def test_side_network_blend_reference(name, kwargs, size):
    original, model = _pair(name, kwargs)
    SideTuning(mode="side", side_width=8, side_stages=2).setup(model)
    _train(model)
    side = model.side_module.net
    assert side.gate.item() != 0
    x = _images(size=size)
    with torch.no_grad():
        f = _last_features(original, x)
        s = side.body(x)
        if f.ndim == 4:
            mapped = F.conv2d(F.adaptive_avg_pool2d(s, f.shape[-2:]), side.proj.weight, side.proj.bias)
        else:
            grid = (size[0] // 16, size[1] // 16)
            patches = F.adaptive_avg_pool2d(s, grid).flatten(2).transpose(1, 2)
            prefix = s.mean(dim=(2, 3), keepdim=True).flatten(2).transpose(1, 2)
            prefix = prefix.expand(-1, original.num_prefix_tokens, -1)
            mapped = F.linear(torch.cat([prefix, patches], 1), side.proj.weight, side.proj.bias)
        expected = f + side.gate * mapped
        captured = []
        target = model.get_submodule(model.feature_info[-1]["module"])
        handle = target.register_forward_hook(lambda m, a, out: captured.append(out))
        model.forward_features(x)
        handle.remove()
    torch.testing.assert_close(captured[0], expected)


def test_side_mode_captures_the_image_for_forward_features_and_forward():
    original, model = _pair("test_resnet", {})
    SideTuning(mode="side").setup(model)
    _train(model, steps=2)
    x = _images()
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))
        with pytest.raises(StrategyError, match="needs the input image"):  # a batch of 3, not the last image's 2
            model.layer4(model.layer3(model.layer2(model.layer1(torch.randn(3, 32, 16, 16)))))
    _, fresh = _pair("test_resnet", {})
    SideTuning(mode="side").setup(fresh)
    with pytest.raises(StrategyError, match="none was captured"):
        fresh.layer4(torch.randn(2, 192, 4, 4))


def test_side_mode_survives_activation_checkpointing():
    original, model = _pair("test_vit", {"img_size": 32})
    SideTuning(mode="side").setup(model)
    model.set_grad_checkpointing(True)
    _train(model, steps=2)  # backward re-runs the blocks, and the hook, from the checkpoint
    assert model.side_module.net.gate.item() != 0


def test_deepcopy_keeps_hooks_on_the_copy():
    _, model = _pair("test_vit", {"img_size": 32})
    SideTuning(mode="side").setup(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        model.side_module.net.gate.fill_(1.0)
        x = _images()
        assert not torch.equal(model(x), clone(x))
        clone.side_module.net.gate.fill_(1.0)
        assert torch.equal(model(x), clone(x))


def test_modules_start_as_identity():
    x = torch.randn(2, 6, 16)
    assert torch.equal(TopTransformer(16, 2, depth=3)(x), x)
    f = torch.randn(2, 16, 3, 3)
    assert torch.equal(TopBottleneck(16, depth=2).train()(f), f)  # also with batch statistics
    assert torch.equal(SideNetwork(3, 16, width=4, stages=1)(torch.randn(2, 3, 8, 8), f), f)


def test_errors_are_clear():
    with pytest.raises(StrategyError, match="mode must be"):
        build_strategy({"name": "side_module", "mode": "middle"})
    with pytest.raises(StrategyError, match="depth must be a positive integer"):
        build_strategy({"name": "side_module", "depth": 0})
    model = timm.create_model("test_resnet", num_classes=3)
    SideTuning().setup(model)
    with pytest.raises(StrategyError, match="apply it once"):
        SideTuning().setup(model)
    with pytest.raises(StrategyError, match="supports timm ViTs"):
        SideTuning(train_head=False).setup(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
