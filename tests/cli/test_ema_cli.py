"""``cvft fit --model.ema_decay``: best/last checkpoints and the adapter file hold the EMA, and `cvft predict` from
either reproduces the EMA model."""

from __future__ import annotations

import csv

import torch
from cli_kit import cvft_args
from safetensors.torch import load_file

from cvft.cli import main


def test_cli_fit_writes_the_ema_into_checkpoints_and_adapter(shapes_folder, resnet_weights, tmp_path):
    root = tmp_path / "runs"
    main(cvft_args("fit", shapes_folder, resnet_weights, root, "--model.strategies=lora", "--model.ema_decay=0.9"))
    run = root / "cvft" / "version_0"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["hyper_parameters"]["ema_decay"] == 0.9
    adapter = load_file(str(run / "adapter.safetensors"))
    trained = last["cvft_ema"]["trained"]
    assert all(any(part in name for part in ("lora", "backbone.fc.", "running_")) for name in trained)
    for name in trained:  # LoRA factors, head, BatchNorm statistics: all in the adapter, all the EMA
        assert torch.equal(adapter[name.removeprefix("backbone.")], last["state_dict"][name]), name
    assert any(not torch.equal(last["state_dict"][name], value) for name, value in trained.items())
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert "cvft_ema" in best and all(
        torch.equal(best["state_dict"][name], last["state_dict"][name]) for name in trained
    )

    outputs = {}
    for label, source in {
        "checkpoint": [f"--config={run / 'config.yaml'}", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
        "adapter": cvft_args("predict", shapes_folder, resnet_weights, tmp_path / "p")[1:5]
        + ["--model.strategies=lora", f"--model.adapter={run / 'adapter.safetensors'}", "--data.image_size=32"],
    }.items():
        main(
            [
                "predict",
                *source,
                f"--data.predict_root={shapes_folder / 'unlabelled'}",
                "--data.num_workers=0",
                "--trainer.accelerator=cpu",
                f"--trainer.default_root_dir={tmp_path / label}",
                f"--predictions.output={tmp_path / f'{label}.csv'}",
            ]
        )
        with open(tmp_path / f"{label}.csv") as handle:
            outputs[label] = [
                [float(v) for k, v in row.items() if k.startswith("p_")] for row in csv.DictReader(handle)
            ]
    torch.testing.assert_close(torch.tensor(outputs["adapter"]), torch.tensor(outputs["checkpoint"]), atol=1e-5, rtol=0)
