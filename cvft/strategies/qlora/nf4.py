"""Linear layers whose frozen weight is stored in 4-bit NormalFloat (NF4), through torchao's ``NF4Tensor``.

Why torchao and not bitsandbytes: torchao's NF4 tensor is written in PyTorch itself, so the same code runs on the
CPU (our tests, CI) and on CUDA (where ``torch.compile`` fuses the dequantisation into the matmul), with no native
library to match to a CUDA version. Its block scales are themselves quantised to int8 (QLoRA's double
quantisation), so a weight takes about 0.53 bytes per value instead of 4.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from cvft.errors import StrategyError

__all__ = ["NF4Linear", "CopiesNF4Weights", "clone_nf4", "nf4_nbytes", "require_torchao", "set_nf4_weight"]


def require_torchao():
    """Import torchao's NF4 functions, or say how to install them."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, linear_nf4, to_nf4
    except ImportError:
        try:  # older torchao releases
            from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4
        except ImportError as err:
            raise StrategyError(
                "qlora stores base weights in 4-bit NF4 through torchao, which is not installed. "
                "Install it with `pip install 'cvft[qlora]'` (or `pip install torchao`)."
            ) from err
    return NF4Tensor, linear_nf4, to_nf4


def _largest_divisor_at_most(number: int, limit: int) -> int:
    return max(d for d in range(1, min(number, limit) + 1) if number % d == 0)


def nf4_nbytes(weight: Tensor) -> int:
    """Bytes an NF4 weight really occupies: 4-bit codes, int8 block scales and their fp32 factors."""
    inner = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
    return sum(getattr(weight, name).numel() * getattr(weight, name).element_size() for name in inner)


def clone_nf4(weight: Tensor) -> Tensor:
    """An exact copy of an NF4 tensor (its codes, scales and settings), which torch's generic copy cannot make.

    Example:
        >>> import torch
        >>> _, _, to_nf4 = require_torchao()
        >>> weight = to_nf4(torch.randn(4, 64), 64, 4)
        >>> torch.equal(clone_nf4(weight).get_original_weight(), weight.get_original_weight())
        True
    """
    nf4_tensor, _, _ = require_torchao()
    names, context = weight.__tensor_flatten__()
    return nf4_tensor.__tensor_unflatten__({name: getattr(weight, name).clone() for name in names}, context, None, None)


def set_nf4_weight(
    module: nn.Module, matrix: Tensor, bias: Tensor | None, block_size: int, scaler_block_size: int
) -> None:
    """Give ``module`` a frozen NF4 ``weight`` holding ``matrix`` (2-D, whole blocks) and a frozen copy of ``bias``.

    Also records ``block_size`` and the ``scaler_block_size`` in force: the one asked for, lowered to a divisor of the
    number of blocks for small layers.
    """
    _, _, to_nf4 = require_torchao()
    module.block_size = block_size
    module.scaler_block_size = _largest_divisor_at_most(matrix.numel() // block_size, scaler_block_size)
    module.weight = nn.Parameter(to_nf4(matrix, block_size, module.scaler_block_size), requires_grad=False)
    module.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class CopiesNF4Weights:
    """Mixin for modules holding NF4 parameters: ``copy.deepcopy`` copies them exactly.

    torch's generic deep copy of an NF4 tensor re-quantises it with default settings (refused for small layers, whose
    scale blocks were shrunk), which broke EMA, SWA and anything else that copies a QLoRA model.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> CopiesNF4Weights:
        nf4_tensor, _, _ = require_torchao()
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            if key == "_parameters":
                value = {
                    name: nn.Parameter(clone_nf4(param), requires_grad=False)
                    if isinstance(param, nf4_tensor)
                    else copy.deepcopy(param, memo)
                    for name, param in value.items()
                }
            else:
                value = copy.deepcopy(value, memo)
            clone.__dict__[key] = value
        return clone


class NF4Linear(CopiesNF4Weights, nn.Linear):
    """A frozen ``nn.Linear`` whose weight is held in NF4 (QLoRA, Dettmers et al. 2023); the bias stays dense.

    Args:
        linear: The layer to quantise (its weight is read once and not kept).
        block_size: Values sharing one absmax scale (64 in the QLoRA paper).
        scaler_block_size: Scales sharing one second-level factor (256 in the paper); lowered to a divisor of the
            number of blocks for small layers.

    Example:
        >>> import torch
        >>> dense = nn.Linear(128, 64)
        >>> quantised = NF4Linear(dense)
        >>> x = torch.randn(2, 128)
        >>> bool((quantised(x) - dense(x)).abs().max() < 0.5)
        True
        >>> nf4_nbytes(quantised.weight) / (dense.weight.numel() * 4) < 0.3
        True
    """

    def __init__(self, linear: nn.Linear, block_size: int = 64, scaler_block_size: int = 256) -> None:
        nn.Module.__init__(self)
        weight = linear.weight.detach()
        if weight.numel() % block_size:
            raise StrategyError(
                f"qlora: a {tuple(weight.shape)} weight does not split into NF4 blocks of {block_size}; "
                "choose a block_size that divides it or leave this layer out of `targets`."
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        set_nf4_weight(self, weight, linear.bias, block_size, scaler_block_size)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ dequantise(W).T + b``, without materialising ``W`` for the backward pass."""
        _, linear_nf4, _ = require_torchao()
        out = linear_nf4(x.reshape(-1, self.in_features), self.weight).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def dequantize(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantised weight (what a merge folds updates into)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.weight = nn.Parameter(self.weight.get_original_weight().detach().clone(), requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return dense

    def extra_repr(self) -> str:
        """Shape and quantisation settings."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 block_size={self.block_size}, scaler_block_size={self.scaler_block_size}"
        )
