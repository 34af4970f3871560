"""LoRA (low-rank adaptation): wrappers and the registered ``lora`` strategy, built on the low-rank base.

Importing this package registers ``"lora"``. The family's shared machinery (layer base, strategy template,
targets, merge) lives in :mod:`cvft.strategies.lowrank`; the LoRA names of its helpers (``merge_lora``,
``lora_layers``, ``find_targets`` ...) stay importable from here and cover every low-rank method.

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "lora", "rank": 4, "targets": "vit_attention"}).rank
    4
"""

from cvft.strategies.lora.layer import QKV_PARTS, LoRAConv2d, LoRALayer, LoRALinear, lora_scaling
from cvft.strategies.lora.strategy import (
    LoRA,
    export_plain_model,
    inject_lora,
    lora_layers,
    lora_parameter_names,
    merge_lora,
    unmerge_lora,
)
from cvft.strategies.lora.targets import PRESETS, candidate_modules, find_targets

__all__ = [
    "LoRA",
    "LoRALayer",
    "LoRALinear",
    "LoRAConv2d",
    "QKV_PARTS",
    "PRESETS",
    "lora_scaling",
    "find_targets",
    "candidate_modules",
    "inject_lora",
    "lora_layers",
    "lora_parameter_names",
    "merge_lora",
    "unmerge_lora",
    "export_plain_model",
]
