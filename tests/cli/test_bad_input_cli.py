"""Bad files and flags on the command line give exit code 2 and one cvft error naming the file, before training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from cli_kit import cvft_args

from cvft.cli import main


def _fails_cleanly(args: list[str], capsys, *expected: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err
    assert "Epoch 0" not in captured.out + captured.err, "the error must come before training"
    for text in expected:
        assert text in captured.err, captured.err[-2000:]
    return captured.err


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory, shapes_folder, resnet_weights) -> Path:
    out = tmp_path_factory.mktemp("trained")
    main(cvft_args("fit", shapes_folder, resnet_weights, out, "--model.strategies=linear_probe"))
    return out / "cvft" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_truncated_checkpoint(command, lightning_checkpoint, shapes_folder, resnet_weights, tmp_path, capsys):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(lightning_checkpoint.read_bytes()[:5000])
    extra = [f"--ckpt_path={truncated}", f"--data.predict_root={shapes_folder / 'unlabelled'}"]
    args = cvft_args(
        command, shapes_folder, resnet_weights, tmp_path / "runs", *extra[: 2 if command == "predict" else 1]
    )
    _fails_cleanly(args, capsys, "truncated.ckpt", "truncated")


def test_plain_state_dict_as_ckpt_path(shapes_folder, resnet_weights, tmp_path, capsys):
    plain = tmp_path / "weights.ckpt"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), plain)
    args = cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs", f"--ckpt_path={plain}")
    _fails_cleanly(args, capsys, "weights.ckpt", "is not a Lightning checkpoint", "--model.weights")


@pytest.mark.parametrize("name", ["empty.pth", "empty.ckpt", "empty.safetensors"])
def test_empty_weights_file(name, shapes_folder, tmp_path, capsys):
    empty = tmp_path / name
    empty.write_bytes(b"")
    _fails_cleanly(cvft_args("fit", shapes_folder, empty, tmp_path / "runs"), capsys, name)


@pytest.mark.parametrize("name", ["broken.ckpt", "broken.safetensors"])
def test_bad_teacher_file_fails_at_setup(name, shapes_folder, resnet_weights, tmp_path, capsys):
    teacher = tmp_path / name
    teacher.write_bytes(b"\x00garbage, not a checkpoint" * 10)
    args = cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs", f"--teacher={teacher}")
    _fails_cleanly(args, capsys, name, "teacher")
    assert not (tmp_path / "runs" / "cvft").exists()


def test_teacher_with_other_classes_fails_at_setup(
    lightning_checkpoint, shapes_folder, resnet_weights, tmp_path, capsys
):
    checkpoint = torch.load(lightning_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["num_classes"] = 7
    teacher = tmp_path / "seven_classes.ckpt"
    torch.save(checkpoint, teacher)
    args = cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs", f"--teacher={teacher}")
    _fails_cleanly(args, capsys, "predicts 7 classes")


def test_predict_with_adapter_alone(lightning_checkpoint, shapes_folder, resnet_weights, tmp_path, capsys, caplog):
    """The adapter records its strategies and classes: --model.adapter and the base weights are enough."""
    adapter = lightning_checkpoint.parent.parent / "adapter.safetensors"
    out = tmp_path / "predictions.csv"
    args = [
        "predict",
        f"--model.adapter={adapter}",
        f"--model.weights={resnet_weights}",
        "--model.pretrained=false",
        "--model.backbone=test_resnet",
        f"--data.predict_root={shapes_folder / 'unlabelled'}",
        "--data.image_size=32",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        f"--predictions.output={out}",
    ]
    main(args)
    assert len(out.read_text().splitlines()) == 1 + 5


def test_predict_from_checkpoint_says_what_it_loads(
    lightning_checkpoint, shapes_folder, resnet_weights, tmp_path, capsys, caplog
):
    args = [
        "predict",
        *cvft_args("predict", shapes_folder, resnet_weights, tmp_path / "runs")[1:],
        f"--data.predict_root={shapes_folder / 'unlabelled'}",
        f"--ckpt_path={lightning_checkpoint}",
        f"--predictions.output={tmp_path / 'p.csv'}",
    ]
    with caplog.at_level(logging.INFO):
        main(args)
    assert f"Weights: all from checkpoint {lightning_checkpoint}" in capsys.readouterr().out
    assert not any("random initialisation" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("--model.lr=-0.1", "lr=-0.1"),
        ("--data.image_size=0", "image_size"),
        ("--model.weight_decay=-1", "weight_decay"),
        ("--trainer.max_epochs=-5", "--trainer.max_epochs"),
        ("--trainer.accumulate_grad_batches=0", "--trainer.accumulate_grad_batches"),
        ("--trainer.devices=0", "Invalid Trainer option"),
        ("--checkpoint.last_every_n_train_steps=0", "--checkpoint.last_every_n_train_steps"),
    ],
)
def test_bad_numbers_fail_before_a_run_folder_exists(option, named, shapes_folder, resnet_weights, tmp_path, capsys):
    _fails_cleanly(cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs", option), capsys, named)
    assert not list(tmp_path.glob("runs/*/version_*")), "no run folder is left behind"


def test_single_class_folder_fails_before_training(shapes_folder, resnet_weights, tmp_path, capsys):
    root = tmp_path / "one_class"
    (root / "circle").mkdir(parents=True)
    for image in list((shapes_folder / "train" / "circle").iterdir())[:4]:
        (root / "circle" / image.name).write_bytes(image.read_bytes())
    args = cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs", f"--data.root={root}")
    _fails_cleanly(args, capsys, "circle", str(root))
