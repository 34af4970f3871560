"""MultiTaskClassifier + MultiTaskDataModule on 2 gloo CPU processes equal one process with twice the batch size."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from ddp_kit import ddp_trainer, run_ranks
from torch.utils.data import TensorDataset

from cvft.data.multitask import MultiTaskDataModule
from cvft.errors import DatasetError
from cvft.tasks.multitask import MultiTaskClassifier

TASKS = {"colour": {"num_classes": 3}, "stripes": {"num_classes": 2, "multi_label": True}}
BATCH = 4  # per rank; the single-process reference uses 2 * BATCH
EPOCHS = 2


def _datasets(n: int, seed: int) -> dict[str, TensorDataset]:
    """Random images whose pixel (0, 0, 0) holds the sample's id (ids of the two tasks do not overlap)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * n, 3, 32, 32, generator=generator)
    images[:, 0, 0, 0] = torch.arange(2 * n, dtype=torch.float32)
    colour = torch.randint(0, 3, (n,), generator=generator)
    stripes = torch.randint(0, 2, (n, 2), generator=generator).float()
    return {"colour": TensorDataset(images[:n], colour), "stripes": TensorDataset(images[n:], stripes)}


def _data(batch_size: int) -> MultiTaskDataModule:
    return MultiTaskDataModule(_datasets(16, 0), val=_datasets(6, 1), batch_size=batch_size, seed=0)


def _model() -> MultiTaskClassifier:
    torch.manual_seed(0)
    return MultiTaskClassifier(
        TASKS, "test_resnet", pretrained=False, strategies=["linear_probe"], weighting="uncertainty", lr=1e-2,
        warmup_epochs=0,
    )  # fmt: skip


class _Record(pl.Callback):
    """(epoch, task, sample ids) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, list[int]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        ids = batch["images"][:, 0, 0, 0].round().long().tolist()
        self.seen.append((trainer.current_epoch, batch["task"], ids))


def _result(model: MultiTaskClassifier, trainer: pl.Trainer, record: _Record) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "seen": record.seen,
        "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }


def _worker(rank: int, out: Path) -> None:
    model, record = _model(), _Record()
    trainer = ddp_trainer(
        out / "fit", find_unused_parameters=True, use_distributed_sampler=False, max_epochs=EPOCHS, callbacks=[record]
    )
    trainer.fit(model, datamodule=_data(BATCH))
    result = _result(model, trainer, record)
    try:  # Lightning's default sampler injection is refused with cvft's own message
        ddp_trainer(out / "refused", find_unused_parameters=True, max_steps=1).fit(_model(), datamodule=_data(BATCH))
    except DatasetError as error:
        result["refused"] = str(error)
    torch.save(result, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], dict]:
    """The two ranks' results and the single-process reference (batch 2 * BATCH)."""
    ranks = run_ranks(_worker, tmp_path_factory.mktemp("multitask_ddp"))
    model, record = _model(), _Record()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record],
    )  # fmt: skip
    trainer.fit(model, datamodule=_data(2 * BATCH))
    return ranks, _result(model, trainer, record)


@pytest.mark.slow  # one 2-process spawn (module fixture): ~20-30 s on 2 shared cores
def test_ranks_train_the_same_task_on_disjoint_halves_of_the_single_process_batch(runs):
    (rank0, rank1), reference = runs
    assert len(rank0["seen"]) == len(rank1["seen"]) == len(reference["seen"]) == EPOCHS * 4
    for (epoch, task0, ids0), (_, task1, ids1), (_, task, ids) in zip(
        rank0["seen"], rank1["seen"], reference["seen"], strict=True
    ):
        assert task0 == task1 == task, f"epoch {epoch}: ranks must train the same task at each step"
        assert len(ids0) == len(ids1) == BATCH and not set(ids0) & set(ids1)
        assert sorted(ids0 + ids1) == sorted(ids), "the ranks' batches make up the single-process batch"
    by_epoch = [[ids for epoch, _, ids in reference["seen"] if epoch == e] for e in range(EPOCHS)]
    assert by_epoch[0] != by_epoch[1], "Lightning must reach TaskBatchSampler.set_epoch: a new order each epoch"


@pytest.mark.slow  # one 2-process spawn (module fixture): ~20-30 s on 2 shared cores
def test_weights_identical_on_both_ranks_and_equal_to_one_process(runs):
    (rank0, rank1), reference = runs
    start = _model().state_dict()
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), f"{name} differs between ranks"
        torch.testing.assert_close(value, reference["state"][name], atol=1e-5, rtol=1e-4, msg=name)
    heads = [n for n in start if n.startswith("heads.")]
    assert len(heads) == 4 and not any(torch.equal(start[n], rank0["state"][n]) for n in heads), "both heads train"
    assert (start["weighting.log_vars"] != rank0["state"]["weighting.log_vars"]).all(), "both task weights train"
    assert all(torch.equal(start[n], rank0["state"][n]) for n in start if n.startswith("backbone.")), "linear probe"


@pytest.mark.slow  # one 2-process spawn (module fixture): ~20-30 s on 2 shared cores
def test_validation_is_sharded_and_gathered_like_one_process(runs):
    (rank0, rank1), reference = runs
    assert {"val/loss", "val/colour/acc", "val/stripes/auroc"} <= set(reference["val"])
    for name, value in reference["val"].items():
        assert rank0["val"][name] == pytest.approx(value, abs=1e-5), name
        assert rank1["val"][name] == pytest.approx(value, abs=1e-5), name


@pytest.mark.slow  # one 2-process spawn (module fixture): ~20-30 s on 2 shared cores
def test_lightning_sampler_injection_is_refused_with_the_way_out(runs):
    (rank0, rank1), _ = runs
    for rank in (rank0, rank1):
        assert "use_distributed_sampler=False" in rank.get("refused", ""), rank.get("refused")


def test_sampler_refuses_tasks_smaller_than_the_world():
    from cvft.data.multitask import TaskBatchSampler

    with pytest.raises(DatasetError, match="one sample per rank"):
        TaskBatchSampler([4, 1], batch_size=2, rank=0, num_replicas=2)
    with pytest.raises(DatasetError, match="rank < num_replicas"):
        TaskBatchSampler([4, 4], batch_size=2, rank=2, num_replicas=2)
