"""LoRA wrappers: a frozen base layer plus a trainable low-rank update ``scaling * B @ A``.

``B`` starts at zero, so a freshly wrapped model computes exactly what the base model did. The update can be folded
into the base weight (:meth:`~cvft.strategies.lowrank.LowRankLayer.merge`) for inference without extra cost, and
taken out again (:meth:`~cvft.strategies.lowrank.LowRankLayer.unmerge`); both come from the low-rank base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.lowrank.layer import (
    LowRankLayer,
    check_low_rank_hyperparameters,
    is_conv2d_same,
    is_quantized_conv,
    low_rank_scaling,
)

__all__ = [
    "LoRALayer",
    "LoRALinear",
    "LoRAConv2d",
    "QKV_PARTS",
    "check_adapter_hyperparameters",
    "check_qkv_parts",
    "lora_scaling",
]

#: The three thirds of a fused attention projection's output, in timm's order.
QKV_PARTS = ("q", "k", "v")

#: Former names, kept for compatibility: the checks and the scaling belong to the whole low-rank family.
check_adapter_hyperparameters = check_low_rank_hyperparameters
lora_scaling = low_rank_scaling


def check_qkv_parts(parts: Sequence[str]) -> tuple[str, ...]:
    """The parts of a fused qkv projection to adapt, in canonical ``q, k, v`` order; refuse anything else.

    Example:
        >>> check_qkv_parts(["v", "q"])
        ('q', 'v')
        >>> check_qkv_parts(["q", "x"])
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: lora: qkv_parts must be a non-empty subset of ['q', 'k', 'v'] without repeats, \
got ['q', 'x'].
    """
    parts = list(parts)
    if not parts or any(p not in QKV_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise StrategyError(
            f"lora: qkv_parts must be a non-empty subset of {list(QKV_PARTS)} without repeats, got {parts}."
        )
    return tuple(p for p in QKV_PARTS if p in parts)


class LoRALayer(LowRankLayer):
    """Common part of the LoRA wrappers: the update ``B @ A``, ``A`` Kaiming-uniform and ``B`` zero at the start.

    Arguments as for :class:`~cvft.strategies.lowrank.LowRankLayer`.
    """

    method = "lora"

    @staticmethod
    def _reset(a: nn.Module, b: nn.Module) -> None:
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)


class LoRALinear(LoRALayer):
    """LoRA around an ``nn.Linear``: ``y = base(x) + scaling * B(A(dropout(x)))``.

    With ``split``, the layer is treated as timm's fused ``qkv`` projection whose output is ``[q | k | v]``:
    only the named thirds get an update (one ``A``/``B`` pair each), the others stay exactly as the base computes
    them. ``split=("q", "v")`` is the setting of the LoRA paper.

    Args:
        base: The linear layer to adapt.
        rank: Rank of the update.
        alpha: Scale numerator; the update is scaled by ``alpha / rank``.
        dropout: Dropout probability on the update's input.
        use_rslora: Scale by ``alpha / sqrt(rank)`` instead.
        split: Parts of a fused qkv output to adapt, any non-empty subset of ``("q", "k", "v")``.

    Example:
        >>> import torch
        >>> layer = LoRALinear(nn.Linear(6, 18), rank=2, alpha=4, split=("q", "v"))
        >>> sorted(name for name, _ in layer.lora_parameters())
        ['lora_A.q.weight', 'lora_A.v.weight', 'lora_B.q.weight', 'lora_B.v.weight']
        >>> x = torch.randn(3, 6)
        >>> torch.equal(layer(x), layer.base(x))  # B starts at zero
        True
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        split: Sequence[str] | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout, use_rslora)
        in_features, out_features = base.in_features, base.out_features
        self.split: tuple[str, ...] | None = None
        if split is None:
            self.lora_A: nn.Module = nn.Linear(in_features, rank, bias=False)
            self.lora_B: nn.Module = nn.Linear(rank, out_features, bias=False)
            self._reset(self.lora_A, self.lora_B)
        else:
            parts = check_qkv_parts(split)
            if out_features % 3:
                raise StrategyError(
                    f"lora: cannot split a Linear with {out_features} outputs into q, k, v thirds; "
                    "use qkv_parts only on fused qkv projections."
                )
            self.split = parts
            third = out_features // 3
            self.lora_A = nn.ModuleDict({p: nn.Linear(in_features, rank, bias=False) for p in self.split})
            self.lora_B = nn.ModuleDict({p: nn.Linear(rank, third, bias=False) for p in self.split})
            for p in self.split:
                self._reset(self.lora_A[p], self.lora_B[p])

    def check_base(self, base: nn.Module) -> None:
        """Refuse anything but an ``nn.Linear``."""
        if not isinstance(base, nn.Linear):
            raise StrategyError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}.")

    def delta_weight(self) -> Tensor:
        """``B @ A`` of shape ``(out, in)``; rows of parts left out of ``split`` are zero."""
        if self.split is None:
            return self.lora_B.weight @ self.lora_A.weight
        third = self.base.out_features // 3
        rows = []
        for part in QKV_PARTS:
            if part in self.split:
                rows.append(self.lora_B[part].weight @ self.lora_A[part].weight)
            else:
                rows.append(self.lora_A[self.split[0]].weight.new_zeros(third, self.base.in_features))
        return torch.cat(rows, dim=0)

    def lora_forward(self, x: Tensor) -> Tensor:
        """``B(A(x))``, with zero columns for the parts left out of ``split``."""
        if self.split is None:
            return self.lora_B(self.lora_A(x))
        third = self.base.out_features // 3
        pieces = []
        for part in QKV_PARTS:
            if part in self.split:
                pieces.append(self.lora_B[part](self.lora_A[part](x)))
            else:
                pieces.append(x.new_zeros(*x.shape[:-1], third))
        return torch.cat(pieces, dim=-1)

    def extra_repr(self) -> str:
        """Hyper-parameters, merged state and qkv split, for ``repr(model)``."""
        split = f", split={self.split}" if self.split else ""
        return super().extra_repr() + split


class LoRAConv2d(LoRALayer):
    """LoRA around an ``nn.Conv2d``, grouped and depthwise convolutions included.

    ``A`` is a convolution with the base's kernel, stride, padding, dilation and groups, mapping ``in`` channels to
    ``groups * rank``; ``B`` is a grouped 1x1 convolution from ``groups * rank`` to ``out``. Within each group ``g``
    the composition is one convolution with weight ``B_g @ A_g``, so the update folds exactly into the base weight:
    ``delta[o] = sum_j B[o, j] * A[g(o) * rank + j]``. It has ``rank * (in * kh * kw + out)`` parameters whatever
    the number of groups.

    Args:
        base: The convolution to adapt (a plain ``nn.Conv2d``; subclasses with dynamic padding are refused).
        rank: Rank of the update within each group.
        alpha: Scale numerator; the update is scaled by ``alpha / rank``.
        dropout: Dropout probability on the update's input.
        use_rslora: Scale by ``alpha / sqrt(rank)`` instead.

    Example:
        >>> import torch
        >>> depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        >>> layer = LoRAConv2d(depthwise, rank=2, alpha=2)
        >>> sum(p.numel() for _, p in layer.lora_parameters()) == 2 * (8 * 3 * 3 + 8)
        True
        >>> layer.delta_weight().shape == depthwise.weight.shape
        True
    """

    def __init__(
        self, base: nn.Conv2d, rank: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__(base, rank, alpha, dropout, use_rslora)
        #: timm's Conv2dSame (TF "same" padding, e.g. tf_efficientnet_*) pads the input dynamically before a conv
        #: with padding 0; the update path pads the same way, so it still composes into one conv of the base's shape.
        self.same_padding = is_conv2d_same(base) or bool(getattr(base, "same_padding", False))
        groups = base.groups
        self.lora_A = nn.Conv2d(
            base.in_channels,
            groups * rank,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=groups,
            bias=False,
            padding_mode=base.padding_mode,
        )
        self.lora_B = nn.Conv2d(groups * rank, base.out_channels, 1, groups=groups, bias=False)
        self._reset(self.lora_A, self.lora_B)

    def check_base(self, base: nn.Module) -> None:
        """Refuse anything but a plain ``nn.Conv2d``, timm's ``Conv2dSame`` or a quantised one (NF4, fake-quantised)."""
        if type(base) is not nn.Conv2d and not is_conv2d_same(base) and not is_quantized_conv(base):
            raise StrategyError(
                f"LoRAConv2d wraps nn.Conv2d (and timm's Conv2dSame) layers, got {type(base).__name__}; "
                "target a different module or leave this one out of `targets`."
            )

    def delta_weight(self) -> Tensor:
        """The update in the shape of ``base.weight``: ``(out, in / groups, kh, kw)``."""
        groups, rank = self.base.groups, self.rank
        out_channels = self.base.out_channels
        a = self.lora_A.weight.reshape(groups, rank, -1)  # (g, r, in/g * kh * kw)
        b = self.lora_B.weight.reshape(groups, out_channels // groups, rank)  # (g, out/g, r)
        in_per_group = self.base.in_channels // groups  # not base.weight.shape: an NF4 weight is stored flattened
        return torch.bmm(b, a).reshape(out_channels, in_per_group, *self.base.kernel_size)

    def prefers_fused(self, x: Tensor) -> bool:
        """Fuse when the branch would keep at least as much for backward as the fused form.

        The branch keeps ``A(x)`` (``N x groups * rank x H_out x W_out``), the fused form the updated weight.
        """
        stride_h, stride_w = self.base.stride
        out_h, out_w = math.ceil(x.shape[-2] / stride_h), math.ceil(x.shape[-1] / stride_w)
        branch = x.shape[0] * self.base.groups * self.rank * out_h * out_w if x.dim() == 4 else 0
        return branch >= self.base.weight.numel()

    def lora_forward(self, x: Tensor) -> Tensor:
        """``B(A(x))``, after the base's dynamic "same" padding for Conv2dSame layers."""
        if self.same_padding:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.base.kernel_size, self.base.stride, self.base.dilation)
        return self.lora_B(self.lora_A(x))
