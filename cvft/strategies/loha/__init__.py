"""LoHA (low-rank Hadamard product adaptation): the wrapper layer and the registered ``loha`` strategy.

Importing this package registers ``"loha"``. Merging, unmerging and export are the low-rank family's
(:func:`cvft.strategies.lowrank.merge_low_rank`, :func:`~cvft.strategies.lowrank.export_plain_model`).

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "loha", "rank": 4, "targets": "vit_attention"}).rank
    4
"""

from cvft.strategies.loha.layer import LoHALayer
from cvft.strategies.loha.strategy import LoHA, inject_loha

__all__ = ["LoHA", "LoHALayer", "inject_loha"]
