"""``cvft fit --teacher ...`` adds the distillation strategy to the model (in-process, with run=False)."""

from __future__ import annotations

from pathlib import Path

from cvft.cli import CvftCLI
from cvft.data import ImageFolderDataModule
from cvft.strategies.distillation import Distillation
from cvft.tasks import ImageClassifier


def _args(shapes_folder: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model.backbone=test_resnet",
        "--model.pretrained=false",
        f"--model.weights={weights}",
        f"--data.root={shapes_folder / 'train'}",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.augment=none",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


def _distillation(cli: CvftCLI) -> list[Distillation]:
    return [s for s in cli.model.strategy_stack if isinstance(s, Distillation)]


def test_teacher_option_appends_distillation(shapes_folder, resnet_weights, tmp_path):
    args = _args(shapes_folder, resnet_weights, tmp_path, "--model.strategies=linear_probe")
    cli = CvftCLI(
        ImageClassifier,
        ImageFolderDataModule,
        run=False,
        args=[*args, "--teacher=test_resnet", f"--teacher_weights={resnet_weights}"],
    )
    assert [s.name for s in cli.model.strategy_stack] == ["linear_probe", "distillation"]
    (strategy,) = _distillation(cli)
    assert strategy.teacher == "test_resnet"
    assert strategy.teacher_weights == str(resnet_weights)
    assert cli.model.hparams.strategies[-1]["teacher"] == "test_resnet"


def test_teacher_option_keeps_a_listed_distillation(shapes_folder, resnet_weights, tmp_path):
    listed = '--model.strategies=[{"name": "distillation", "teacher": "test_vit", "alpha": 0.7}]'
    cli = CvftCLI(
        ImageClassifier,
        ImageFolderDataModule,
        run=False,
        args=[*_args(shapes_folder, resnet_weights, tmp_path, listed), "--teacher=test_resnet"],
    )
    (strategy,) = _distillation(cli)
    assert (strategy.teacher, strategy.alpha) == ("test_vit", 0.7)


def test_no_teacher_option_changes_nothing(shapes_folder, resnet_weights, tmp_path):
    args = _args(shapes_folder, resnet_weights, tmp_path)
    cli = CvftCLI(ImageClassifier, ImageFolderDataModule, run=False, args=args)
    assert len(cli.model.strategy_stack) == 0
