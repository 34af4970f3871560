"""The frozen reference policy ``pi_ref`` of the KL penalty and of DPO: the model as training found it.

By default it is a *snapshot* of the model at the first training step (after any adapter or checkpoint was loaded:
the starting supervised checkpoint). Only what can change is copied: the tensors that are trainable then and the
buffers (BatchNorm statistics); the frozen parameters are shared with the live model, since nothing changes them.
The reference's logits come from :func:`torch.func.functional_call` on the live model with the snapshot in place, in
eval mode and under ``torch.no_grad``. So for LoRA or a linear probe the reference costs a few tensors, not a second
network. The snapshot is kept on the strategy object, outside the model: not optimised, not in the model's state
dict, not wrapped by DDP; it travels with the strategy's own state (``cvft_strategies`` in a checkpoint) so that a
resumed fit keeps the same reference.

A reference can also be a separate network (a loaded ``nn.Module``, a cvft ``.ckpt`` or adapter, or a timm name), read
like the distillation teacher (:mod:`cvft.strategies.distillation.teacher`) and frozen; it is then not saved at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.base import eval_mode
from cvft.strategies.distillation.teacher import freeze_teacher, teacher_loader

__all__ = ["ReferencePolicy"]


class ReferencePolicy:
    """A frozen reference policy: a snapshot of the model's changing tensors, or a separate frozen network.

    Args:
        source: ``None`` (snapshot the trained model at its first use), a loaded network, or what the teacher loader
            reads (a timm name, a cvft ``.ckpt`` or adapter ``.safetensors``).
        weights: Base weights of a timm-name or adapter reference.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> reference = ReferencePolicy()
        >>> x = torch.randn(4, 3)
        >>> torch.equal(reference.logits(model, x), model(x).detach())
        True
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> torch.equal(reference.logits(model, x), model(x).detach())  # still the snapshot
        False
    """

    def __init__(self, source: str | nn.Module | None = None, weights: str | None = None) -> None:
        self.source = source
        self.weights = weights
        self._network: nn.Module | None = freeze_teacher(source) if isinstance(source, nn.Module) else None
        self.snapshot: dict[str, Tensor] | None = None

    @property
    def is_snapshot(self) -> bool:
        """Whether the reference is a snapshot of the trained model (not a separate network)."""
        return self.source is None

    def take_snapshot(self, model: nn.Module) -> None:
        """Copy ``model``'s trainable parameters and its buffers as the reference (done at first use if not yet)."""
        with torch.no_grad():
            snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            snapshot.update({n: b.detach().clone() for n, b in model.named_buffers()})
        self.snapshot = snapshot

    def network(self) -> nn.Module:
        """The separate reference network (loaded on first use)."""
        if self._network is None:
            if not isinstance(self.source, str):
                raise StrategyError("This reference is a snapshot of the trained model, not a separate network.")
            self._network = teacher_loader().load(self.source, self.weights, self.weights is None)
        return self._network

    def logits(self, model: nn.Module, images: Tensor) -> Tensor:
        """``pi_ref``'s logits for ``images`` (no gradient, eval mode); ``model`` is the policy being trained."""
        if not self.is_snapshot:
            network = self.network()
            first = next(network.parameters(), None)
            if first is not None and first.device != images.device:
                network.to(images.device)
            if network.training:
                network.eval()
            with torch.no_grad():
                return network(images).float()
        if self.snapshot is None:
            self.take_snapshot(model)
        assert self.snapshot is not None
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        late = trainable - set(self.snapshot)
        if late:
            raise StrategyError(
                f"The reference snapshot was taken before {sorted(late)[:3]} became trainable (gradual unfreezing?): "
                "a preference objective needs the trainable set fixed during the fit; drop the unfreezing schedule."
            )
        device = images.device
        for name, tensor in list(self.snapshot.items()):
            if tensor.device != device:
                self.snapshot[name] = tensor.to(device)
        with eval_mode(model), torch.no_grad():
            return torch.func.functional_call(model, self.snapshot, (images,), strict=False).float()

    def state_dict(self) -> dict[str, Any]:
        """The snapshot (CPU tensors), so that a resumed fit keeps its reference; empty for a separate network."""
        if self.snapshot is None:
            return {}
        return {"snapshot": {name: tensor.cpu() for name, tensor in self.snapshot.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "snapshot" in state:
            self.snapshot = {name: tensor.clone() for name, tensor in state["snapshot"].items()}
