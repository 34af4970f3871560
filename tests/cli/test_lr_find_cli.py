"""``cvft fit --model.lr auto``, ``--tune_batch_size`` and ``cvft lr-find`` on the command line."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from cli_kit import cvft_args

from cvft.cli import main
from cvft.cli.tuning import fit_command
from cvft.data.detection.shapes import write_shapes_detection

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "detection" / "fcos_shapes.yaml"


def without_lr(args: list[str]) -> list[str]:
    return [arg for arg in args if arg != "--model.lr=0.01"]


def suggested_lr(folder: Path) -> float:
    with open(folder / "lr_find.csv") as handle:
        (row,) = [row for row in csv.DictReader(handle) if row["suggested"] == "1"]
    return float(row["lr"])


def test_fit_with_lr_auto_trains_saves_and_predicts_at_the_rate_found(shapes_folder, resnet_weights, tmp_path, capsys):
    root = tmp_path / "runs"
    extra = ("--model.lr=auto", "--lr_finder.num_training=20", "--model.strategies=lora", "--model.ema_decay=0.9")
    main(without_lr(cvft_args("fit", shapes_folder, resnet_weights, root, *extra)))
    out = capsys.readouterr().out
    run = root / "cvft" / "version_0"
    found = suggested_lr(run)
    assert "LR finder: 20 of 20 steps, lr 1e-08 to 1 (exponential)" in out
    assert f"Suggested learning rate: {found:.3g}" in out
    assert f"Learning rate: {found:g} (found by the LR finder)" in out
    assert (run / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["lr"] == found
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["lr"] == found
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert {group["initial_lr"] for group in groups} == {found}  # the schedule was built on the rate found

    main(["predict", f"--config={run / 'config.yaml'}", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
          f"--data.predict_root={shapes_folder / 'unlabelled'}", f"--predictions.output={tmp_path / 'p.csv'}",
          f"--trainer.default_root_dir={tmp_path / 'predict'}"])  # fmt: skip
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 6


def test_lr_auto_or_batch_size_tuning_on_a_resumed_fit_is_refused(shapes_folder, resnet_weights, tmp_path, capsys):
    for flag in ("--model.lr=auto", "--tune_batch_size=power"):
        args = cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs", flag, "--ckpt_path=last")
        with pytest.raises(SystemExit) as exit_info:
            main(without_lr(args) if "lr" in flag else args)
        assert exit_info.value.code == 2
        assert "--ckpt_path resumes a fit" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything was built


BAD_INPUT = {
    "negative lr": (("--model.lr=-1",), "lr must be > 0"),
    "zero lr": (("--model.lr=0",), "lr must be > 0"),
    "lr neither a number nor auto": (("--model.lr=fast",), "model.lr"),
    "zero min_lr": (("--model.lr=auto", "--lr_finder.min_lr=0"), "0 < min_lr < max_lr"),
    "min_lr above max_lr": (("--model.lr=auto", "--lr_finder.min_lr=1", "--lr_finder.max_lr=0.1"), "min_lr=1.0"),
    "no sweep steps": (("--model.lr=auto", "--lr_finder.num_training=0"), "--lr_finder.num_training"),
    "unknown sweep mode": (("--model.lr=auto", "--lr_finder.mode=cubic"), "lr_finder.mode"),
    "zero first batch": (("--tune_batch_size=power", "--batch_size_finder.init_val=0"), "--batch_size_finder.init_val"),
    "margin of 150 %": (("--tune_batch_size=binsearch", "--batch_size_finder.margin=1.5"), "must be in [0, 1)"),
    "unknown batch search": (("--tune_batch_size=huge",), "tune_batch_size"),
}


@pytest.mark.parametrize(("extra", "expected"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_finder_input_exits_2_before_training(extra, expected, shapes_folder, resnet_weights, tmp_path, capsys):
    args = cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs", *extra)
    with pytest.raises(SystemExit) as exit_info:
        main(without_lr(args) if any(arg.startswith("--model.lr") for arg in extra) else args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert expected in captured.err and "Traceback" not in captured.err
    assert "LR finder:" not in captured.out and not list(tmp_path.glob("runs/**/*.ckpt"))


def test_lr_find_takes_no_checkpoint(shapes_folder, resnet_weights, tmp_path, capsys):
    args = cvft_args("lr-find", shapes_folder, resnet_weights, tmp_path / "runs", f"--ckpt_path={tmp_path / 'a.ckpt'}")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "--ckpt_path" in capsys.readouterr().err


def test_lr_find_is_listed_and_takes_the_options_of_fit(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "lr-find" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    out = capsys.readouterr().out
    for option in ("--model.lr", "--data.root", "--trainer.max_epochs", "--lr_finder.num_training",
                   "--tune_batch_size", "--batch_size_finder.max_batch_size"):  # fmt: skip
        assert option in out, option


def test_lr_find_runs_the_finders_only_and_prints_the_fit_command(shapes_folder, resnet_weights, tmp_path, capsys):
    root = tmp_path / "runs"
    args = cvft_args("lr-find", shapes_folder, resnet_weights, root, "--lr_finder.num_training=20",
                     "--tune_batch_size=power", "--batch_size_finder.max_batch_size=16")  # fmt: skip
    main(args)
    out = capsys.readouterr().out
    run = root / "cvft" / "version_0"
    assert "Batch-size finder (power): trained at 2, 4, 8, 16 -> batch size 16" in out
    expected = fit_command(args, suggested_lr(run), 16)
    assert f"Train with it: {expected}" in out
    assert expected.startswith("cvft fit ") and expected.endswith("--data.batch_size 16")
    assert "--lr_finder" not in expected and "--tune_batch_size" not in expected and "--model.lr=0.01" not in expected
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


def test_fit_with_a_tuned_batch_size_records_it(shapes_folder, resnet_weights, tmp_path, capsys):
    root = tmp_path / "runs"
    main(cvft_args("fit", shapes_folder, resnet_weights, root, "--tune_batch_size=power",
                   "--batch_size_finder.max_batch_size=16"))  # fmt: skip
    run = root / "cvft" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["batch_size"] == 16 and config["tune_batch_size"] is None
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == 16
    assert "batch size 16" in capsys.readouterr().out


def test_fit_command_replaces_the_rate_and_drops_the_finders_options():
    argv = ["lr-find", "--config", "a.yaml", "--model.lr", "auto", "--data.batch_size=8", "--tune_batch_size",
            "binsearch", "--lr_finder.num_training=50", "--data.root", "images/"]  # fmt: skip
    assert fit_command(argv, 0.0123456, 24) == (
        "cvft fit --config a.yaml --data.root images/ --model.lr 0.0123 --data.batch_size 24"
    )
    assert fit_command(argv, None, None) == "cvft fit --config a.yaml --data.batch_size=8 --data.root images/"


@pytest.mark.slow
def test_lr_find_on_a_detector(tmp_path, capsys):
    shapes = write_shapes_detection(tmp_path / "shapes")
    main(["lr-find", f"--config={RECIPE}", "--model.backbone=test_resnet", "--model.weights=null",
          "--model.fpn_channels=32", "--model.backbone_lr_scale=0.1", f"--data.coco_json={shapes / 'annotations.json'}",
          "--data.image_size=64", "--data.batch_size=4", "--data.num_workers=0", "--lr_finder.num_training=14",
          "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path / 'runs'}"])  # fmt: skip
    out = capsys.readouterr().out
    assert "LR finder: " in out and "Train with it: cvft fit --config" in out
    assert (tmp_path / "runs" / "detection" / "version_0" / "lr_find.csv").is_file()
