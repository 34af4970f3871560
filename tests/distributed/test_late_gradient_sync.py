"""Parameters unfrozen after DDP wrapped the model must still get rank-averaged gradients."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cvft.strategies._ddp import LateGradientSync


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        model[0].requires_grad_(False)  # frozen when DDP wraps
        ddp = nn.parallel.DistributedDataParallel(model)
        sync = LateGradientSync()
        sync.capture(model)
        model[0].requires_grad_(True)  # unfrozen later, as gradual unfreezing does
        torch.manual_seed(100 + rank)  # each rank sees different data
        ddp(torch.randn(8, 4)).pow(2).sum().backward()
        synced = sync.sync(model)
        results[rank] = (synced, model[0].weight.grad.clone(), model[1].weight.grad.clone())
    finally:
        dist.destroy_process_group()


def test_late_unfrozen_gradients_are_averaged_across_ranks():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    (n0, late0, ddp0), (n1, late1, ddp1) = results[0], results[1]
    assert n0 == n1 == 2  # the late layer's weight and bias needed help, nothing else
    assert torch.allclose(ddp0, ddp1), "DDP itself averages the parameters it knew about"
    assert torch.allclose(late0, late1), "late-unfrozen gradients must be identical on all ranks after sync"


def test_sync_is_a_no_op_without_distributed():
    model = nn.Linear(2, 2)
    sync = LateGradientSync()
    sync.capture(model)
    model(torch.randn(3, 2)).sum().backward()
    assert sync.sync(model) == 0
