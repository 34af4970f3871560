"""``cvft fit`` on preference pairs through ``--data.preference_pairs``: a CSV, a generator spec, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from cli_kit import cvft_args

from cvft.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _pairs_csv(folder: Path, rows: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "pairs.csv"
    csv.write_text("\n".join(["path,preferred,rejected,weight", *rows]))
    return csv


def _fit(shapes_folder: Path, weights: Path, out: Path, *extra: str) -> Path:
    main(cvft_args("fit", shapes_folder, weights, out, "--data.val_fraction=0.25", *extra))
    return out / "cvft" / "version_0" / "checkpoints" / "last.ckpt"


def test_fit_dpo_on_a_pair_csv_writes_a_checkpoint(shapes_folder, resnet_weights, tmp_path):
    # paths relative to --data.root (the CSV lives elsewhere), labels as class names and as an index
    rows = [f"{kind}/{kind}_{i}.png,{kind},{2 if kind == 'circle' else 0},1.5" for kind in ("circle", "square")
            for i in range(8)]  # fmt: skip
    csv = _pairs_csv(tmp_path / "pairs", rows)
    last = _fit(
        shapes_folder, resnet_weights, tmp_path / "runs",
        f"--data.preference_pairs={csv}", "--model.strategies=[linear_probe, {name: dpo, beta: 0.5}]",
    )  # fmt: skip
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["preference_pairs"] == str(csv)
    assert checkpoint["global_step"] == 2  # 16 pairs in batches of 8
    assert "reference" in checkpoint["cvft_strategies"]["dpo"]
    (history,) = checkpoint["callbacks"]["TrainingReport"]["history"]
    assert "train/dpo/dpo" in history and "val/acc" in history  # validation stays labelled
    assert (last.parent / "best.ckpt").is_file()


def test_fit_reward_model_recipe_on_generated_pairs(shapes_folder, resnet_weights, tmp_path):
    args = cvft_args(
        "fit", shapes_folder, resnet_weights, tmp_path / "runs", "--data.val_fraction=0.25",
        "--data.preference_pairs={from: labels, seed: 1}", f"--config={CONFIGS / 'reward_model.yaml'}",
    )  # fmt: skip
    args.insert(1, args.pop())  # --config first, as a user writes it; the flags override it
    main(args)
    checkpoint = torch.load(tmp_path / "runs" / "cvft" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["preference_pairs"] == {"from": "labels", "seed": 1}
    assert checkpoint["global_step"] == 3  # 27 training images -> 27 pairs, 3 full batches of 8
    (history,) = checkpoint["callbacks"]["TrainingReport"]["history"]
    assert "train/reward_model/bradley_terry" in history


def test_the_recipes_use_preference_pairs():
    for name in ("dpo.yaml", "reward_model.yaml"):
        assert yaml.safe_load((CONFIGS / name).read_text())["data"]["preference_pairs"] == {"from": "labels"}


def _fails_cleanly(args: list[str], capsys, *expected: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err
    for text in expected:
        assert text in captured.err, captured.err[-2000:]


def test_a_bad_pair_csv_exits_with_code_2(shapes_folder, resnet_weights, tmp_path, capsys):
    csv = _pairs_csv(tmp_path / "pairs", ["circle/circle_0.png,circle,triangle"])
    args = cvft_args(
        "fit", shapes_folder, resnet_weights, tmp_path / "runs",
        f"--data.preference_pairs={csv}", "--model.strategies=[linear_probe, dpo]",
    )  # fmt: skip
    _fails_cleanly(args, capsys, "pairs.csv, line 2", "'triangle' is neither a class name nor an index")


def test_a_missing_pair_csv_and_a_missing_option_exit_with_code_2(shapes_folder, resnet_weights, tmp_path, capsys):
    missing = tmp_path / "nowhere.csv"
    args = cvft_args(
        "fit", shapes_folder, resnet_weights, tmp_path / "runs",
        f"--data.preference_pairs={missing}", "--model.strategies=[linear_probe, dpo]",
    )  # fmt: skip
    _fails_cleanly(args, capsys, "nowhere.csv does not exist")
    args = cvft_args("fit", shapes_folder, resnet_weights, tmp_path / "runs2", "--model.strategies=[linear_probe, dpo]")
    _fails_cleanly(args, capsys, "dpo trains on preference pairs", "--data.preference_pairs")


@pytest.mark.parametrize(
    "objective",
    ["{name: ppo, epochs: 2, minibatches: 1, kl_coef: 0.1, reward: {cost_matrix: [[0, 1, 1], [5, 0, 1], [1, 1, 0]]}}",
     "{name: trpo, max_kl: 0.01, reward: {cost_matrix: [[0, 1, 1], [5, 0, 1], [1, 1, 0]]}}"],
    ids=["ppo", "trpo"],
)  # fmt: skip
def test_fit_self_stepping_objective_through_the_cli(objective, shapes_folder, resnet_weights, tmp_path):
    last = _fit(shapes_folder, resnet_weights, tmp_path / "runs", f"--model.strategies=[linear_probe, {objective}]")
    checkpoint = torch.load(last, weights_only=True)
    name = "ppo" if "ppo" in objective else "trpo"
    assert "reference" in checkpoint["cvft_strategies"][name]
    (history,) = checkpoint["callbacks"]["TrainingReport"]["history"]
    assert f"train/{name}/reward" in history and "val/acc" in history
    # 3 training batches of 8: PPO steps epochs x minibatches = 2 times per batch, TRPO once
    assert checkpoint["global_step"] == (6 if name == "ppo" else 3)
