"""Row deltas: a frozen Linear or Conv2d layer whose chosen output rows (filters) get a trainable update.

A :class:`FilterDeltaLayer` holds, next to its frozen ``base``:

* ``rows``: a long buffer, the sorted, unique indices of the updated output rows (conv filters, Linear output
  features); listed in ``adapter_buffer_names`` so that adapter files and DDP runs carry the selection;
* ``delta``: the trainable update, shape ``(len(rows), *base.weight.shape[1:])``, zero at the start;
* ``bias_delta`` (only with ``train_bias=True`` on a layer that has a bias): the update of the selected rows' biases.

The effective weight is ``base.weight.index_add(0, rows, delta)``: an out-of-place copy in which only the selected
rows are touched, so every other row is the base row itself, bit for bit, whatever the optimizer does (the base
weight is frozen, weight decay included). The number of selected rows may change when a data criterion selects
again (``global`` scope) or when a state dict or adapter file from another selection is loaded; :meth:`select`
resizes ``delta`` in place (``.data``), so the :class:`~torch.nn.Parameter` object an optimizer holds stays the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from cvft.errors import StrategyError

__all__ = ["FilterDeltaLayer"]


class FilterDeltaLayer(nn.Module):
    """A frozen ``nn.Linear`` or ``nn.Conv2d`` (subclasses included) whose selected output rows get a trained delta.

    Args:
        base: The layer to update; its parameters are frozen.
        rows: Indices of the output rows to update (sorted and deduplicated here).
        train_bias: Also give the selected rows' biases a trainable delta (layers without a bias get none).

    Example:
        >>> linear = nn.Linear(3, 4)
        >>> layer = FilterDeltaLayer(linear, torch.tensor([2, 0]))
        >>> layer.rows.tolist(), tuple(layer.delta.shape)
        ([0, 2], (2, 3))
        >>> x = torch.randn(5, 3)
        >>> torch.equal(layer(x), linear(x))  # the update starts at zero
        True
        >>> with torch.no_grad():
        ...     _ = layer.delta.fill_(1.0)
        >>> changed = (layer.effective_weight() != linear.weight).any(dim=1)
        >>> changed.tolist()  # only the selected rows differ from the base weight
        [True, False, True, False]
    """

    adapter_buffer_names = ("rows",)

    def __init__(self, base: nn.Module, rows: Tensor, train_bias: bool = False) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise StrategyError(
                f"filter_select: can update the output rows of nn.Linear and nn.Conv2d weights, got "
                f"{type(base).__name__}; choose `targets` among Linear and Conv2d layers."
            )
        self.base = base
        weight = base.weight
        for param in base.parameters():
            param.requires_grad_(False)
        self.row_shape = tuple(weight.shape[1:])
        self.num_rows = int(weight.shape[0])
        self.train_bias = bool(train_bias) and base.bias is not None
        self.register_buffer("rows", torch.zeros(0, dtype=torch.long, device=weight.device))
        self.delta = nn.Parameter(weight.new_zeros((0, *self.row_shape)))
        if self.train_bias:
            self.bias_delta = nn.Parameter(base.bias.new_zeros(0))
        self.select(rows)

    def _checked_rows(self, rows: Tensor) -> Tensor:
        rows = rows.detach().to(device=self.rows.device, dtype=torch.long).flatten()
        unique = rows.unique(sorted=True)
        if unique.numel() != rows.numel() or (
            rows.numel() and not 0 <= int(unique[0]) <= int(unique[-1]) < self.num_rows
        ):
            raise StrategyError(
                f"filter_select: row indices must be unique and in [0, {self.num_rows}) for this layer; this adapter "
                "or checkpoint does not come from the same model and `targets`."
            )
        return unique

    @torch.no_grad()
    def select(self, rows: Tensor) -> None:
        """Update the output rows ``rows`` from now on; the delta (and bias delta) restart at zero, resized in place."""
        rows = self._checked_rows(rows)
        self.rows = rows
        self.delta.data = self.delta.new_zeros((rows.numel(), *self.row_shape))
        if self.train_bias:
            self.bias_delta.data = self.bias_delta.new_zeros(rows.numel())

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Take the loaded selection's size first (a ``global`` selection's share of this layer may differ)."""
        rows = state_dict.get(prefix + "rows")
        if isinstance(rows, Tensor) and rows.shape != self.rows.shape:
            self.select(rows)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def fit_adapter_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Resize to the selection an adapter file holds (its ``rows``, this layer's keys without prefix)."""
        rows = tensors.get("rows")
        if isinstance(rows, Tensor) and rows.shape != self.rows.shape:
            self.select(rows)

    def effective_weight(self) -> Tensor:
        """``base.weight`` with ``delta`` added to the selected rows (the base weight itself when none is selected)."""
        weight = self.base.weight
        if self.rows.numel() == 0 and not self.delta.requires_grad:
            return weight
        return weight.index_add(0, self.rows, self.delta.to(weight.dtype))

    def effective_bias(self) -> Tensor | None:
        """``base.bias`` with ``bias_delta`` added to the selected rows (when the bias trains)."""
        bias = self.base.bias
        if not self.train_bias or (self.rows.numel() == 0 and not self.bias_delta.requires_grad):
            return bias
        return bias.index_add(0, self.rows, self.bias_delta.to(bias.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """The base layer's computation with the effective weight and bias."""
        base = self.base
        if self.rows.numel() == 0 and not self.delta.requires_grad:
            return base(x)
        # a trainable delta joins the graph even when empty (a global choice left the layer out): DDP expects a
        # gradient from every parameter that requires one
        weight, bias = self.effective_weight(), self.effective_bias()
        if type(base) is nn.Linear:
            return F.linear(x, weight, bias)
        if type(base) is nn.Conv2d:
            return base._conv_forward(x, weight, bias)
        # subclasses (timm's Conv2dSame, StdConv2d ...) keep their own forward, with the effective tensors swapped in
        swapped = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return functional_call(base, swapped, (x,))

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """Fold the deltas into ``base.weight`` (and ``base.bias``); return the base layer, which computes the same."""
        if self.rows.numel():
            self.base.weight.copy_(self.effective_weight())
            if self.train_bias:
                self.base.bias.copy_(self.effective_bias())
        return self.base

    def extra_repr(self) -> str:
        """Number of updated rows and whether their biases train."""
        return f"rows={self.rows.numel()}/{self.num_rows}, train_bias={self.train_bias}"
