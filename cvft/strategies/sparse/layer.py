"""Sparse weight deltas: frozen base weights plus a trainable update on a chosen set of their entries.

The whole update of a model is one flat pair held by a :class:`SparseDelta` module at the model's root:
``values`` (the trainable update, zero at the start) and ``indices`` (a long buffer: the positions of the updated
entries in the concatenation of the selectable weight tensors, flattened, in model order). Both have the length of
the budget, whatever the criterion picks, so a checkpoint or an adapter file always fits a freshly set-up model,
even when the data that chose the entries differs. Adapter files store exactly these two vectors (the module lists
``indices`` in ``adapter_buffer_names``), never a dense delta.

Each selectable layer is wrapped in a :class:`SparseDeltaLayer` whose effective weight is
``base.weight + scatter(values[slice], indices[slice] - offset)``; the base weight never changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from cvft.errors import StrategyError

__all__ = ["SparseDelta", "SparseDeltaLayer"]


class SparseDelta(nn.Module):
    """The sparse update of a model: ``values`` (trainable) at flat ``indices`` (sorted, unique) of its weights.

    Args:
        sizes: Number of entries of each selectable weight tensor, in order.
        count: Number of updated entries (the budget).
        dtype: Dtype of ``values`` (that of the base weights).
        device: Device of both vectors.

    Example:
        >>> delta = SparseDelta([6, 4], count=3)
        >>> delta.select(torch.tensor([7, 1, 5]))
        >>> delta.indices.tolist(), delta.bounds()
        ([1, 5, 7], [(0, 2), (2, 3)])
        >>> with torch.no_grad():
        ...     _ = delta.values.copy_(torch.tensor([1.0, 2.0, 3.0]))
        >>> delta.dense(0).tolist(), delta.dense(1).tolist()
        ([0.0, 1.0, 0.0, 0.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0])
    """

    adapter_buffer_names = ("indices",)

    def __init__(
        self,
        sizes: Sequence[int],
        count: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.sizes = tuple(int(n) for n in sizes)
        self.offsets = tuple(sum(self.sizes[:i]) for i in range(len(self.sizes)))
        self.total = sum(self.sizes)
        if not 1 <= count <= self.total:
            raise StrategyError(f"sparse: cannot update {count} of {self.total} entries; the count must be >= 1.")
        self.values = nn.Parameter(torch.zeros(count, dtype=dtype, device=device))
        self.register_buffer("indices", torch.arange(count, device=device))
        self._bounds_key: tuple[int, int, torch.device] | None = None
        self._bounds: list[tuple[int, int]] = []

    @torch.no_grad()
    def select(self, positions: Tensor) -> None:
        """Update the entries at flat ``positions`` from now on, and reset every value to zero."""
        positions = positions.to(device=self.indices.device, dtype=torch.long).flatten().sort().values
        if positions.numel() != self.indices.numel():
            raise StrategyError(f"sparse: {positions.numel()} positions given for a budget of {self.indices.numel()}.")
        self._check(positions)
        self.indices.copy_(positions)
        self.values.zero_()

    def _check(self, indices: Tensor) -> None:
        in_range = bool(indices.numel() == 0 or (indices[0] >= 0 and indices[-1] < self.total))
        if not in_range or not bool((indices[1:] > indices[:-1]).all()):
            raise StrategyError(
                f"sparse: indices must be sorted, unique flat positions in [0, {self.total}); this adapter or "
                "checkpoint does not come from the same model and `targets`."
            )

    def bounds(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each tensor's slice of ``values``, recomputed whenever ``indices`` changes."""
        indices = self.indices
        key = (indices._version, indices.data_ptr(), indices.device)
        if key != self._bounds_key:
            self._check(indices)
            edges = torch.tensor([*self.offsets, self.total], device=indices.device)
            cuts = torch.searchsorted(indices, edges).tolist()
            self._bounds = list(zip(cuts[:-1], cuts[1:], strict=True))
            self._bounds_key = key
        return self._bounds

    def local_indices(self, position: int) -> Tensor:
        """Flat indices, within tensor number ``position``, of its updated entries (sorted)."""
        start, end = self.bounds()[position]
        return self.indices[start:end] - self.offsets[position]

    def dense(self, position: int) -> Tensor:
        """The update of tensor number ``position`` as a dense flat vector (differentiable in ``values``)."""
        start, end = self.bounds()[position]
        flat = self.values.new_zeros(self.sizes[position])
        return flat.index_put((self.local_indices(position),), self.values[start:end])

    def extra_repr(self) -> str:
        """Budget and number of selectable entries, for ``repr(model)``."""
        return f"count={self.values.numel()}, selectable={self.total}, tensors={len(self.sizes)}"


class SparseDeltaLayer(nn.Module):
    """A frozen ``nn.Linear`` or ``nn.Conv2d`` (subclasses included) whose weight gets a sparse update.

    The update lives in the model's :class:`SparseDelta` (``owner``), which is not a sub-module of this layer, so
    ``named_parameters()`` lists it once, at the model's root.

    Args:
        base: The layer whose ``weight`` is updated; its parameters are frozen.
        owner: The model's :class:`SparseDelta`.
        position: Index of ``base.weight`` among the owner's tensors.

    Example:
        >>> linear = nn.Linear(3, 2)
        >>> layer = SparseDeltaLayer(linear, SparseDelta([6], count=2), position=0)
        >>> x = torch.randn(4, 3)
        >>> torch.equal(layer(x), linear(x))  # the update starts at zero
        True
    """

    def __init__(self, base: nn.Module, owner: SparseDelta, position: int) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise StrategyError(f"sparse: can update nn.Linear and nn.Conv2d weights, got {type(base).__name__}.")
        if base.weight.numel() != owner.sizes[position]:
            raise StrategyError(f"sparse: weight has {base.weight.numel()} entries, expected {owner.sizes[position]}.")
        self.base = base
        self.position = position
        object.__setattr__(self, "owner", owner)  # a plain reference: the owner is registered at the model's root
        for param in base.parameters():
            param.requires_grad_(False)

    def effective_weight(self) -> Tensor:
        """``base.weight`` plus the sparse update (the base weight itself when this layer has no updated entry)."""
        weight = self.base.weight
        start, end = self.owner.bounds()[self.position]
        if start == end:
            return weight
        return weight + self.owner.dense(self.position).view_as(weight).to(weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """The base layer's computation with the effective weight."""
        weight = self.effective_weight()
        base = self.base
        if weight is base.weight:
            return base(x)
        if type(base) is nn.Linear:
            return F.linear(x, weight, base.bias)
        if type(base) is nn.Conv2d:
            return base._conv_forward(x, weight, base.bias)
        # subclasses (timm's Conv2dSame, StdConv2d ...) keep their own forward, with the effective weight swapped in
        return functional_call(base, {"weight": weight}, (x,))

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """Fold the update into ``base.weight`` and return the base layer (which then computes what this did)."""
        weight = self.effective_weight()
        if weight is not self.base.weight:
            self.base.weight.copy_(weight)
        return self.base

    def extra_repr(self) -> str:
        """Position among the sparse tensors and number of updated entries."""
        start, end = self.owner.bounds()[self.position]
        return f"position={self.position}, updated={end - start}/{self.base.weight.numel()}"
