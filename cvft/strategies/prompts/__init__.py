"""Prompt-based strategies for timm Vision Transformers: ``vpt`` (visual prompt tuning) and ``prefix_tuning``.

Importing this package registers ``"vpt"`` and ``"prefix_tuning"``.

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "vpt", "num_tokens": 5, "deep": True}).deep
    True
"""

from cvft.strategies.prompts._family import SUPPORTED, require_vision_transformer
from cvft.strategies.prompts.prefix_layer import PrefixAttention, PrefixEncoder, is_wrappable_attention
from cvft.strategies.prompts.prefix_tuning import (
    ENCODER_ATTR,
    PrefixTuning,
    fold_prefix,
    prefix_layers,
    prefix_parameter_names,
)
from cvft.strategies.prompts.vpt import PROMPTS_ATTR, VPT, VisualPrompts, vpt_init_bound

__all__ = [
    "VPT",
    "VisualPrompts",
    "vpt_init_bound",
    "PROMPTS_ATTR",
    "PrefixTuning",
    "PrefixAttention",
    "PrefixEncoder",
    "ENCODER_ATTR",
    "fold_prefix",
    "prefix_layers",
    "prefix_parameter_names",
    "is_wrappable_attention",
    "require_vision_transformer",
    "SUPPORTED",
]
