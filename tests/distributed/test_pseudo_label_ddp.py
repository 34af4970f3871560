"""pseudo_label on 2 gloo CPU processes: each rank draws its own shard of the target folder; replicas stay identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_kit import ddp_trainer, run_ranks
from PIL import Image
from torch.utils.data import DataLoader

from cvft.strategies.domain import CyclingBatchSampler, PseudoLabel
from cvft.tasks import ImageClassifier

TARGETS = 10  # target images; 5 per rank, drawn in batches of 2, 2 and 1: one pass is 3 steps
STEPS = 3


def _write_targets(folder: Path) -> None:
    """Image ``i`` is uniformly grey at level ``20 * i``, so a normalised pixel gives its index back."""
    folder.mkdir(parents=True)
    for i in range(TARGETS):
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(folder / f"{i:02d}.png")


def _ids(images: torch.Tensor) -> list[int]:
    return [round(float((image[0, 16, 16] * 0.5 + 0.5) * 255 / 20)) for image in images]


def _worker(rank: int, out: Path, target_root: str) -> None:
    torch.manual_seed(0)
    spec = {"name": "pseudo_label", "target_root": target_root, "threshold": 0.0, "batch_size": 2, "image_size": 32}
    model = ImageClassifier(
        "test_resnet", pretrained=False, num_classes=4, strategies=["linear_probe", spec], lr=1e-2, warmup_epochs=0
    )
    strategy = next(s for s in model.strategy_stack if isinstance(s, PseudoLabel))
    drawn: list[list[int]] = []
    draw = strategy.next_target_batch

    def recording_draw() -> torch.Tensor:
        images = draw()
        drawn.append(_ids(images))
        return images

    strategy.next_target_batch = recording_draw
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)  # the same source data on both ranks; Lightning shards it
    images, labels = torch.randn(4 * STEPS, 3, 32, 32, generator=generator), torch.arange(4 * STEPS) % 4
    source = list(zip(images, labels, strict=True))  # 2 samples per rank and step
    trainer = ddp_trainer(out / "fit", max_epochs=1)
    trainer.fit(model, DataLoader(source, batch_size=2))
    torch.save(
        {
            "drawn": drawn,
            "start": start,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "loss": float(trainer.callback_metrics["train/pseudo_label/ce"]),
            "saved_position": strategy.state_dict()["drawn"],
        },
        out / f"rank{rank}.pt",
    )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("pseudo_label_ddp")
    _write_targets(root / "target")
    return run_ranks(_worker, root / "runs", str(root / "target"))


@pytest.mark.slow  # one 2-process spawn (module fixture): ~20-30 s on 2 shared cores
def test_ranks_draw_disjoint_target_shards_that_cover_the_folder(ranks):
    rank0, rank1 = ranks
    assert [len(b) for b in rank0["drawn"]] == [len(b) for b in rank1["drawn"]] == [2, 2, 1]
    seen0, seen1 = sum(rank0["drawn"], []), sum(rank1["drawn"], [])
    assert not set(seen0) & set(seen1), "each rank must draw its own target images"
    assert sorted(seen0 + seen1) == list(range(TARGETS)), "one pass of both ranks covers the target folder once"
    assert rank0["saved_position"] == rank1["saved_position"] == STEPS, "checkpoints resume every rank's stream"


@pytest.mark.slow  # one 2-process spawn (module fixture): ~20-30 s on 2 shared cores
def test_replicas_stay_identical_and_the_pseudo_label_term_trains_the_head(ranks):
    rank0, rank1 = ranks
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), f"{name} differs between ranks"
    assert torch.equal(rank0["start"]["backbone.fc.weight"], rank1["start"]["backbone.fc.weight"])
    assert not torch.equal(rank0["state"]["backbone.fc.weight"], rank0["start"]["backbone.fc.weight"])
    assert np.isfinite(rank0["loss"]) and rank0["loss"] > 0


@pytest.mark.parametrize("size", [9, 10])
def test_cycling_sampler_shards_each_pass_like_a_distributed_sampler(size):
    def stream(rank: int, start: int = 0, count: int = 6) -> list[list[int]]:
        sampler = iter(CyclingBatchSampler(size, batch_size=2, seed=3, start=start, rank=rank, num_replicas=2))
        return [next(sampler) for _ in range(count)]  # 6: two passes of 3 batches each

    streams = [stream(0), stream(1)]
    for first, second in ((0, 3), (3, 6)):
        shards = [sum(s[first:second], []) for s in streams]
        assert len(shards[0]) == len(shards[1]) == 5
        assert sorted(set(shards[0]) | set(shards[1])) == list(range(size))  # odd sizes repeat one item, as padding
    assert sum(streams[0][:3], []) != sum(streams[0][3:], []), "a new order each pass"
    assert stream(1, start=4) == stream(1, count=10)[4:], "resuming mid-pass continues the rank's stream"
