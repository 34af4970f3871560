"""``cvft fit --model.temperature_scaling true --model.tta flip`` with LoRA, EMA and Mixup: the checkpoints, the adapter
file and the report carry the temperature, and ``cvft predict --ckpt_path`` reproduces the calibrated model with the
checkpoint's TTA or the one the command line names."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from cli_kit import cvft_args
from torchvision.transforms.functional import five_crop

from cvft.adapter_files import read_adapter
from cvft.cli import main
from cvft.cli.classification import run_classification_cli


def _views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of each mode, built here independently (0.875: 32 px -> 37 px, five 32 px crops)."""
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, images.flip(-1)]
    return list(five_crop(F.interpolate(images, size=(37, 37), mode="bilinear", align_corners=False), [32, 32]))


def test_calibrated_fit_and_predict_with_the_checkpoints_tta_or_the_command_lines(
    shapes_folder, resnet_weights, tmp_path, capsys
):
    root = tmp_path / "runs"
    options = ("--model.strategies=lora", "--model.ema_decay=0.9", "--model.mixup=0.2")
    main(cvft_args("fit", shapes_folder, resnet_weights, root, *options, "--model.temperature_scaling=true",
                   "--model.tta=flip", epochs=2))  # fmt: skip
    printed = capsys.readouterr().out
    run = root / "cvft" / "version_0"
    best_path = run / "checkpoints" / "best.ckpt"
    best = torch.load(best_path, weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    t_best, t_last = float(best["state_dict"]["temperature"]), float(last["state_dict"]["temperature"])
    assert t_last != 1.0 and best["hyper_parameters"]["tta"] == "flip"
    assert "temperature" not in last["cvft_ema"]["trained"]

    report = json.loads((run / "calibration.json").read_text())
    assert report["temperature"] == pytest.approx(t_last, rel=1e-6) and report["epoch"] == 1
    assert len(report["bins_after"]["counts"]) == 15
    assert f"T {t_last:.4f}" in printed and "Temperature scaling on" in printed
    assert (run / "calibration.png").stat().st_size > 0
    with open(run / "calibration.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["probabilities"] for row in rows] == ["before", "after"]
    assert float(rows[1]["nll"]) <= float(rows[0]["nll"])
    assert float(rows[1]["ece"]) == pytest.approx(report["ece_after"], abs=1e-6)
    with open(run / "metrics.csv") as handle:
        logged = [float(row["val/temperature"]) for row in csv.DictReader(handle) if row.get("val/temperature")]
    assert logged[-1] == pytest.approx(t_last)
    assert read_adapter(run / "adapter.safetensors")[1].temperature == t_last

    for flags, mode in (((), "flip"), (("--model.tta=none",), "none"), (("--model.tta", "crops"), "crops")):
        output = tmp_path / f"{mode}.csv"
        cli = run_classification_cli(
            ["predict", f"--config={run / 'config.yaml'}", f"--ckpt_path={best_path}",
             f"--data.predict_root={shapes_folder / 'unlabelled'}", f"--trainer.default_root_dir={tmp_path / mode}",
             f"--predictions.output={output}", *flags]
        )  # fmt: skip
        model = cli.model.eval()
        assert model.hparams.tta == mode and float(model.temperature) == t_best
        images = torch.cat([batch[0] for batch in cli.datamodule.predict_dataloader()])
        with torch.no_grad():
            hand = torch.stack([(model.backbone(v) / t_best).softmax(-1) for v in _views(images, mode)]).mean(0)
        with open(output) as handle:
            written = [[float(v) for k, v in row.items() if k.startswith("p_")] for row in csv.DictReader(handle)]
        torch.testing.assert_close(torch.tensor(written), hand, atol=2e-6, rtol=0, msg=mode)
