"""LoRA's former target helpers, kept for compatibility: the low-rank family's targets under their LoRA names.

Targets are resolved by :mod:`cvft.strategies.targets` for every method; the low-rank candidates (Linear and Conv2d
layers outside the head) are :func:`cvft.strategies.lowrank.low_rank_candidates`.

Example:
    >>> import timm
    >>> find_targets(timm.create_model("test_vit"), "vit_attention")[:2]
    ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
"""

from __future__ import annotations

from cvft.strategies.lowrank.targets import TYPE_NAMES, find_low_rank_targets, low_rank_candidates
from cvft.strategies.targets import PRESETS

__all__ = ["PRESETS", "TYPE_NAMES", "candidate_modules", "find_targets"]

candidate_modules = low_rank_candidates
find_targets = find_low_rank_targets
