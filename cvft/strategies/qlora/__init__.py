"""QLoRA: LoRA over NF4-quantised base weights (torchao), Linear and Conv2d.

Example:
    >>> from cvft.strategies import get_strategy
    >>> get_strategy("qlora").__name__
    'QLoRA'
"""

from cvft.strategies.qlora.nf4 import NF4Linear, nf4_nbytes
from cvft.strategies.qlora.nf4_conv import QUANTIZE_DEPTHWISE, NF4Conv2d, is_depthwise
from cvft.strategies.qlora.strategy import QLoRA, quantize_layers, quantize_linear_layers

__all__ = [
    "NF4Linear",
    "NF4Conv2d",
    "QUANTIZE_DEPTHWISE",
    "is_depthwise",
    "nf4_nbytes",
    "QLoRA",
    "quantize_layers",
    "quantize_linear_layers",
]
