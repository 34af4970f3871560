"""LoRA wrappers: a frozen base layer plus a trainable low-rank update ``scaling * B @ A``.

``B`` starts at zero, so a freshly wrapped model computes exactly what the base model did. The update can be folded
into the base weight (:meth:`LoRALayer.merge`) for inference without extra cost, and taken out again
(:meth:`LoRALayer.unmerge`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError

__all__ = ["LoRALayer", "LoRALinear", "LoRAConv2d", "QKV_PARTS", "check_adapter_hyperparameters"]

#: The three thirds of a fused attention projection's output, in timm's order.
QKV_PARTS = ("q", "k", "v")


def check_adapter_hyperparameters(method: str, rank: int, alpha: float, dropout: float) -> None:
    """Refuse a non-positive or non-integer rank, ``alpha <= 0`` and dropout outside ``[0, 1)``, naming ``method``.

    Example:
        >>> check_adapter_hyperparameters("loha", 0, 1.0, 0.0)
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: loha: rank must be a positive integer, got 0.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise StrategyError(f"{method}: rank must be a positive integer, got {rank!r}.")
    if not alpha > 0:
        raise StrategyError(f"{method}: alpha must be > 0, got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise StrategyError(f"{method}: dropout must be in [0, 1), got {dropout!r}.")


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` for rank-stabilised LoRA (rsLoRA).

    Example:
        >>> lora_scaling(4, 8, use_rslora=False), lora_scaling(4, 8, use_rslora=True)
        (2.0, 4.0)
    """
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALayer(nn.Module):
    """Common part of the LoRA wrappers: the frozen ``base`` layer, scaling, dropout and the merged state.

    Subclasses define :meth:`delta_weight` (the update in the base weight's shape, without scaling) and
    :meth:`lora_forward` (the update applied to an input, without scaling).

    Args:
        base: The layer to adapt; its parameters are frozen.
        rank: Rank ``r`` of the update.
        alpha: Scale numerator.
        dropout: Dropout probability on the input of the update path.
        use_rslora: Scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        super().__init__()
        check_adapter_hyperparameters("lora", rank, alpha, dropout)
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for param in base.parameters():
            param.requires_grad_(False)

    def lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The update's own parameters (everything outside ``base``), with names relative to this layer."""
        for name, param in self.named_parameters():
            if not name.startswith("base."):
                yield name, param

    @staticmethod
    def _reset(a: nn.Module, b: nn.Module) -> None:
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)

    def delta_weight(self) -> Tensor:
        """The unscaled update ``B @ A`` in the shape of ``base.weight``."""
        raise NotImplementedError

    def lora_forward(self, x: Tensor) -> Tensor:
        """The unscaled update applied to ``x`` (after dropout)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + scaling * B(A(dropout(x)))``; only ``base(x)`` once merged."""
        out = self.base(x)
        if self.merged:
            return out
        return out + self.scaling * self.lora_forward(self.lora_dropout(x))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * delta_weight()`` into ``base.weight``; merging a merged layer does nothing.

        A quantised base (QLoRA's :class:`~cvft.strategies.qlora.NF4Linear`) is first dequantised into a dense
        layer; the quantised one is kept aside so that :meth:`unmerge` restores it exactly.
        """
        if self.merged:
            return
        delta = self.scaling * self.delta_weight()
        dequantize = getattr(self.base, "dequantize", None)
        if callable(dequantize):
            object.__setattr__(self, "_quantized_base", self.base)  # not a registered sub-module
            self.base = dequantize()
        weight = self.base.weight
        weight.add_(delta.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``base.weight`` again; unmerging an unmerged layer does nothing."""
        if not self.merged:
            return
        quantized = self.__dict__.pop("_quantized_base", None)
        if quantized is not None:
            self.base = quantized
        else:
            weight = self.base.weight
            weight.sub_((self.scaling * self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        """Hyper-parameters and merged state, for ``repr(model)``."""
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


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
        if not isinstance(base, nn.Linear):
            raise StrategyError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}.")
        super().__init__(base, rank, alpha, dropout, use_rslora)
        in_features, out_features = base.in_features, base.out_features
        self.split: tuple[str, ...] | None = None
        if split is None:
            self.lora_A: nn.Module = nn.Linear(in_features, rank, bias=False)
            self.lora_B: nn.Module = nn.Linear(rank, out_features, bias=False)
            self._reset(self.lora_A, self.lora_B)
        else:
            parts = tuple(split)
            unknown = [p for p in parts if p not in QKV_PARTS]
            if not parts or unknown or len(set(parts)) != len(parts):
                raise StrategyError(
                    f"lora: qkv parts must be a non-empty subset of {list(QKV_PARTS)} without repeats, "
                    f"got {list(parts)}."
                )
            if out_features % 3:
                raise StrategyError(
                    f"lora: cannot split a Linear with {out_features} outputs into q, k, v thirds; "
                    "use qkv_parts only on fused qkv projections."
                )
            self.split = tuple(p for p in QKV_PARTS if p in parts)  # canonical order
            third = out_features // 3
            self.lora_A = nn.ModuleDict({p: nn.Linear(in_features, rank, bias=False) for p in self.split})
            self.lora_B = nn.ModuleDict({p: nn.Linear(rank, third, bias=False) for p in self.split})
            for p in self.split:
                self._reset(self.lora_A[p], self.lora_B[p])

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
        #: timm's Conv2dSame (TF "same" padding, e.g. tf_efficientnet_*) pads the input dynamically before a conv
        #: with padding 0; the update path pads the same way, so it still composes into one conv of the base's shape.
        same_padding = type(base).__name__ == "Conv2dSame"
        if type(base) is not nn.Conv2d and not same_padding:
            raise StrategyError(
                f"LoRAConv2d wraps nn.Conv2d (and timm's Conv2dSame) layers, got {type(base).__name__}; "
                "target a different module or leave this one out of `targets`."
            )
        super().__init__(base, rank, alpha, dropout, use_rslora)
        self.same_padding = same_padding
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

    def delta_weight(self) -> Tensor:
        """The update in the shape of ``base.weight``: ``(out, in / groups, kh, kw)``."""
        groups, rank = self.base.groups, self.rank
        out_channels = self.base.out_channels
        a = self.lora_A.weight.reshape(groups, rank, -1)  # (g, r, in/g * kh * kw)
        b = self.lora_B.weight.reshape(groups, out_channels // groups, rank)  # (g, out/g, r)
        return torch.bmm(b, a).reshape(self.base.weight.shape)

    def lora_forward(self, x: Tensor) -> Tensor:
        """``B(A(x))``, after the base's dynamic "same" padding for Conv2dSame layers."""
        if self.same_padding:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.base.kernel_size, self.base.stride, self.base.dilation)
        return self.lora_B(self.lora_A(x))
