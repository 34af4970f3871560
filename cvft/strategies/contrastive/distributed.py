"""SupCon over the global batch when training runs on several processes (DDP, FSDP).

Each process projects its own images, then gathers every process's normalised projections and labels with a
differentiable all-gather, so that the negatives (and positives) come from the whole global batch. Each process
computes the terms of *its own* anchors against all gathered rows.

Gradient scaling: DDP averages gradients over the ``W`` processes, and the all-gather's backward sums, onto each
process's own rows, the gradients every process's loss sent them. With ``L`` the single-process loss on the
concatenated batch (mean of ``l_i`` over its ``N`` anchors that have a positive), process ``r`` therefore returns
``W / N * sum(l_i for its anchors)``: the sum over processes is ``W * L`` and DDP's average turns the gradient into
exactly ``dL/dtheta``. The returned values average to ``L`` over the processes (what a ``sync_dist`` log shows).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from cvft.strategies.contrastive.loss import check_class_labels, supcon_anchor_losses

__all__ = ["gather_batch", "distributed_supcon_loss"]


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_batch(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """Concatenate every process's ``embeddings`` (differentiably) and ``labels``, in rank order.

    Processes may hold different numbers of rows (a last, smaller batch): rows are padded for the collective and the
    padding is cut off again.

    Returns:
        ``(all_embeddings, all_labels, offset)``, where ``offset`` is the first row of this process's own rows.
        Without an initialised process group (or with one process) the inputs come back with offset 0.

    Example:
        >>> import torch
        >>> z, y, offset = gather_batch(torch.ones(2, 3), torch.tensor([0, 1]))
        >>> z.shape, y.tolist(), offset
        (torch.Size([2, 3]), [0, 1], 0)
    """
    world = _distributed_world()
    if world == 1:
        return embeddings, labels, 0
    from torch.distributed.nn.functional import all_gather

    rank = dist.get_rank()
    size = torch.tensor([embeddings.shape[0]], device=embeddings.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    pad = longest - embeddings.shape[0]
    padded = F.pad(embeddings, (0, 0, 0, pad)) if pad else embeddings
    padded_labels = F.pad(labels, (0, pad), value=-1) if pad else labels
    gathered = all_gather(padded.contiguous())
    gathered_labels = [torch.empty_like(padded_labels) for _ in range(world)]
    dist.all_gather(gathered_labels, padded_labels.contiguous())
    all_embeddings = torch.cat([rows[:n] for rows, n in zip(gathered, counts, strict=True)])
    all_labels = torch.cat([rows[:n] for rows, n in zip(gathered_labels, counts, strict=True)])
    return all_embeddings, all_labels, sum(counts[:rank])


def distributed_supcon_loss(
    embeddings: Tensor,
    labels: Tensor,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    gather: bool = True,
) -> Tensor:
    """This process's share of the SupCon loss of the global batch, scaled for gradient averaging (see module doc).

    Without a process group (or with ``gather=False``) it equals :func:`~cvft.strategies.contrastive.supcon_loss`
    on the local batch.

    Args:
        embeddings: ``(n, D)`` this process's projections (all views as rows); normalised here, in float32.
        labels: ``(n,)`` class indices, one per row.
        temperature: Softmax temperature ``T``.
        base_temperature: Scale the loss by ``T / base_temperature`` (``None``: factor 1).
        gather: Contrast with every process's rows (the global batch); ``False`` keeps each process's batch alone.

    Example:
        >>> import torch
        >>> from cvft.strategies.contrastive import supcon_loss
        >>> z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> torch.allclose(distributed_supcon_loss(z, y), supcon_loss(z, y))
        True
    """
    labels = check_class_labels(labels, embeddings.shape[0])
    z = F.normalize(embeddings.float(), dim=1)
    world = _distributed_world() if gather else 1
    if world == 1:
        all_z, all_labels, offset = z, labels, 0
    else:
        all_z, all_labels, offset = gather_batch(z, labels)
    if len(all_z) < 2:
        return z.sum() * 0.0
    rows = torch.arange(offset, offset + len(z), device=z.device)
    losses, _ = supcon_anchor_losses(z, all_z, labels, all_labels, rows, temperature)
    same = all_labels[:, None] == all_labels[None, :]
    anchors_with_positive = (same.sum(dim=1) > 1).sum().clamp(min=1)
    scale = temperature / (base_temperature if base_temperature is not None else temperature)
    return scale * world * losses.sum() / anchors_with_positive
