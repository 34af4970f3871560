"""Shared LoRA: one trainable low-rank pair per weight shape, tied across layers, with a scale per layer.

Importing this package registers ``"shared_lora"``. Merging, unmerging and export are the low-rank family's
(:func:`cvft.strategies.lowrank.merge_low_rank`, :func:`~cvft.strategies.lowrank.export_plain_model`).

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "shared_lora", "rank": 4, "targets": "vit_attention"}).rank
    4
"""

from cvft.strategies.shared_lora.layer import SharedLoRALayer, SharedLowRankPair
from cvft.strategies.shared_lora.strategy import SharedLoRA, inject_shared_lora, shared_layer_factory, shared_pairs

__all__ = [
    "SharedLoRA",
    "SharedLoRALayer",
    "SharedLowRankPair",
    "inject_shared_lora",
    "shared_layer_factory",
    "shared_pairs",
]
