"""Every strategy recipe in ``configs/`` builds, and sets up on a model of a family it supports."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from cvft.errors import StrategyError
from cvft.strategies import apply_strategies, build_strategies

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(
    p for p in CONFIGS.glob("*.yaml") if "strategies" in ((yaml.safe_load(p.read_text()) or {}).get("model") or {})
)
FAMILIES = {"test_vit": {"img_size": 32}, "test_resnet": {}}


def test_there_is_a_recipe_for_each_additive_and_selective_method():
    names = {
        s.name
        for recipe in RECIPES
        for s in build_strategies(yaml.safe_load(recipe.read_text())["model"]["strategies"])
    }
    assert {
        "conv_adapter",
        "vit_adapter",
        "vpt",
        "prefix_tuning",
        "ssf",
        "sparse",
        "filter_select",
        "side_module",
        "shared_lora",
    } <= names


def _local_paths(specs: list, tmp_path: Path) -> list:
    """Point file arguments of a recipe at local stand-ins: ``target_root`` at a small generated folder of images,
    ``teacher`` (a run's checkpoint in the recipe, checked when the strategy is set up) at a timm name with a
    weights file."""
    from PIL import Image
    from safetensors.torch import save_file

    folder = tmp_path / "target"
    folder.mkdir(exist_ok=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 80, 160)).save(folder / f"{i}.png")
    teacher_weights = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(teacher_weights))
    local = {"target_root": str(folder), "teacher": "test_resnet", "teacher_weights": str(teacher_weights)}
    return [
        {**s, **{k: v for k, v in local.items() if k in s or (k == "teacher_weights" and "teacher" in s)}}
        if isinstance(s, dict)
        else s
        for s in specs
    ]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_sets_up_on_a_supported_family(recipe, tmp_path):
    specs = _local_paths(yaml.safe_load(recipe.read_text())["model"]["strategies"], tmp_path)
    batches = [(torch.randn(4, 3, 32, 32), torch.arange(4) % 3)]
    errors = {}
    for name, kwargs in FAMILIES.items():
        model = timm.create_model(name, num_classes=3, **kwargs)
        try:
            apply_strategies(model, specs, calibration_data=batches)
        except StrategyError as err:
            errors[name] = str(err)
            continue
        with torch.no_grad():
            assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert len(errors) < len(FAMILIES), f"{recipe.name} fits no test family: {errors}"
    for message in errors.values():  # a refusal says which families the method supports, or which layer is missing
        assert "support" in message or "matches no" in message, message


@pytest.mark.slow
def test_cvft_fit_with_the_sparse_recipe_calibrates_and_writes_a_sparse_adapter(
    shapes_folder, resnet_weights, tmp_path
):
    from test_cli import _fit_args, _run

    args = _fit_args(shapes_folder, resnet_weights, tmp_path / "runs", f"--config={CONFIGS / 'sparse.yaml'}")
    args.insert(1, args.pop())  # --config before the other options, as a user writes it
    fit = _run(args, tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    adapter = load_file(str(next((tmp_path / "runs").rglob("adapter.safetensors"))))
    assert {"sparse_delta.values", "sparse_delta.indices"} <= set(adapter)
    assert adapter["sparse_delta.indices"].shape == adapter["sparse_delta.values"].shape
    assert adapter["sparse_delta.values"].abs().sum() > 0, "the selected entries did not train"
    assert all(not key.endswith("base.weight") for key in adapter), "dense base weights leaked into the adapter"


DETECTION_RECIPES = sorted((CONFIGS / "detection").glob("*.yaml"))


@pytest.mark.parametrize("recipe", DETECTION_RECIPES, ids=lambda p: p.stem)
def test_detection_recipe_instantiates_and_detects(recipe, tmp_path):
    """Each detection recipe builds its detector and data; hub weights and absent data get small stand-ins."""
    from cvft.cli import find_task, run_detection_cli
    from cvft.data.detection import write_shapes_detection

    assert find_task(["fit", "--config", str(recipe)]) == "detection"
    config = yaml.safe_load(recipe.read_text())
    stand_in = write_shapes_detection(tmp_path / "shapes", num_images=6, image_size=48)
    data_yaml = config["data"].get("data_yaml")
    if data_yaml and (CONFIGS.parent / data_yaml).is_file():  # COCO128 where ../shared/assets is present
        data = [f"--data.data_yaml={CONFIGS.parent / data_yaml}"]
    elif data_yaml:  # the stand-in has its own classes: a recipe's class filter does not apply to it
        data = [f"--data.data_yaml={stand_in / 'data.yaml'}", "--data.classes=null"]
    else:
        data = [f"--data.coco_json={stand_in / 'annotations.json'}"]
    model = ["--model.fpn_channels=32"]  # narrower neck and head: faster, same code paths
    if config["model"].get("pretrained"):  # hub weights: a tiny model of the same family, offline
        tiny = "test_vit" if "vit" in config["model"]["backbone"] else "test_resnet"
        model += [f"--model.backbone={tiny}", "--model.pretrained=false"]
    args = [f"--config={recipe}", *data, *model, "--data.image_size=64", "--data.num_workers=0"]
    cli = run_detection_cli([*args, f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu"], run=False)
    detector = cli.model
    assert detector.num_classes == cli.datamodule.num_classes and detector.hparams.image_size == 64
    assert detector.hparams.head == config["model"]["head"]
    trainable = sum(p.numel() for p in detector.backbone.parameters() if p.requires_grad)
    total = sum(p.numel() for p in detector.backbone.parameters())
    if config["model"].get("strategies"):
        assert trainable < total, f"{recipe.name}: its strategies leave the whole backbone training"
    with torch.no_grad():
        out = detector.eval()([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[-1] == 4
