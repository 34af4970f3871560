"""A real tiny comparison: 2 strategies x 2 seeds of test_resnet, each fit in its own process."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import timm
from PIL import Image
from safetensors.torch import save_file

from cvft.cli import main


def _image_folder(root, rng):
    """train/ val/ test/ folders of three learnable colour classes, 32 px."""
    for split, count in (("train", 8), ("val", 3), ("test", 3)):
        for index, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                pixels[..., index] = 220
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.slow
def test_compare_two_strategies_two_seeds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _image_folder(tmp_path / "images", np.random.default_rng(0))
    model = timm.create_model("test_resnet", num_classes=5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "base.yaml").write_text(
        "trainer:\n  max_epochs: 1\n  accelerator: cpu\n  default_root_dir: out\n  log_every_n_steps: 1\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n"
        "model:\n  backbone: test_resnet\n  pretrained: false\n  weights: weights.safetensors\n  lr: 0.01\n"
        "  warmup_epochs: 0\n"
        "data:\n  root: images\n  image_size: 32\n  batch_size: 8\n  num_workers: 0\n  augment: none\n"
    )
    command = ["compare", "--config", "base.yaml", "--strategies", "linear_probe,lora", "--seeds", "0,1"]
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 0, capsys.readouterr()
    assert "[4/4] lora seed 1: test/acc" in capsys.readouterr().out

    folder = tmp_path / "out" / "compare" / "version_0"
    with (folder / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["strategy"] for row in rows] == ["linear_probe", "lora"]
    for row in rows:
        assert row["runs_ok"] == "2" and row["seeds"] == "0 1" and row["failed_logs"] == ""
        assert 0.0 <= float(row["test/acc_mean"]) <= 1.0 and row["test/acc_std"] != ""
        assert 0.0 <= float(row["val/acc_mean"]) <= 1.0 and float(row["images_per_s_mean"]) > 0
        assert float(row["peak_rss_mb"]) > 100 and float(row["wall_s_mean"]) > 0
    probe, lora = rows
    assert int(probe["trainable_params"]) < int(lora["trainable_params"]) < int(lora["total_params"])
    assert float(probe["trainable_share"]) == pytest.approx(int(probe["trainable_params"]) / int(probe["total_params"]))
    assert "| linear_probe |" in (folder / "compare.md").read_text()
    assert (folder / "compare.png").read_bytes()[:4] == b"\x89PNG"

    for label in ("linear_probe", "lora"):
        for seed in (0, 1):
            run = folder / "runs" / label / f"seed_{seed}"
            result = json.loads((run / "result.json").read_text())
            assert result["split"] == "test" and result["seed"] == seed
            assert (run / "cvft" / "version_0" / "metrics.csv").is_file()
            assert (run / "cvft" / "version_0" / "checkpoints" / "best.ckpt").is_file()
            config = (run / "cvft" / "version_0" / "config.yaml").read_text()
            assert f"seed_everything: {seed}" in config
    assert not (tmp_path / "out" / "cvft").exists(), "every fit writes inside the compare folder"

    # resuming a finished comparison reruns nothing
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("runs/*/seed_*/result.json")}
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--resume", str(folder)])
    assert exit_.value.code == 0
    assert "4 done before, skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
