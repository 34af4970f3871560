"""Matrix rows of structured selective fine-tuning (``filter_select``): a fraction of whole output rows (filters) of
every Linear / Conv2d weight as row deltas, plus the head.

The ``taylor`` criterion needs calibration batches, which the matrix's ``apply_strategies(model, specs)`` call does
not pass, and ``bn_scale`` needs tie-free BatchNorm scales; both are tested in ``test_filter_select.py``.
"""

from __future__ import annotations

from matrix_kit import Row, _head, _union
from torch import nn

from cvft.strategies.filter_select import merge_filter_select

K = 0.1


def _rows(k: float, rows: int) -> int:
    return min(rows, max(1, round(k * rows)))


def _layers(name: str, model: nn.Module) -> list[str]:
    """Every Linear / Conv2d layer outside the head, by module name (wrapped or not)."""
    head = model.get_classifier()
    names = []
    for module_name, module in model.named_modules():
        base = getattr(module, "base", module)
        if isinstance(base, (nn.Linear, nn.Conv2d)) and base is not head and not module_name.endswith(".base"):
            names.append(module_name)
    return names


def _deltas(name, model):
    return {f"{layer}.delta" for layer in _layers(name, model)}


def _per_layer_count(name: str, model: nn.Module) -> int:
    """Closed form: round(k * rows) (at least 1) rows per layer, each of the layer's row size."""
    if name == "test_vit":
        D, L = model.embed_dim, len(model.blocks)  # noqa: N806
        fc1 = model.blocks[0].mlp.fc1
        H = getattr(fc1, "base", fc1).out_features  # wrapped by the strategy  # noqa: N806
        P = model.patch_embed.patch_size[0]  # noqa: N806
        block = _rows(K, 3 * D) * D + _rows(K, D) * D + _rows(K, H) * D + _rows(K, D) * H
        return _rows(K, D) * 3 * P * P + L * block
    total = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:  # the ResNet's convolutions (wrapped or not); its head is a Linear
            kh, kw = module.kernel_size
            total += _rows(K, module.out_channels) * (module.in_channels // module.groups * kh * kw)
    return total


def _bias_deltas(name, model):
    return {f"{layer}.bias_delta" for layer in _layers(name, model) if model.get_submodule(layer).base.bias is not None}


def _bias_count(name: str, model: nn.Module) -> int:
    """One bias entry per selected row of every layer with a bias (all of the ViT's; none of the ResNet's convs)."""
    if name != "test_vit":
        return 0
    D, L = model.embed_dim, len(model.blocks)  # noqa: N806
    H = model.blocks[0].mlp.fc1.base.out_features  # noqa: N806
    return _rows(K, D) + L * (_rows(K, 3 * D) + _rows(K, D) + _rows(K, H) + _rows(K, D))


ROWS = [
    Row(
        "filter_select-l1-per_layer",
        [{"name": "filter_select", "k": K}],
        _union(_head, _deltas),
        lambda d: d.head + d.injected,
        injected=_per_layer_count,
        merge=merge_filter_select,
        lr=3e-2,
    ),
    Row(
        "filter_select-l1-per_layer-train_bias",
        [{"name": "filter_select", "k": K, "train_bias": True}],
        _union(_head, _deltas, _bias_deltas),
        lambda d: d.head + d.injected,
        injected=lambda name, model: _per_layer_count(name, model) + _bias_count(name, model),
        merge=merge_filter_select,
        lr=3e-2,
    ),
]
