"""Quantisation-aware training (``qat``): int8 fake quantisation through torchao, alone or under LoRA.

Importing this package registers ``"qat"`` without importing torchao; the layers
(:mod:`cvft.strategies.qat.layer`) import it when the strategy is set up.

* :mod:`~cvft.strategies.qat.fake_quant`: torchao's fake quantisers with cvft's int8 settings;
* :mod:`~cvft.strategies.qat.layer`: ``QATLinear`` (torchao's ``FakeQuantizedLinear``) and ``QATConv2d``;
* :mod:`~cvft.strategies.qat.strategy`: the registered strategy and ``convert_qat`` (torchao's convert step).

Example:
    >>> from cvft.strategies import get_strategy
    >>> get_strategy("qat").__name__
    'QAT'
"""

from cvft.strategies.qat.fake_quant import ACTIVATION_SCHEMES, require_torchao_qat
from cvft.strategies.qat.strategy import QAT, convert_qat, qat_layers

__all__ = ["QAT", "ACTIVATION_SCHEMES", "convert_qat", "qat_layers", "require_torchao_qat"]
