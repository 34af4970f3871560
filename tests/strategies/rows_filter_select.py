"""Matrix rows of structured selective fine-tuning (``filter_select``): a fraction of whole output rows (filters) of
every Linear / Conv2d weight as row deltas, plus the head.

The ``taylor`` criterion needs calibration batches, which the matrix's ``apply_strategies(model, specs)`` call does
not pass, and ``bn_scale`` needs tie-free BatchNorm scales; both are tested in ``test_filter_select.py``.
"""

from __future__ import annotations

from matrix_kit import _union, injected_row, weight_shapes
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
    return sum(_rows(K, rows) * size for rows, size in weight_shapes(name, model))


def _bias_deltas(name, model):
    return {f"{layer}.bias_delta" for layer in _layers(name, model) if model.get_submodule(layer).base.bias is not None}


def _bias_count(name: str, model: nn.Module) -> int:
    """One bias entry per selected row of every layer with a bias (all of the ViT's; none of the ResNet's convs)."""
    return sum(_rows(K, rows) for rows, _ in weight_shapes(name, model)) if name == "test_vit" else 0


def _with_bias_count(name: str, model: nn.Module) -> int:
    return _per_layer_count(name, model) + _bias_count(name, model)


ROWS = [
    injected_row(
        "filter_select-l1-per_layer" + suffix,
        [{"name": "filter_select", "k": K, **options}],
        params,
        count,
        merge=merge_filter_select,
        lr=3e-2,
    )
    for suffix, options, params, count in [
        ("", {}, _deltas, _per_layer_count),
        ("-train_bias", {"train_bias": True}, _union(_deltas, _bias_deltas), _with_bias_count),
    ]
]
