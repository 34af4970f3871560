"""Gradient averaging for parameters unfrozen after DistributedDataParallel wrapped the model.

DDP registers its gradient hooks only on parameters that require gradients when it wraps the model. A parameter
unfrozen later (gradual unfreezing) would train on each rank's local gradient and the replicas would drift apart.
:class:`LateGradientSync` averages exactly those gradients after backward.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


class LateGradientSync:
    """Average gradients of parameters that DDP does not synchronise."""

    def __init__(self) -> None:
        self._synced_by_ddp: set[int] | None = None

    def capture(self, module: nn.Module) -> None:
        """Record which parameters DDP synchronises (call right after wrapping, e.g. in ``on_fit_start``)."""
        self._synced_by_ddp = {id(p) for p in module.parameters() if p.requires_grad}

    def sync(self, module: nn.Module) -> int:
        """All-reduce (mean) the gradients DDP missed; returns how many tensors were averaged."""
        if self._synced_by_ddp is None or not (dist.is_available() and dist.is_initialized()):
            return 0
        world = dist.get_world_size()
        if world == 1:
            return 0
        late = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in self._synced_by_ddp]
        for grad in late:
            dist.all_reduce(grad)
            grad.div_(world)
        return len(late)
