"""SupCon under DDP: negatives from the global batch, and gradients equal to one process on the concatenated batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cvft.strategies.aux import get_aux_module
from cvft.strategies.contrastive import SupCon, supcon_loss
from cvft.strategies.outputs import StepOutputs

FEATURES = 6


class _Backbone(nn.Module):
    """Stands in for a timm model: a feature layer, a classifier, and the ``num_features`` contract."""

    num_features = FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, FEATURES)
        self.fc = nn.Linear(FEATURES, 3)


class _ContrastiveStep(nn.Module):
    """One training step's SupCon term, as a module so that DDP wraps the whole computation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # identical replicas on every rank and in the single-process reference
        self.model = _Backbone()
        self.strategy = SupCon(out_dim=5, temperature=0.2, base_temperature=0.1)
        self.strategy.setup(self.model)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features = self.model.body(inputs)
        logits = self.model.fc(features)
        outputs = StepOutputs(logits, inputs, targets, features, num_views=2)
        return self.strategy.loss_terms(self.model, None, outputs)["contrastive"] + 0.0 * logits.sum()


def _data(sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-rank (inputs, labels); labels shared across ranks so that positives cross process boundaries."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 4, generator=generator), torch.arange(n) % 3) for n in sizes]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, cases: list[tuple[int, ...]], results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for sizes in cases:
            step = _ContrastiveStep()
            ddp = nn.parallel.DistributedDataParallel(step)
            inputs, labels = _data(sizes)[rank]
            loss = ddp(inputs, labels)
            loss.backward()  # DDP averages the gradients over the ranks
            grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
            results[(sizes, rank)] = (loss.item(), grads)
    finally:
        dist.destroy_process_group()


CASES = {"equal": (8, 8), "uneven": (8, 6)}


@pytest.fixture(scope="module")
def ddp_results() -> dict:
    """Both cases from one 2-process gloo run (starting processes dominates the cost)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), list(CASES.values()), results), nprocs=2, join=True)
        return dict(results)


def _single_process(sizes: tuple[int, ...]) -> tuple[float, dict[str, torch.Tensor]]:
    step = _ContrastiveStep()
    parts = _data(sizes)
    inputs = torch.cat([x for x, _ in parts])
    labels = torch.cat([y for _, y in parts])
    loss = step(inputs, labels)
    loss.backward()
    # the strategy's term is plain SupCon on the concatenated batch
    projection = get_aux_module(step.model, "supcon_projection")
    reference = supcon_loss(projection(step.model.body(inputs)), labels, 0.2, 0.1)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    return loss.item(), {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_supcon_matches_single_process_on_concatenated_batch(ddp_results, case):
    sizes = CASES[case]
    results = {rank: ddp_results[(sizes, rank)] for rank in range(2)}
    expected_loss, expected_grads = _single_process(sizes)
    (loss0, grads0), (loss1, grads1) = results[0], results[1]
    # each rank returns its anchors' share scaled by the world size: the ranks' mean is the global loss
    assert (loss0 + loss1) / 2 == pytest.approx(expected_loss, rel=1e-5)
    assert loss0 != pytest.approx(loss1), "ranks hold different anchors"
    assert set(grads0) == set(expected_grads)
    assert any(name.startswith("model.cvft_aux.supcon_projection") for name in grads0)
    for name, grad in expected_grads.items():
        assert torch.allclose(grads0[name], grad, atol=1e-6), name
        assert torch.allclose(grads1[name], grad, atol=1e-6), name
