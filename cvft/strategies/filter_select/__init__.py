"""Structured selective fine-tuning: train whole conv filters / Linear output rows chosen by L1, BN scale or Taylor.

Importing this package registers ``"filter_select"``.

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "filter_select", "k": 0.1, "criterion": "taylor"}).needs_data
    True
"""

from cvft.strategies.filter_select import selection as _selection
from cvft.strategies.filter_select.layer import FilterDeltaLayer
from cvft.strategies.filter_select.selection import (  # the package exports all of _selection.__all__
    CRITERIA,
    SCOPES,
    bn_scale_scores,
    filter_layers,
    l1_scores,
    row_count,
    taylor_scores,
    top_rows,
)
from cvft.strategies.filter_select.strategy import (
    FilterSelect,
    filter_select_layers,
    filter_selection,
    merge_filter_select,
)

__all__ = [
    "FilterSelect",
    "FilterDeltaLayer",
    *_selection.__all__,
    "filter_select_layers",
    "filter_selection",
    "merge_filter_select",
]
