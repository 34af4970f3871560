"""``block_expansion`` and ``filter_select`` (global Taylor selection) on 2 gloo CPU processes.

Each rank sees different images. Expansion: the inserted blocks exist identically on both ranks, train in step, and
every original weight stays bit-identical. Filter selection: the ranks calibrate on different data, yet train the
same rows (the Taylor scores are summed across ranks), and the replicas stay identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_kit import ddp_trainer, rank_loader, run_ranks, state_copy

from cvft.strategies.block_expansion import inserted_block_names
from cvft.strategies.filter_select import filter_selection
from cvft.tasks import ImageClassifier

EXPANSION = {"name": "block_expansion", "num_blocks": 2}
SELECTION = {"name": "filter_select", "k": 0.2, "criterion": "taylor", "scope": "global", "calibration_batches": 2}


def _fit(rank: int, out: Path, backbone: str, spec: dict, size: int) -> dict:
    torch.manual_seed(0)  # identical replicas
    model = ImageClassifier(backbone, pretrained=False, num_classes=4, strategies=[spec], lr=1e-2, warmup_epochs=0)
    start = state_copy(model)
    ddp_trainer(out / spec["name"], max_epochs=1).fit(model, rank_loader(rank, size))  # every rank sees other images
    return {"start": start, "state": state_copy(model), "model": model}


def _worker(rank: int, out: Path) -> None:
    expanded = _fit(rank, out, "test_vit", EXPANSION, 32)
    selected = _fit(rank, out, "test_resnet", SELECTION, 32)
    result = {
        "expansion": {k: expanded[k] for k in ("start", "state")},
        "inserted": inserted_block_names(expanded["model"].backbone),
        "selection": {k: selected[k] for k in ("start", "state")},
        "rows": filter_selection(selected["model"].backbone),
    }
    torch.save(result, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("expansion_selection_ddp"))


@pytest.mark.slow  # one 2-process spawn (module fixture): ~30-40 s on 2 shared cores
def test_expansion_replicas_identical_originals_frozen_and_copies_trained(ranks):
    rank0, rank1 = ranks
    assert rank0["inserted"] == rank1["inserted"] and len(rank0["inserted"]) == 2
    start, state = rank0["expansion"]["start"], rank0["expansion"]["state"]
    for name, value in state.items():
        assert torch.equal(value, rank1["expansion"]["state"][name]), f"{name} differs between ranks"
    new = tuple(f"backbone.{block}." for block in rank0["inserted"])
    moved = {name for name, value in start.items() if not torch.equal(state[name], value)}
    assert moved, "nothing trained"
    assert all(name.startswith(new) or name.startswith("backbone.head.") for name in moved), moved
    assert any(name.startswith(new) for name in moved), "the inserted blocks did not train"


@pytest.mark.slow  # one 2-process spawn (module fixture): ~30-40 s on 2 shared cores
def test_global_taylor_selection_is_shared_and_replicas_stay_identical(ranks):
    rank0, rank1 = ranks
    assert rank0["rows"].keys() == rank1["rows"].keys()
    for name, rows in rank0["rows"].items():
        assert torch.equal(rows, rank1["rows"][name]), f"{name}: the ranks train different rows"
    for name, value in rank0["selection"]["state"].items():
        assert torch.equal(value, rank1["selection"]["state"][name]), f"{name} differs between ranks"
    start, state = rank0["selection"]["start"], rank0["selection"]["state"]
    base = [n for n in start if n.endswith(".base.weight")]
    assert base and all(torch.equal(state[n], start[n]) for n in base), "a frozen base weight moved"
