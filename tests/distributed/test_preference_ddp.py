"""PPO and TRPO under 2 gloo processes: the same update as one process on the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_kit import run_ranks
from torch import nn

from cvft.strategies.preference import Rollout, ppo_update, trpo_step
from cvft.strategies.preference._distributed import global_mean_std
from cvft.strategies.preference.policy import action_log_probs

ROWS, FEATURES, CLASSES = 8, 4, 3


def _policy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2 * ROWS, FEATURES, generator=generator)
    actions = torch.randint(CLASSES, (2 * ROWS,), generator=generator)
    rewards = (actions == 2).float() + 0.1 * torch.randn(2 * ROWS, generator=generator)
    return images, actions, rewards


def _rollout(model: nn.Module, images, actions, rewards) -> Rollout:
    with torch.no_grad():
        logits = model(images)
    mean, std = global_mean_std(rewards)  # pooled over the ranks
    advantages = (rewards - mean) / (std + 1e-8)
    return Rollout(images, actions, logits, action_log_probs(logits, actions), rewards, advantages, logits.clone())


def _updates(model_rows: slice) -> dict[str, torch.Tensor]:
    images, actions, rewards = (t[model_rows] for t in _batch())
    results = {}
    model = _policy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    rollout = _rollout(model, images, actions, rewards)
    ppo_update(model, rollout, lambda: (optimizer.step(), optimizer.zero_grad()), epochs=3, kl_coef=0.1)
    results.update({f"ppo.{n}": p.detach().clone() for n, p in model.named_parameters()})
    model = _policy()
    trpo_step(model, _rollout(model, images, actions, rewards), max_kl=0.01)
    results.update({f"trpo.{n}": p.detach().clone() for n, p in model.named_parameters()})
    return results


def _rank(rank: int, out: Path) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(_updates(slice(rank * ROWS, (rank + 1) * ROWS)), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # one 2-process spawn: ~10 s on 2 shared cores
def test_ppo_and_trpo_under_ddp_match_one_process(tmp_path):
    ranks = run_ranks(_rank, tmp_path / "ranks")
    single = _updates(slice(0, 2 * ROWS))
    for name, value in single.items():
        assert torch.allclose(ranks[0][name], ranks[1][name], atol=1e-6), name
        assert torch.allclose(ranks[0][name], value, atol=1e-5), name
    assert not torch.allclose(single["ppo.weight"], _policy().weight)
    assert not torch.allclose(single["trpo.weight"], _policy().weight)
