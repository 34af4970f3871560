"""Bottleneck adapters: Conv-Adapter for CNNs, Houlsby and AdaptFormer adapters for ViTs, and a weight-shared variant.

Importing this package registers ``"conv_adapter"``, ``"vit_adapter"`` and ``"shared_adapter"``. Adapters add small
non-linear modules beside or after frozen blocks; unlike LoRA they cannot be merged into the weights
(:func:`remove_adapters` gives the original model back).

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "vit_adapter", "style": "adaptformer"}).scale
    0.1
"""

from cvft.strategies.adapters.conv import ConvAdapter
from cvft.strategies.adapters.layer import (
    AdapterWrapper,
    ConvBottleneck,
    LinearBottleneck,
    ParallelAdapter,
    SequentialAdapter,
    adapter_parameter_names,
    adapter_wrappers,
    remove_adapters,
)
from cvft.strategies.adapters.shared import SharedAdapter
from cvft.strategies.adapters.targets import conv_blocks, transformer_blocks
from cvft.strategies.adapters.vit import ViTAdapter

__all__ = [
    "ConvAdapter",
    "ViTAdapter",
    "SharedAdapter",
    "AdapterWrapper",
    "ParallelAdapter",
    "SequentialAdapter",
    "LinearBottleneck",
    "ConvBottleneck",
    "adapter_wrappers",
    "adapter_parameter_names",
    "remove_adapters",
    "conv_blocks",
    "transformer_blocks",
]
