"""PPO and TRPO through ``ImageClassifier`` under a 2-process gloo ``ddp`` Lightning fit (manual optimisation).

Actions are sampled from the global RNG, which every rank seeds alike, so a rank's samples differ from those one
process would draw for the concatenated batch. The single-process reference therefore replays the ranks' rollouts: it
fits on the concatenation of the ranks' batches, step by step, with the ranks' sampled actions substituted for its
own draws. Everything else (rewards, advantages pooled over the ranks, the PPO / TRPO update, the optimizer) runs as
in any fit, so equal parameters mean that the DDP fit took the one-process update of the gathered rollouts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_kit import ddp_trainer, run_ranks
from quiet_trainer import make_trainer
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import cvft.strategies.preference.rollout as rollout_module
from cvft.tasks import ImageClassifier

CLASSES, ROWS, STEPS = 3, 4, 2  # per-rank batch rows, training batches
COST = [[0, 1, 1], [5, 0, 1], [1, 1, 0]]
OBJECTIVES = {
    "ppo": {"name": "ppo", "reward": {"cost_matrix": COST}, "epochs": 2, "kl_coef": 0.1},
    "trpo": {"name": "trpo", "reward": {"cost_matrix": COST}, "max_kl": 0.05, "kl_coef": 0.1},
}


def _policy(objective: str) -> ImageClassifier:
    torch.manual_seed(0)  # identical replicas on every rank and in the single-process reference
    return ImageClassifier(
        "test_resnet", pretrained=False, num_classes=CLASSES, strategies=["linear_probe", OBJECTIVES[objective]],
        optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.0, warmup_epochs=0,
    )  # fmt: skip


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2 * ROWS * STEPS, 3, 32, 32, generator=generator)
    return TensorDataset(images, torch.randint(CLASSES, (len(images),), generator=generator))


def _recording_sampler(record: list[dict[str, Tensor]]) -> Any:
    """``sample_actions`` that also records the actions drawn for each rollout."""
    sample = rollout_module.sample_actions

    def recording(logits: Tensor, multi_label: bool = False, generator: Any = None) -> Tensor:
        actions = sample(logits, multi_label, generator)
        record.append({"actions": actions.clone()})
        return actions

    return recording


def _fit_rank(rank: int, out: Path, objective: str) -> dict[str, Any]:
    """One rank's ``ddp`` fit of ``objective``: its start and end states, its batches and its sampled actions."""
    record: list[dict[str, Tensor]] = []
    sample = rollout_module.sample_actions
    rollout_module.sample_actions = _recording_sampler(record)
    try:
        model = _policy(objective)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen: list[tuple[Tensor, Tensor]] = []
        model.on_train_batch_start = lambda batch, index: seen.append((batch[0].clone(), batch[1].clone()))
        trainer = ddp_trainer(out / f"{objective}{rank}", max_epochs=1)
        trainer.fit(model, DataLoader(_data(), batch_size=ROWS))
    finally:
        rollout_module.sample_actions = sample
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"start": start, "state": state, "seen": seen, "record": record, "steps": trainer.global_step}


def _worker(rank: int, out: Path) -> None:
    """Every objective's fit in turn, in one process group (starting processes dominates the cost)."""
    torch.save({objective: _fit_rank(rank, out, objective) for objective in OBJECTIVES}, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, dict[str, Any]]]:
    """What each rank saved, per objective, from one 2-process run."""
    return run_ranks(_worker, tmp_path_factory.mktemp("preference_fit_ddp"))


def _replay(
    ranks: list[dict[str, Any]], objective: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> ImageClassifier:
    """One process, fitted on the ranks' concatenated batches with the ranks' sampled actions."""
    images = torch.cat([torch.cat([rank["seen"][step][0] for rank in ranks]) for step in range(STEPS)])
    targets = torch.cat([torch.cat([rank["seen"][step][1] for rank in ranks]) for step in range(STEPS)])
    actions: Iterator[Tensor] = iter(
        [torch.cat([rank["record"][step]["actions"] for rank in ranks]) for step in range(STEPS)]
    )
    replayed = lambda logits, multi_label=False, generator=None: next(actions)  # noqa: E731
    monkeypatch.setattr(rollout_module, "sample_actions", replayed)
    model = _policy(objective)
    trainer = make_trainer(default_root_dir=root, max_epochs=1)
    trainer.fit(model, DataLoader(TensorDataset(images, targets), batch_size=2 * ROWS))
    assert next(actions, None) is None, "one rollout per gathered batch"
    assert trainer.global_step == ranks[0]["steps"]
    return model


@pytest.mark.slow  # one 2-process spawn (module fixture) and a replay per objective: ~30-60 s on 2 shared cores
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_ddp_fit_equals_one_process_on_the_gathered_rollouts(tmp_path, monkeypatch, ranks, objective):
    rank0, rank1 = (rank[objective] for rank in ranks)
    assert len(rank0["seen"]) == len(rank1["seen"]) == STEPS
    assert not torch.equal(rank0["seen"][0][0], rank1["seen"][0][0]), "the ranks must train on different rows"
    expected_steps = STEPS * OBJECTIVES[objective].get("epochs", 1)
    assert rank0["steps"] == rank1["steps"] == expected_steps
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), f"{name} differs between ranks"
    changed = {n for n, v in rank0["state"].items() if not torch.equal(v, rank0["start"][n])}
    assert changed == {"backbone.fc.weight", "backbone.fc.bias"}

    single = _replay([rank0, rank1], objective, tmp_path / "single", monkeypatch).state_dict()
    for name, value in rank0["state"].items():
        assert torch.allclose(value, single[name], atol=1e-5), name
