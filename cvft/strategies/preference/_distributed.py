"""Averaging across DDP processes for objectives that compute their own gradients (PPO, TRPO, baselines).

Every function is the identity in a single process. Under ``torch.distributed`` each rank must call them in the same
order with tensors of the same shapes; with equal per-rank batch sizes the averages equal one process's result on the
concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "mean_across_ranks", "average_gradients", "global_mean_std"]


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_across_ranks(value: Tensor) -> Tensor:
    """The mean of ``value`` over the ranks (a new tensor; the input is left alone)."""
    value = value.detach().clone()
    world = world_size()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value


def average_gradients(grads: list[Tensor]) -> list[Tensor]:
    """Each gradient averaged over the ranks, in one flat all-reduce."""
    if world_size() == 1 or not grads:
        return grads
    flat = mean_across_ranks(torch.cat([g.reshape(-1) for g in grads]))
    out, start = [], 0
    for grad in grads:
        out.append(flat[start : start + grad.numel()].view_as(grad))
        start += grad.numel()
    return out


def global_mean_std(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) standard deviation of ``values`` pooled over every rank's rows."""
    values = values.detach().float().reshape(-1)
    stats = torch.stack([values.sum(), (values * values).sum(), values.new_tensor(float(values.numel()))])
    if world_size() > 1:
        dist.all_reduce(stats)
    total, squares, count = stats
    mean = total / count
    variance = (squares - count * mean * mean) / (count - 1).clamp_min(1.0)
    return mean, variance.clamp_min(0.0).sqrt()
