"""QLoRA: LoRA over NF4-quantised base weights (torchao).

Example:
    >>> from cvft.strategies import get_strategy
    >>> get_strategy("qlora").__name__
    'QLoRA'
"""

from cvft.strategies.qlora.nf4 import NF4Linear, nf4_nbytes
from cvft.strategies.qlora.strategy import QLoRA, quantize_linear_layers

__all__ = ["NF4Linear", "nf4_nbytes", "QLoRA", "quantize_linear_layers"]
