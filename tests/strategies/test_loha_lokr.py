"""LoHA and LoKr specifics the shared matrix cannot see: start at zero, exact merge/unmerge/export, the formulas.

The matrix (``test_matrix.py``) covers the trainable set, closed-form counts, frozen weights, BatchNorm statistics
and the falling loss of the ``loha`` and ``lokr`` rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from strategy_testkit import (
    IMAGE_SIZE,
    assert_loads_into_plain_timm,
    assert_merge_round_trip,
    make_backbone,
    trainable_names,
)
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies import build_strategy
from cvft.strategies.loha import LoHA, LoHALayer
from cvft.strategies.lokr import LoKr, LoKrLayer, factorize
from cvft.strategies.lowrank import (
    LowRankLayer,
    export_plain_model,
    low_rank_layers,
    low_rank_parameter_names,
    merge_low_rank,
    unmerge_low_rank,
)

TARGETS = {"test_vit": "vit_all", "test_resnet": "resnet_blocks", "test_convnext": "convnext_blocks"}
METHODS = {"loha": LoHA, "lokr": LoKr, "lokr-factor_c": lambda **kw: LoKr(factor_c=True, **kw)}
CASES = [pytest.param(method, model, id=f"{method}-{model}") for method in METHODS for model in TARGETS]


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _backbone(name: str) -> nn.Module:
    return make_backbone(name).eval()


def _adapted(method: str, model_name: str) -> nn.Module:
    model = _backbone(model_name)
    METHODS[method](rank=3, alpha=6, targets=TARGETS[model_name]).setup(model)
    return model.eval()


def _randomise(module: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every factor a non-zero value, as training would, so that merging has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, LowRankLayer):
                for _, param in layer.lora_parameters():
                    param.copy_(std * torch.randn(param.shape, generator=generator))


def _loha_formula(layer: LoHALayer) -> torch.Tensor:
    """Hadamard product of two rank-r products, written with einsum, reshaped to the base weight."""
    first = torch.einsum("or,ri->oi", layer.hada_w1_a, layer.hada_w1_b)
    second = torch.einsum("or,ri->oi", layer.hada_w2_a, layer.hada_w2_b)
    return (first * second).reshape(layer.base.weight.shape)


def _lokr_formula(layer: LoKrLayer) -> torch.Tensor:
    """``kron(C, B A)`` via torch.kron, reshaped to the base weight."""
    c = layer.lokr_w1_a @ layer.lokr_w1_b if layer.factor_c else layer.lokr_w1
    return torch.kron(c, layer.lokr_w2_a @ layer.lokr_w2_b).reshape(layer.base.weight.shape)


def _lokr_by_blocks(layer: LoKrLayer) -> torch.Tensor:
    """``kron(C, M)`` by its definition: block ``(a, c)`` of size ``(o2, i2)`` is ``C[a, c] * M``."""
    c = layer.lokr_w1_a @ layer.lokr_w1_b if layer.factor_c else layer.lokr_w1
    m = layer.lokr_w2_a @ layer.lokr_w2_b
    rows = [torch.cat([c[a, col] * m for col in range(c.shape[1])], dim=1) for a in range(c.shape[0])]
    return torch.cat(rows, dim=0).reshape(layer.base.weight.shape)


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_output_unchanged_after_setup(method, model_name):
    reference = _backbone(model_name)
    model = _adapted(method, model_name)
    assert low_rank_layers(model), "nothing was adapted"
    with torch.no_grad():
        assert torch.equal(model(_images()), reference(_images()))
    assert all(not layer.delta_weight().any() for layer in low_rank_layers(model).values())


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_merge_unmerge_and_export_round_trip(method, model_name):
    model = _adapted(method, model_name)
    _randomise(model)
    unmerged = assert_merge_round_trip(
        model, low_rank_layers, merge_low_rank, unmerge_low_rank, _images(), every_base_moves=True
    )

    exported = export_plain_model(model)
    assert not low_rank_layers(exported)
    assert_loads_into_plain_timm(exported, model_name, unmerged, _images())


LAYERS = [
    pytest.param(nn.Linear(12, 18), id="linear"),
    pytest.param(nn.Conv2d(6, 6, 3, padding=1, groups=6), id="depthwise"),
    pytest.param(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), id="grouped"),
    pytest.param(nn.Conv2d(4, 6, (3, 1), bias=False), id="plain"),
]
WRAPPERS = {
    "loha": (lambda base: LoHALayer(base, rank=2, alpha=3), _loha_formula),
    "lokr": (lambda base: LoKrLayer(base, rank=2, alpha=3), _lokr_by_blocks),
    "lokr-factor_c": (lambda base: LoKrLayer(base, rank=2, alpha=3, factor_c=True), _lokr_by_blocks),
    "lokr-factor2": (lambda base: LoKrLayer(base, rank=2, alpha=3, factor=2), _lokr_formula),
}


def _apply(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("base", LAYERS)
def test_delta_matches_formula_and_forward(wrapper, base):
    torch.manual_seed(0)
    make, formula = WRAPPERS[wrapper]
    layer = make(base).eval()
    _randomise(layer, std=0.5)
    delta = layer.delta_weight()
    assert delta.shape == base.weight.shape and delta.abs().sum() > 0
    torch.testing.assert_close(delta, formula(layer), rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 12) if isinstance(base, nn.Linear) else torch.randn(2, base.in_channels, 9, 9)
    with torch.no_grad():
        unmerged = layer(x)
        direct = _apply(base, x, base.weight + layer.scaling * formula(layer))
        layer.merge()
        merged = layer(x)
    assert (unmerged - direct).abs().max() < 1e-5
    assert (merged - unmerged).abs().max() < 1e-5


def test_lokr_kron_matches_torch_kron_on_a_model():
    model = _adapted("lokr", "test_vit")
    _randomise(model)
    for layer in low_rank_layers(model).values():
        torch.testing.assert_close(layer.delta_weight(), _lokr_formula(layer), rtol=0, atol=0)


def test_parameter_counts_and_scaling():
    linear = nn.Linear(64, 48)
    loha = LoHALayer(linear, rank=4, alpha=8)
    assert loha.scaling == 2.0
    assert sum(p.numel() for _, p in loha.lora_parameters()) == 2 * 4 * (48 + 64)
    # out 48 = 6 x 8, in 64 = 8 x 8: C is (6, 8), B A is (8, 8)
    lokr = LoKrLayer(nn.Linear(64, 48), rank=4, alpha=8)
    assert lokr.kron_shapes == ((6, 8), (8, 8))
    assert sum(p.numel() for _, p in lokr.lora_parameters()) == 6 * 8 + 4 * (8 + 8)
    lokr_c = LoKrLayer(nn.Linear(64, 48), rank=4, alpha=8, factor_c=True)
    assert sorted(n for n, _ in lokr_c.lora_parameters()) == ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]
    assert sum(p.numel() for _, p in lokr_c.lora_parameters()) == 4 * (6 + 8) + 4 * (8 + 8)
    # factor=4: C is (4, 4), B A is (12, 16)
    lokr_4 = LoKrLayer(nn.Linear(64, 48), rank=4, alpha=8, factor=4)
    assert lokr_4.kron_shapes == ((4, 4), (12, 16))
    # a depthwise 7x7 conv: weight (24, 1, 7, 7) -> (24, 49) = (4 x 6) kron... in 49 = 7 x 7
    dw = LoKrLayer(nn.Conv2d(24, 24, 7, padding=3, groups=24), rank=2, alpha=2)
    assert dw.kron_shapes == ((4, 7), (6, 7))
    assert not any(p.requires_grad for p in dw.base.parameters())


def test_factorize():
    assert factorize(64) == (8, 8)
    assert factorize(192) == (12, 16)
    assert factorize(13) == (1, 13)
    assert factorize(48, factor=5) == (4, 12)  # largest divisor <= factor
    assert factorize(6, factor=100) == (6, 1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(StrategyError, match="factor"):
            factorize(10, bad)


def test_factor_c_strategy_trains_only_factors():
    model = make_backbone("test_vit")
    LoKr(rank=2, targets="vit_attention", factor_c=True, train_head=False).setup(model)
    trainable = trainable_names(model)
    assert trainable == low_rank_parameter_names(model)
    assert {name.rsplit(".", 1)[-1] for name in trainable} == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}


def test_train_bias():
    model = make_backbone("test_vit")
    LoHA(rank=2, targets="vit_mlp", train_bias=True, train_head=False).setup(model)
    expected = low_rank_parameter_names(model) | {f"blocks.{i}.mlp.fc{j}.base.bias" for i in range(6) for j in (1, 2)}
    assert trainable_names(model) == expected


@pytest.mark.parametrize("name", ["loha", "lokr"])
@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": []}])
def test_invalid_arguments(name, kwargs):
    with pytest.raises(StrategyError, match=name):
        build_strategy({"name": name, **kwargs})


def test_invalid_layer_and_factor():
    with pytest.raises(StrategyError, match="lokr: factor"):
        build_strategy({"name": "lokr", "factor": 0})
    with pytest.raises(StrategyError, match="loha: can adapt"):
        LoHALayer(nn.Conv1d(2, 2, 3))
    assert build_strategy({"name": "lokr", "factor": 4, "factor_c": True}).config()["factor"] == 4
