"""Selective (sparse) fine-tuning: train a budget of base-weight entries chosen by magnitude, gradient or Fisher.

Importing this package registers ``"sparse"``.

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "sparse", "budget": 0.05, "criterion": "fisher"}).needs_data
    True
"""

from cvft.strategies.sparse.layer import SparseDelta, SparseDeltaLayer
from cvft.strategies.sparse.selection import budget_count, per_tensor_counts, selectable_layers, top_positions
from cvft.strategies.sparse.strategy import (
    SPARSE_DELTA_ATTR,
    SparseFineTune,
    merge_sparse,
    sparse_layers,
    sparse_selection,
)

__all__ = [
    "SparseFineTune",
    "SparseDelta",
    "SparseDeltaLayer",
    "SPARSE_DELTA_ATTR",
    "selectable_layers",
    "budget_count",
    "per_tensor_counts",
    "top_positions",
    "sparse_layers",
    "sparse_selection",
    "merge_sparse",
]
