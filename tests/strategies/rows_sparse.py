"""Matrix rows of selective (sparse) fine-tuning: a budget of base-weight entries as a sparse delta, plus the head.

The data criteria (``gradient``, ``fisher``) need calibration batches, which the matrix's ``apply_strategies(model,
specs)`` call does not pass; they are tested in ``test_sparse.py``.
"""

from __future__ import annotations

from matrix_kit import injected_row, weight_shapes
from torch import nn

from cvft.strategies.sparse import merge_sparse

FRACTION = 0.01
COUNT = 500


def _selectable(name: str, model: nn.Module) -> int:
    """Entries of every Linear / Conv2d weight outside the head, from the architecture's hyper-parameters."""
    return sum(rows * size for rows, size in weight_shapes(name, model))


def _values(name, model):
    return {"sparse_delta.values"}


ROWS = [
    injected_row(row_id, [{"name": "sparse", **options}], _values, count, merge=merge_sparse, lr=3e-2)
    for row_id, options, count in [
        ("sparse-magnitude-0.01", {"budget": FRACTION}, lambda name, model: round(FRACTION * _selectable(name, model))),
        ("sparse-count-per_tensor", {"budget": COUNT, "scope": "per_tensor"}, lambda name, model: COUNT),
    ]
]
