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
from cvft.strategies.qlora import NF4Linear, nf4_nbytes  # noqa: E402


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


def test_convolution_targets_are_refused_with_a_way_out():
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(StrategyError, match="use `lora` for convolutions"):
        apply_strategies(model, [{"name": "qlora", "targets": "resnet_blocks"}])
