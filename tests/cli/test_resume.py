"""Run folders and resuming: last.ckpt is the latest state, `--ckpt_path last` resumes in place or fails clearly,
folders are claimed atomically, and outputs are written atomically with normal permissions."""

from __future__ import annotations

import csv
import multiprocessing
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cli_kit import WorseEachEpoch, cvft_args, regression_loader

from cvft import runs
from cvft.callbacks import RunCheckpoint
from cvft.checkpoints import atomic_torch_save
from cvft.cli import main


def _epoch_and_step(path: Path) -> tuple[int, int]:
    checkpoint = torch.load(path, weights_only=True)
    return checkpoint["epoch"], checkpoint["global_step"]


def test_last_ckpt_holds_the_latest_epoch_not_the_best(tmp_path):
    checkpoint = RunCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best", save_last=True)
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(WorseEachEpoch(), regression_loader(), regression_loader())
    assert _epoch_and_step(tmp_path / "best.ckpt") == (0, 4)
    assert _epoch_and_step(tmp_path / "last.ckpt") == (2, 12)


def test_last_ckpt_links_to_the_checkpoint_of_the_same_step_and_survives_its_replacement(tmp_path, monkeypatch):
    """Epoch 0 is the best: last.ckpt is that very file (one serialisation); epoch 1 rewrites last.ckpt alone."""
    checkpoint = RunCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best", save_last=True)
    inodes: list[tuple[int, int]] = []
    original = RunCheckpoint.on_train_epoch_end

    def record(self, trainer, module):
        original(self, trainer, module)
        inodes.append(((tmp_path / "best.ckpt").stat().st_ino, (tmp_path / "last.ckpt").stat().st_ino))

    monkeypatch.setattr(RunCheckpoint, "on_train_epoch_end", record)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(WorseEachEpoch(), regression_loader(), regression_loader())
    assert inodes[0][0] == inodes[0][1]  # one file, two names
    assert inodes[1][0] == inodes[0][0] and inodes[1][1] != inodes[0][1]
    assert _epoch_and_step(tmp_path / "best.ckpt") == (0, 4)
    assert _epoch_and_step(tmp_path / "last.ckpt") == (1, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_last_ckpt_every_n_train_steps(tmp_path, monkeypatch):
    checkpoint = RunCheckpoint(
        dirpath=tmp_path, monitor="val/acc", mode="max", filename="best", save_last=True, last_every_n_train_steps=3
    )
    saved_steps: list[int] = []
    original = RunCheckpoint._save_last_checkpoint

    def record(self, trainer, candidates):
        saved_steps.append(trainer.global_step)
        original(self, trainer, candidates)

    monkeypatch.setattr(RunCheckpoint, "_save_last_checkpoint", record)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(WorseEachEpoch(), regression_loader(), regression_loader())
    assert saved_steps == [3, 4, 6, 8]  # steps 3 and 6 by the interval, 4 and 8 at the epoch ends
    with pytest.raises(ValueError, match="last_every_n_train_steps"):
        RunCheckpoint(last_every_n_train_steps=0)


def test_ckpt_path_last_with_nothing_to_resume_fails(shapes_folder, resnet_weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs", "--ckpt_path=last"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last found no checkpoint to resume" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "cvft").exists(), "a failed resume must not leave a run folder behind"


@pytest.mark.slow
def test_resume_continues_the_run_folder(shapes_folder, resnet_weights, tmp_path, capsys):
    root = tmp_path / "runs"
    main(cvft_args("fit", shapes_folder, resnet_weights, root, epochs=2))
    run = root / "cvft" / "version_0"
    assert _epoch_and_step(run / "checkpoints" / "last.ckpt")[0] == 1
    with (run / "metrics.csv").open() as handle:
        before = list(csv.DictReader(handle))
    interrupted = {key: "" for key in before[0]} | {"epoch": "2", "step": "9999", "train/loss_step": "123.0"}
    with (run / "metrics.csv").open("a", newline="") as handle:  # the part of epoch 2 a killed run logged
        csv.DictWriter(handle, fieldnames=list(before[0])).writerow(interrupted)
    capsys.readouterr()

    main(cvft_args("fit", shapes_folder, resnet_weights, root, "--ckpt_path=last", epochs=3))

    out = capsys.readouterr().out
    assert f"Resuming from {run / 'checkpoints' / 'last.ckpt'}" in out
    assert sorted(p.name for p in (root / "cvft").iterdir()) == ["version_0"], "resuming must not open a new folder"
    with (run / "metrics.csv").open() as handle:
        after = list(csv.DictReader(handle))
    assert after[: len(before)] == before, "rows from before the checkpoint are kept as they were"
    assert "123.0" not in {row.get("train/loss_step") for row in after}, "rows of the interrupted part are dropped"
    assert {row["epoch"] for row in after if row.get("val/acc")} == {"0", "1", "2"}
    history = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    report = next(state for key, state in history.items() if key.startswith("TrainingReport"))
    assert len(report["history"]) == 3, "learning curves cover the whole run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def _claim(root: str, queue) -> None:
    queue.put(runs.claim_run_folder(root, "cvft"))


def test_concurrent_claims_get_distinct_folders(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_claim, args=(str(tmp_path), queue)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    claimed = sorted(queue.get(timeout=5) for _ in workers)
    assert claimed == list(range(6))


def test_claim_skips_a_folder_taken_after_the_scan(tmp_path, monkeypatch):
    """The race of two fits: both scan, the other one creates version_0 first; this one must take version_1."""
    (tmp_path / "cvft" / "version_0").mkdir(parents=True)
    monkeypatch.setattr(runs, "_versions", lambda parent: [])  # a scan from before the other fit's mkdir
    assert runs.claim_run_folder(tmp_path, "cvft") == 1
    loggers = runs.run_loggers(tmp_path, "cvft")
    assert {logger.version for logger in loggers} == {2}


def test_atomic_save_keeps_the_previous_file_when_a_write_dies(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"epoch": 1}, target)

    def dies_mid_write(obj, handle):
        Path(handle).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no temporary file is left behind"


def test_adapter_file_has_the_usual_permissions(tmp_path):
    import timm

    from cvft.adapter_files import save_adapter
    from cvft.strategies import apply_strategies

    model = timm.create_model("test_resnet", num_classes=3)
    stack = apply_strategies(model, ["linear_probe"])
    path = save_adapter(model, tmp_path / "adapter.safetensors", backbone="test_resnet", strategies=stack.config())
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
