"""Run a function on 2 gloo CPU processes, as Lightning's ``ddp`` strategy under ``torchrun`` would, and collect files.

Each rank gets the environment of an externally launched job (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_*``),
so ``Trainer(strategy="ddp", devices=2)`` inside a rank joins the group instead of starting processes. Ranks write
their results with ``torch.save`` under a folder of the test's ``tmp_path``; the test compares them in the parent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy
from quiet_trainer import make_trainer
from torch import nn
from torch.utils.data import DataLoader

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], out: str, args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)  # two ranks on two shared cores
    fn(rank, Path(out), *args)


def run_ranks(fn: Callable[..., Any], out: Path, *args: Any, world: int = WORLD) -> list[Any]:
    """Run ``fn(rank, out, *args)`` on ``world`` processes; return what each rank saved as ``out / rank<r>.pt``."""
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(world, free_port(), fn, str(out), args), nprocs=world, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def ddp_trainer(root: Path, find_unused_parameters: bool = False, **kwargs: Any) -> pl.Trainer:
    """A quiet 2-process CPU ``ddp`` Trainer (call inside a rank of :func:`run_ranks`)."""
    strategy = DDPStrategy(find_unused_parameters=find_unused_parameters, process_group_backend="gloo")
    options: dict[str, Any] = dict(devices=WORLD, strategy=strategy, default_root_dir=root, max_epochs=None)
    return make_trainer(**{**options, **kwargs})


def rank_loader(rank: int, size: int = 32) -> DataLoader:
    """Eight random ``size`` px images with labels of 4 classes, in batches of two: different on every rank."""
    generator = torch.Generator().manual_seed(100 + rank)
    images = 2.0 * torch.randn(8, 3, size, size, generator=generator) + rank
    labels = torch.randint(0, 4, (8,), generator=generator)
    return DataLoader(list(zip(images, labels, strict=True)), batch_size=2)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor in ``model.state_dict()``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
