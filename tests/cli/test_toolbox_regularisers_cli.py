"""``cvft fit`` with the backbone regularisers and speed switches (``--model.drop_rate``, ``drop_path_rate``,
``drop_path_schedule``, ``channels_last``, ``compile``) under LoRA, EMA and gradient accumulation: the options are
saved with the run, checkpoints keep plain keys, and ``cvft predict --ckpt_path`` gives what the adapter gives on a
model without the switches. Bad values stop the command with exit code 2 before training."""

from __future__ import annotations

import csv

import pytest
import torch
from cli_kit import cvft_args

import cvft.callbacks.speed as speed
from cvft.cli import main

OPTIONS = {
    "drop_rate": 0.1,
    "drop_path_rate": 0.2,
    "drop_path_schedule": "linear",
    "channels_last": True,
    "compile": True,
    "compile_mode": "default",
}


def _predict(source: list[str], shapes_folder, out, label: str) -> list[list[float]]:
    main(
        [
            "predict",
            *source,
            f"--data.predict_root={shapes_folder / 'unlabelled'}",
            "--data.num_workers=0",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={out / label}",
            f"--predictions.output={out / f'{label}.csv'}",
        ]
    )
    with open(out / f"{label}.csv") as handle:
        return [[float(v) for k, v in row.items() if k.startswith("p_")] for row in csv.DictReader(handle)]


def test_fit_saves_the_options_and_predict_reproduces_the_model(shapes_folder, resnet_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")  # inductor takes about a minute on two CPU cores
    root = tmp_path / "runs"
    flags = [
        f"--model.{name}={str(value).lower() if isinstance(value, bool) else value}" for name, value in OPTIONS.items()
    ]
    extra = ["--model.strategies=lora", "--model.ema_decay=0.9", "--trainer.accumulate_grad_batches=2", *flags]
    main(cvft_args("fit", shapes_folder, resnet_weights, root, *extra))
    run = root / "cvft" / "version_0"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert {name: last["hyper_parameters"][name] for name in OPTIONS} == OPTIONS
    assert not any("_orig_mod" in key for key in last["state_dict"])
    assert last["global_step"] == 2  # the epoch's training batches, accumulated by 2

    from_checkpoint = _predict(
        [f"--config={run / 'config.yaml'}", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
        shapes_folder,
        tmp_path,
        "checkpoint",
    )
    plain_adapter = cvft_args("predict", shapes_folder, resnet_weights, tmp_path / "p")[1:5] + [
        "--model.strategies=lora",
        f"--model.adapter={run / 'adapter.safetensors'}",
        "--data.image_size=32",
    ]
    from_adapter = _predict(plain_adapter, shapes_folder, tmp_path, "adapter")
    torch.testing.assert_close(torch.tensor(from_checkpoint), torch.tensor(from_adapter), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model.drop_rate=1.5"], "drop_rate=1.5 is out of range"),
        (["--model.drop_path_schedule=linear"], "no drop path at a rate above 0"),
        (["--model.drop_path_rate=0.1", "--model.drop_path_schedule=early"], "pass drop_path_epochs"),
    ],
)
def test_bad_values_stop_before_training(flags, expected, shapes_folder, resnet_weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs", *flags))
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err[-2000:]
    assert expected in captured.err and "Epoch 0" not in captured.out + captured.err
