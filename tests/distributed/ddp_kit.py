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
