"""``cvft fit --data.augment randaugment`` / ``--data.train_transform file.yaml``: the options reach the DataModule
(image folders and ``--task medical``), from the command line or a YAML config, a run trains with them and saves them,
``cvft predict`` / ``cvft test`` with ``--ckpt_path`` evaluate with the pipeline saved in the checkpoint, and bad values
exit with code 2."""

from __future__ import annotations

import csv
from pathlib import Path

import albumentations as A
import pytest
import torch
import yaml
from albumentations.pytorch import ToTensorV2
from cli_kit import cvft_args, tiny_medmnist

from cvft.checkpoints import load_module
from cvft.cli import main
from cvft.data import ImageFolderDataModule
from cvft.data.auto_augment import RandAugment
from cvft.data.dataset import ImageDataset
from cvft.data.samples import scan_unlabelled
from cvft.tasks import ImageClassifier

# deliberately unlike cvft's own evaluation pipeline (resize 36 + centre crop 32, ImageNet statistics)
EVAL = A.Compose([A.Resize(height=32, width=32), A.Normalize(mean=(0.3, 0.3, 0.3), std=(0.6, 0.6, 0.6)), ToTensorV2()])


def _args(shapes_folder, weights, out, *extra):
    args = cvft_args("fit", shapes_folder, weights, out, *extra)
    return [arg for arg in args if arg != "--data.augment=none"]


def test_cvft_fit_with_randaugment_and_random_erasing_on_lora(shapes_folder, resnet_weights, tmp_path):
    extra = ("--model.strategies=lora", "--data.augment=rand-m7-n2-mstd0.5", "--data.random_erasing=0.5")
    main(_args(shapes_folder, resnet_weights, tmp_path, *extra))
    checkpoint = torch.load(tmp_path / "cvft" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    saved = checkpoint["datamodule_hyper_parameters"]
    assert (saved["augment"], saved["random_erasing"]) == ("rand-m7-n2-mstd0.5", 0.5)


def _probabilities(path: Path) -> dict[str, list[float]]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return {Path(row["file"]).name: [float(v) for k, v in row.items() if k.startswith("p_")] for row in rows}


def _expected(checkpoint: Path, files: list[Path], pipeline: A.Compose) -> dict[str, list[float]]:
    model = load_module(ImageClassifier, checkpoint).eval()
    images = torch.stack([image for image, _ in ImageDataset(files, pipeline)])
    with torch.no_grad():
        probabilities = model(images).softmax(dim=1)
    return {path.name: row.tolist() for path, row in zip(files, probabilities, strict=True)}


def test_fit_with_pipeline_files_then_predict_uses_the_saved_eval_pipeline(shapes_folder, resnet_weights, tmp_path):
    train = A.Compose([A.RandomResizedCrop(size=(32, 32)), RandAugment(), *EVAL.transforms[1:]])
    A.save(train, str(tmp_path / "train.yaml"), data_format="yaml")
    A.save(EVAL, str(tmp_path / "eval.yaml"), data_format="yaml")
    pipelines = (f"--data.train_transform={tmp_path / 'train.yaml'}", f"--data.eval_transform={tmp_path / 'eval.yaml'}")
    main(_args(shapes_folder, resnet_weights, tmp_path / "runs", "--model.strategies=lora", *pipelines))
    best = tmp_path / "runs" / "cvft" / "version_0" / "checkpoints" / "best.ckpt"

    # the checkpoint holds the pipeline itself: predicting needs neither the file nor the run's config.yaml
    (tmp_path / "eval.yaml").unlink()
    unlabelled = shapes_folder / "unlabelled"
    predict = [
        "predict",
        "--model.backbone=test_resnet",
        "--model.pretrained=false",
        f"--ckpt_path={best}",
        f"--data.predict_root={unlabelled}",
        "--data.image_size=32",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path / 'predict_runs'}",
        f"--predictions.output={tmp_path / 'predictions.csv'}",
    ]
    main(predict)
    predicted = _probabilities(tmp_path / "predictions.csv")
    files = scan_unlabelled(unlabelled)
    with_saved = _expected(best, files, EVAL)
    assert predicted.keys() == with_saved.keys()
    for name, row in predicted.items():
        assert row == pytest.approx(with_saved[name], abs=1e-4)
    # cvft's own evaluation pipeline would have given other probabilities: the test sees which one was used
    from cvft.data.transforms import build_transforms

    default = build_transforms(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), train=False)
    with_default = _expected(best, files, default)
    assert any(
        abs(a - b) > 1e-3 for name in predicted for a, b in zip(predicted[name], with_default[name], strict=True)
    )


def test_a_broken_pipeline_file_exits_with_code_2_naming_the_step(shapes_folder, resnet_weights, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    A.save(A.Compose([A.Resize(height=32, width=32), A.GaussianBlur(), ToTensorV2()]), str(broken), data_format="yaml")
    broken.write_text(broken.read_text().replace("GaussianBlur", "GausianBlur"))
    with pytest.raises(SystemExit) as exit_info:
        main(_args(shapes_folder, resnet_weights, tmp_path, f"--data.train_transform={broken}"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "step 1 (GausianBlur): unknown transform" in err and "Did you mean GaussianBlur" in err
    assert "Traceback" not in err


def test_an_inline_pipeline_in_a_yaml_config_is_saved_and_cvft_test_uses_it(
    shapes_folder, resnet_weights, tmp_path, monkeypatch
):
    config = tmp_path / "config.yaml"
    inline = A.to_dict(EVAL)
    config.write_text(yaml.safe_dump({"data": {"eval_transform": inline, "test_fraction": 0.25}}))
    main(_args(shapes_folder, resnet_weights, tmp_path / "runs", "--config", str(config), "--data.augment=rand-m5-n1"))
    run = tmp_path / "runs" / "cvft" / "version_0"
    saved = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert saved["augment"] == "rand-m5-n1"
    rebuilt = A.from_dict(saved["eval_transform"])
    assert [type(step).__name__ for step in rebuilt.transforms] == ["Resize", "Normalize", "ToTensorV2"]
    assert rebuilt.transforms[1].mean == EVAL.transforms[1].mean

    built: list[ImageFolderDataModule] = []
    setup = ImageFolderDataModule.setup

    def recording_setup(self, stage=None):
        built.append(self)
        return setup(self, stage)

    monkeypatch.setattr(ImageFolderDataModule, "setup", recording_setup)
    test = [arg for arg in _args(shapes_folder, resnet_weights, tmp_path / "test_runs") if "weights" not in arg]
    main(["test", *test[1:], f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "--data.test_fraction=0.25"])
    dataset = built[-1].datasets["test"]
    image = dataset.read(0)
    assert torch.equal(dataset[0][0], EVAL(image=image)["image"])  # the saved pipeline, not cvft's resize + crop


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--data.augment=randaugmnet"], "Unknown augment preset 'randaugmnet'"),
        (["--data.augment=rand-m12-n2"], "m=12"),
        (["--data.augment=augmix-q3"], "unknown key 'q3'"),
        (["--data.random_erasing=1.5"], "random_erasing is the probability"),
        (["--data.random_erasing=0.1", "--data.random_erasing_mode=zeros"], "Unknown random_erasing_mode 'zeros'"),
        (["--data.train_transform=missing.yaml"], "train_transform file missing.yaml does not exist"),
        (["--data.train_transform=missing.yaml", "--data.random_erasing=0.1"], "Put the erasing into your pipeline"),
    ],
)
def test_bad_augmentation_values_exit_with_code_2(shapes_folder, resnet_weights, tmp_path, capsys, options, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(_args(shapes_folder, resnet_weights, tmp_path, *options))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert expected in err and "Traceback" not in err


def _medical_args(npz: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--task=medical",
        "--model.backbone=test_resnet",
        "--model.pretrained=false",
        "--model.strategies=lora",
        f"--data.medmnist={npz}",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


def test_medical_fit_with_a_policy_and_random_erasing_saves_them(tmp_path):
    npz = tiny_medmnist(tmp_path / "tiny.npz", (16, 8, 8))
    main(_medical_args(npz, tmp_path / "runs", "--data.augment=trivialaugment", "--data.random_erasing=0.25"))
    checkpoint = torch.load(tmp_path / "runs" / "cvft" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    saved = checkpoint["datamodule_hyper_parameters"]
    assert (saved["augment"], saved["random_erasing"]) == ("trivialaugment", 0.25)


def test_a_natural_image_preset_on_medical_data_exits_with_code_2(tmp_path, capsys):
    npz = tiny_medmnist(tmp_path / "tiny.npz", (16, 8, 8))
    with pytest.raises(SystemExit) as exit_info:
        main(_medical_args(npz, tmp_path / "runs", "--data.augment=strong"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "Unknown medical augmentation preset 'strong'" in err and "Traceback" not in err
