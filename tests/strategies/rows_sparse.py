"""Matrix rows of selective (sparse) fine-tuning: a budget of base-weight entries as a sparse delta, plus the head.

The data criteria (``gradient``, ``fisher``) need calibration batches, which the matrix's ``apply_strategies(model,
specs)`` call does not pass; they are tested in ``test_sparse.py``.
"""

from __future__ import annotations

from matrix_kit import Row, _head, _union
from torch import nn

from cvft.strategies.sparse import merge_sparse

FRACTION = 0.01
COUNT = 500


def _selectable(name: str, model: nn.Module) -> int:
    """Entries of every Linear / Conv2d weight outside the head, from the architecture's hyper-parameters."""
    if name == "test_vit":
        D, L = model.embed_dim, len(model.blocks)  # noqa: N806
        fc1 = model.blocks[0].mlp.fc1
        H = getattr(fc1, "base", fc1).out_features  # wrapped by the strategy  # noqa: N806
        P = model.patch_embed.patch_size[0]  # noqa: N806
        return 3 * P * P * D + L * (D * 3 * D + D * D + D * H + H * D)
    total = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:  # the ResNet's convolutions (wrapped or not); its head is a Linear
            kh, kw = module.kernel_size
            total += module.in_channels * module.out_channels * kh * kw // module.groups
    return total


def _values(name, model):
    return {"sparse_delta.values"}


ROWS = [
    Row(
        "sparse-magnitude-0.01",
        [{"name": "sparse", "budget": FRACTION}],
        _union(_head, _values),
        lambda d: d.head + d.injected,
        injected=lambda name, model: round(FRACTION * _selectable(name, model)),
        merge=merge_sparse,
        lr=3e-2,
    ),
    Row(
        "sparse-count-per_tensor",
        [{"name": "sparse", "budget": COUNT, "scope": "per_tensor"}],
        _union(_head, _values),
        lambda d: d.head + d.injected,
        injected=lambda name, model: COUNT,
        merge=merge_sparse,
        lr=3e-2,
    ),
]
