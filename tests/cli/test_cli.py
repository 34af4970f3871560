from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_kit import cvft_args
from safetensors.torch import load_file

from cvft.cli import CvftCLI
from cvft.data import ImageFolderDataModule
from cvft.tasks import ImageClassifier


def _cvft_command() -> list[str]:
    exe = shutil.which("cvft")
    return [exe] if exe else [sys.executable, "-m", "cvft.cli"]


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*_cvft_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _fit_args(shapes_folder: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return cvft_args("fit", shapes_folder, weights, out, *extra, epochs=2)


def _predict(cwd: Path, output: Path, *args: str) -> list[dict[str, str]]:
    """``cvft predict`` with ``args``, writing to ``output``; it must succeed. The rows of the CSV it wrote."""
    result = _run(["predict", *args, f"--predictions.output={output}"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output) as handle:
        return list(csv.DictReader(handle))


def test_cli_links_data_into_model(shapes_folder, resnet_weights, tmp_path, class_names):
    cli = CvftCLI(
        ImageClassifier, ImageFolderDataModule, run=False, args=_fit_args(shapes_folder, resnet_weights, tmp_path)[1:]
    )
    assert cli.model.num_classes == len(class_names)
    assert cli.model.class_names == class_names
    assert cli.datamodule.hparams.backbone == "test_resnet"
    assert cli.model.weights_source.startswith("file:")
    names = {c.__class__.__name__ for c in cli.trainer.callbacks}
    assert {"RunCheckpoint", "TrainingReport", "PredictionWriter"} <= names
    assert {type(lg).__name__ for lg in cli.trainer.loggers} == {"CSVLogger", "TensorBoardLogger"}
    assert len({lg.log_dir for lg in cli.trainer.loggers}) == 1, "CSV and TensorBoard must share the run folder"


def test_cli_reports_missing_data_root(tmp_path, resnet_weights):
    result = _run(_fit_args(tmp_path / "nowhere", resnet_weights, tmp_path), cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "nowhere" in result.stderr


@pytest.mark.slow
def test_cvft_fit_then_predict_end_to_end(shapes_folder, resnet_weights, tmp_path, class_names):
    fit = _run(_fit_args(shapes_folder, resnet_weights, tmp_path / "runs", "--model.strategies=linear_probe"), tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert f"weights: file:{resnet_weights}" in fit.stdout
    assert "Final validation" in fit.stdout and "val/acc" in fit.stdout
    run = tmp_path / "runs" / "cvft" / "version_0"
    for name in ("metrics.csv", "learning_curves.png", "confusion_matrix.png", "confusion_matrix.csv", "config.yaml"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard events missing"
    assert (run / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the frozen backbone really stayed at the given weights
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    start = load_file(str(resnet_weights))
    trained = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items()}
    assert all(torch.equal(trained[k], v) for k, v in start.items() if not k.startswith("fc."))
    assert checkpoint["hyper_parameters"]["class_names"] == class_names

    rows = _predict(
        tmp_path,
        tmp_path / "predictions.csv",
        f"--config={run / 'config.yaml'}",
        f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
        f"--data.predict_root={shapes_folder / 'unlabelled'}",
    )
    assert len(rows) == 5
    assert {Path(r["file"]).name for r in rows} == {f"img_{i}.png" for i in range(5)}
    assert all(r["class_name"] in class_names for r in rows)
    assert all(abs(sum(float(r[f"p_{c}"]) for c in class_names) - 1) < 1e-4 for r in rows)

    # the adapter written at fit end predicts the same without the checkpoint or the training folder
    assert (run / "adapter.safetensors").is_file() and "Adapter (trained tensors only)" in fit.stdout
    adapter_rows = _predict(
        tmp_path,
        tmp_path / "adapter_predictions.csv",
        "--model.backbone=test_resnet",
        "--model.pretrained=false",
        f"--model.weights={resnet_weights}",
        "--model.strategies=linear_probe",
        f"--model.adapter={run / 'adapter.safetensors'}",
        f"--data.predict_root={shapes_folder / 'unlabelled'}",
        "--data.image_size=32",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path / 'predict_runs'}",
    )
    assert [r["file"] for r in adapter_rows] == [r["file"] for r in rows]
    assert all(r["class_name"] in class_names for r in adapter_rows)


def _fit_on_two_cpu_processes(shapes_folder: Path, weights: Path, tmp_path: Path, strategies: str) -> Path:
    """``cvft fit`` with ``strategies`` under DDP on 2 CPU processes; it must succeed. Returns its last checkpoint."""
    ddp = (f"--model.strategies={strategies}", "--trainer.strategy=ddp", "--trainer.devices=2")
    result = _run(_fit_args(shapes_folder, weights, tmp_path / "runs", *ddp), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "runs" / "cvft" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_ddp_two_cpu_processes_frozen_backbone(shapes_folder, resnet_weights, tmp_path):
    last = _fit_on_two_cpu_processes(shapes_folder, resnet_weights, tmp_path, "linear_probe")
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    start = load_file(str(resnet_weights))
    trained = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items()}
    frozen = [k for k in start if not k.startswith("fc.")]
    assert all(torch.equal(trained[k], start[k]) for k in frozen), "frozen weights or BN statistics moved under DDP"
    assert not torch.equal(trained["fc.weight"], start["fc.weight"])


@pytest.mark.slow
def test_ddp_gradual_unfreeze_runs(shapes_folder, resnet_weights, tmp_path):
    _fit_on_two_cpu_processes(shapes_folder, resnet_weights, tmp_path, "[{name: gradual_unfreeze, milestones: [1]}]")
