"""LoKr (low-rank Kronecker product adaptation): the wrapper layer and the registered ``lokr`` strategy.

Importing this package registers ``"lokr"``. Merging, unmerging and export are the low-rank family's
(:func:`cvft.strategies.lowrank.merge_low_rank`, :func:`~cvft.strategies.lowrank.export_plain_model`).

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "lokr", "rank": 4, "factor_c": True}).factor_c
    True
"""

from cvft.strategies.lokr.layer import LoKrLayer, factorize
from cvft.strategies.lokr.strategy import LoKr, inject_lokr

__all__ = ["LoKr", "LoKrLayer", "factorize", "inject_lokr"]
