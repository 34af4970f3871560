"""Sparse fine-tuning with Fisher calibration on 2 gloo CPU processes: every rank trains rank 0's entries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_kit import ddp_trainer, rank_loader, run_ranks, state_copy

from cvft.strategies.sparse import SparseFineTune, sparse_layers
from cvft.tasks import ImageClassifier

BUDGET = 40


def _worker(rank: int, out: Path) -> None:
    torch.manual_seed(0)  # identical replicas
    spec = {"name": "sparse", "criterion": "fisher", "budget": BUDGET, "calibration_batches": 2}
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=4, strategies=[spec], lr=1e-2, warmup_epochs=0)
    strategy = next(s for s in model.strategy_stack if isinstance(s, SparseFineTune))
    local: dict[str, torch.Tensor] = {}
    calibrate = strategy.calibrate

    def recording_calibrate(*args, **kwargs) -> None:
        calibrate(*args, **kwargs)
        local["indices"] = model.backbone.sparse_delta.indices.clone()  # this rank's own choice, before sharing

    strategy.calibrate = recording_calibrate
    setup = model.setup

    def recording_setup(stage: str) -> None:  # calibrate_before_fit runs here, before DDP wraps (and syncs) the model
        setup(stage)
        local["after_setup"] = model.backbone.sparse_delta.indices.clone()

    model.setup = recording_setup
    start = state_copy(model)
    ddp_trainer(out / "fit", max_epochs=1).fit(model, rank_loader(rank))  # every rank calibrates on different data
    torch.save({**local, "start": start, "state": state_copy(model)}, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("sparse_ddp"))


@pytest.mark.slow  # one 2-process spawn (module fixture): ~20-30 s on 2 shared cores
def test_every_rank_trains_the_entries_rank_zero_chose(ranks):
    rank0, rank1 = ranks
    assert not torch.equal(rank0["indices"], rank1["indices"]), "the ranks' own Fisher choices must differ here"
    for rank in ranks:
        assert torch.equal(rank["after_setup"], rank0["indices"]), "calibrate_before_fit shares rank 0's choice"
        assert torch.equal(rank["state"]["backbone.sparse_delta.indices"], rank0["indices"])


@pytest.mark.slow  # one 2-process spawn (module fixture): ~20-30 s on 2 shared cores
def test_replicas_identical_and_frozen_entries_bit_identical_to_the_start(ranks):
    rank0, rank1 = ranks
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), f"{name} differs between ranks"
    start, state = rank0["start"], rank0["state"]
    trainable = {"backbone.sparse_delta.values", "backbone.fc.weight", "backbone.fc.bias"}
    for name, value in start.items():  # base weights, BatchNorm statistics included
        if name not in trainable and name != "backbone.sparse_delta.indices":
            assert torch.equal(state[name], value), f"{name} moved"
    values = state["backbone.sparse_delta.values"]
    assert values.numel() == BUDGET and bool(values.ne(0).any()), "the selected entries trained"


@pytest.mark.slow  # one 2-process spawn (module fixture): ~20-30 s on 2 shared cores
def test_effective_weights_move_only_at_the_chosen_entries(ranks):
    rank0 = ranks[0]
    torch.manual_seed(0)
    spec = {"name": "sparse", "criterion": "fisher", "budget": BUDGET, "calibration_batches": 2}
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=4, strategies=[spec])
    model.load_state_dict(rank0["state"])
    chosen = set(rank0["indices"].tolist())
    moved: set[int] = set()
    for layer in sparse_layers(model.backbone).values():
        offset = layer.owner.offsets[layer.position]
        change = (layer.effective_weight() - layer.base.weight).flatten()
        moved |= {offset + i for i in change.nonzero().flatten().tolist()}
    assert moved and moved <= chosen
