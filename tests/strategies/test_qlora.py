"""QLoRA: NF4 base weights (torchao) under LoRA, on CPU."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from cvft.adapter_files import load_adapter, save_adapter
from cvft.errors import StrategyError
from cvft.strategies import apply_strategies, export_plain_model, merge_lora, unmerge_lora

pytest.importorskip("torchao")
from cvft.strategies.qlora import NF4Conv2d, NF4Linear, nf4_nbytes  # noqa: E402
from cvft.strategies.qlora.nf4 import require_torchao  # noqa: E402

NF4Tensor = require_torchao()[0]


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=3, img_size=32).eval()


def _randomise_updates(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)


def test_base_weights_take_at_most_30_percent_of_fp32_bytes():
    model = _vit()
    apply_strategies(model, ["qlora"])
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert layers, "qlora quantised nothing"
    quantized = sum(nf4_nbytes(m.weight) for m in layers)
    dense = sum(m.weight.numel() * 4 for m in layers)
    assert quantized / dense <= 0.30


def test_model_equals_its_quantized_base_before_training_and_only_lora_and_head_train():
    model = _vit()
    apply_strategies(model, [{"name": "qlora", "rank": 4}])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    assert all(not p.requires_grad for m in model.modules() if isinstance(m, NF4Linear) for p in m.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model(x)
        export_plain_model(model)  # B == 0: a dense model holding exactly the dequantised base weights
        torch.testing.assert_close(adapted, model(x), atol=1e-5, rtol=0)


def test_merge_equals_unmerged_and_unmerge_restores_the_nf4_base():
    model = _vit()
    apply_strategies(model, [{"name": "qlora", "rank": 4, "qkv_parts": ["q", "v"]}])
    _randomise_updates(model)
    qkv = model.blocks[0].attn.qkv
    codes = qkv.base.weight.quantized_data.clone()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        assert not isinstance(qkv.base, NF4Linear)
        assert (model(x) - unmerged).abs().max() < 1e-5
        unmerge_lora(model)
        assert isinstance(qkv.base, NF4Linear) and torch.equal(qkv.base.weight.quantized_data, codes)
        assert torch.equal(model(x), unmerged)


def test_export_gives_a_plain_timm_model_with_the_same_outputs():
    model = _vit()
    apply_strategies(model, ["qlora"])
    _randomise_updates(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    plain = timm.create_model("test_vit", num_classes=3, img_size=32).eval()
    plain.load_state_dict(export_plain_model(model).state_dict(), strict=True)
    with torch.no_grad():
        assert (plain(x) - expected).abs().max() < 1e-5


def test_training_lowers_the_loss_and_adapters_round_trip(tmp_path):
    model = _vit().train()
    apply_strategies(model, [{"name": "qlora", "rank": 4, "alpha": 8}])
    torch.manual_seed(2)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]

    model.eval()
    path = save_adapter(model, tmp_path / "qlora.safetensors", "test_vit", [{"name": "qlora", "rank": 4, "alpha": 8}])
    fresh = _vit()
    apply_strategies(fresh, [{"name": "qlora", "rank": 4, "alpha": 8}])
    load_adapter(fresh, path, backbone="test_vit")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------- NF4 convolutions
NF4_CODES = torch.tensor(
    [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407,
     0.5626, 0.7230, 1.0]
)  # fmt: skip
#: Half the widest gap between neighbouring NF4 codes: the worst rounding error of a value in units of its absmax.
HALF_MAX_GAP = float((NF4_CODES[1:] - NF4_CODES[:-1]).max()) / 2


def _dense(param: torch.Tensor) -> torch.Tensor:
    """NF4 weights through their dequantised values (copying an NF4 tensor re-quantises it)."""
    param = param.detach()
    return param.get_original_weight() if isinstance(param, NF4Tensor) else param


def _cnn(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=3).eval()


def _check_within_nf4_error_bound(conv: torch.nn.Conv2d, quantized: NF4Conv2d, block_size: int = 64) -> None:
    """|w - deq(w)| <= absmax * half_gap + |absmax - stored scale| per block (the scales are double-quantised)."""
    weight = conv.weight.detach().flatten()
    weight = F.pad(weight, (0, (-weight.numel()) % block_size)).reshape(-1, block_size)
    absmax = weight.abs().amax(dim=1, keepdim=True)
    nf4 = quantized.weight
    stored = nf4.dequantize_scalers(nf4.quantized_scalers, nf4.quantization_factor, nf4.scaler_block_size)
    bound = absmax * HALF_MAX_GAP + (absmax - stored.unsqueeze(1)).abs() + 1e-6
    dense = quantized.dense_weight()
    assert dense.shape == conv.weight.shape
    error = F.pad((dense - conv.weight).detach().flatten(), (0, (-dense.numel()) % block_size)).reshape(-1, block_size)
    assert (error.abs() <= bound).all()
    assert error.abs().max() > 0  # it really is quantised


def test_conv_weights_take_at_most_30_percent_of_fp32_bytes_and_dequantise_within_the_nf4_bound():
    model = _cnn("test_resnet")
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    apply_strategies(model, [{"name": "qlora", "rank": 2, "targets": "resnet_blocks"}])
    layers = {n.removesuffix(".base"): m for n, m in model.named_modules() if isinstance(m, NF4Conv2d)}
    assert len(layers) == 9
    quantized = sum(nf4_nbytes(m.weight) for m in layers.values())
    dense = sum(originals[n].weight.numel() * 4 for n in layers)
    assert quantized / dense <= 0.30
    for name, layer in layers.items():
        _check_within_nf4_error_bound(originals[name], layer)


def test_a_conv_whose_size_is_not_a_multiple_of_the_block_is_zero_padded_and_cut_back():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=True)  # 135 values: 2 blocks + 7
    quantized = NF4Conv2d(conv)
    assert quantized.padded == 3 * 64 - 135
    _check_within_nf4_error_bound(conv, quantized)
    x = torch.randn(2, 3, 6, 6)
    expected = F.conv2d(x, quantized.dense_weight(), conv.bias, padding=1)
    torch.testing.assert_close(quantized(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(quantized.dequantize()(x), expected, rtol=0, atol=0)


def test_depthwise_convs_stay_dense_unless_asked():
    model = _cnn("test_convnext")
    apply_strategies(model, [{"name": "qlora", "rank": 2, "targets": "all_conv"}])
    depthwise = model.stages[0].blocks[0].conv_dw
    assert type(depthwise.base) is torch.nn.Conv2d and isinstance(model.stem[0].base, NF4Conv2d)
    model = _cnn("test_convnext")
    apply_strategies(model, [{"name": "qlora", "rank": 2, "targets": "all_conv", "quantize_depthwise": True}])
    assert isinstance(model.stages[0].blocks[0].conv_dw.base, NF4Conv2d)


@pytest.mark.parametrize(
    ("name", "targets"), [("test_resnet", "resnet_blocks"), ("test_convnext", "all_conv"), ("test_efficientnet", None)]
)
def test_qlora_on_cnns_trains_only_lora_and_head_merges_exactly_and_round_trips(name, targets, tmp_path):
    spec = {"name": "qlora", "rank": 2, "alpha": 4, "quantize_depthwise": True}
    if targets:
        spec["targets"] = targets
    model = _cnn(name)
    apply_strategies(model, [spec])
    head = {f"{n}" for n, _ in model.get_classifier().named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    classifier = model.default_cfg["classifier"]
    assert trainable == {n for n in trainable if ".lora_" in n} | {f"{classifier}.{h}" for h in head}
    assert any(isinstance(m, NF4Conv2d) for m in model.modules())
    frozen = {n: _dense(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
    codes = {n: m.weight.quantized_data.clone() for n, m in model.named_modules() if isinstance(m, NF4Conv2d)}

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(_dense(p), frozen[n]), f"frozen {n} moved"
    assert all(torch.equal(m.weight.quantized_data, codes[n]) for n, m in model.named_modules() if n in codes)

    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        assert not any(isinstance(m, NF4Conv2d) for m in model.modules())
        torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)
        unmerge_lora(model)
        assert torch.equal(model(x), unmerged)

    path = save_adapter(model, tmp_path / "a.safetensors", name, [spec])
    fresh = _cnn(name)
    apply_strategies(fresh, [spec])
    load_adapter(fresh, path, backbone=name)
    with torch.no_grad():
        assert torch.equal(fresh(x), unmerged)


def test_quantize_layers_refuses_a_layer_that_is_neither_linear_nor_conv():
    from cvft.strategies.qlora import quantize_layers

    model = _cnn("test_resnet")
    with pytest.raises(StrategyError, match="'bn1' is a BatchNorm2d"):
        quantize_layers(model, ["bn1"])


def test_an_odd_block_size_is_refused():
    with pytest.raises(StrategyError, match="even"):
        apply_strategies(_cnn("test_resnet"), [{"name": "qlora", "block_size": 63}])


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_deepcopy_keeps_the_nf4_codes_exactly(name):
    """EMA / SWA copy the model: the NF4 bases (small layers included, whose scale blocks shrink) copy bit for bit."""
    import copy

    pytest.importorskip("torchao")
    model = timm.create_model(name, num_classes=3).eval()
    apply_strategies(model, [{"name": "qlora", "rank": 2}])
    clone = copy.deepcopy(model).eval()
    images = torch.randn(2, 3, 32, 32) if name == "test_resnet" else torch.randn(2, 3, 160, 160)
    quantised = [(n, m) for n, m in model.named_modules() if type(m).__name__.startswith("NF4")]
    assert quantised
    for layer_name, layer in quantised:
        copied = clone.get_submodule(layer_name)
        assert copied.weight is not layer.weight
        assert torch.equal(copied.weight.quantized_data, layer.weight.quantized_data)
        assert torch.equal(copied.weight.get_original_weight(), layer.weight.get_original_weight())
    with torch.no_grad():
        assert torch.equal(clone(images), model(images))
