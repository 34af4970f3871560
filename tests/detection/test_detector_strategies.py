"""Classifier strategies on ObjectDetector's backbone: what trains, frozen statistics, schedules, adapters, refusals."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch.utils.data import DataLoader

from cvft.errors import StrategyError
from cvft.strategies._freeze import has_frozen_stats, is_batchnorm
from cvft.tasks import ObjectDetector

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def tiny_batch(size: int = 64) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[8.0, 10, 30, 36], [36, 30, 60, 58]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[20.0, 12, 50, 40]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def make_detector(backbone: str = "test_resnet", head: str = "fcos", **kwargs) -> ObjectDetector:
    kwargs = {"pretrained": False, "image_size": 64, "fpn_channels": 32, **kwargs}
    return ObjectDetector(2, backbone=backbone, head=head, **kwargs)


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def neck_and_heads(model: ObjectDetector) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(("neck.", "detector."))}


def adamw_steps(model: ObjectDetector, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(model.param_groups())
    assert all(g["weight_decay"] > 0 for g in optimizer.param_groups if g["name"].endswith("/decay"))
    images, targets = tiny_batch()
    model.train()
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_linear_probe_trains_only_neck_and_heads():
    model = make_detector(strategies=["linear_probe"], lr=1e-2)
    assert trainable(model) == neck_and_heads(model)
    body = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in model.detector.state_dict().items()}
    adamw_steps(model)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in body.items())  # weights and BN statistics
    assert not all(torch.equal(v, model.detector.state_dict()[k]) for k, v in head.items())


@pytest.mark.parametrize("freeze_bn_stats", [True, False])
def test_freeze_bn_stats_keeps_running_statistics(freeze_bn_stats):
    model = make_detector(freeze_bn_stats=freeze_bn_stats, backbone_lr_scale=1.0)
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_" in k}
    weight = model.backbone.conv1[0].weight.clone()
    adamw_steps(model, steps=1)
    unchanged = all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in stats.items())
    assert unchanged == freeze_bn_stats
    assert not torch.equal(weight, model.backbone.conv1[0].weight)  # affine and conv weights still train


def test_lora_trains_exactly_lora_neck_and_heads():
    model = make_detector("test_vit", strategies=[{"name": "lora", "rank": 4, "targets": [r"blocks\.\d+\.attn\.qkv"]}])
    blocks = len(timm.create_model("test_vit").blocks)
    lora = {f"backbone.blocks.{i}.attn.qkv.lora_{ab}.weight" for i in range(blocks) for ab in "AB"}
    assert trainable(model) == lora | neck_and_heads(model)
    images, targets = tiny_batch()
    sum(model.train()(images, targets).values()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in lora and "lora_A" in n)


class _RecordTrainable(pl.Callback):
    def __init__(self) -> None:
        self.by_epoch: dict[int, int] = {}
        self.bn_frozen: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.by_epoch[trainer.current_epoch] = sum(p.requires_grad for p in pl_module.backbone.parameters())
        self.bn_frozen.append(all(has_frozen_stats(m) for m in pl_module.backbone.modules() if is_batchnorm(m)))


def test_gradual_unfreeze_opens_backbone_groups_at_milestones(tmp_path):
    model = make_detector(strategies=[{"name": "gradual_unfreeze", "milestones": [1, 2]}])
    total = sum(1 for _ in model.backbone.parameters())
    recorder = _RecordTrainable()
    trainer = pl.Trainer(
        max_epochs=3, limit_train_batches=1, limit_val_batches=0, callbacks=[recorder], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, DataLoader([tiny_batch()], batch_size=None))
    assert recorder.by_epoch[0] == 0 and 0 < recorder.by_epoch[1] < total and recorder.by_epoch[2] == total
    assert all(recorder.bn_frozen)  # freeze_bn_stats holds after the schedule releases groups


def test_adapter_round_trip_gives_identical_outputs(tmp_path):
    strategies = [{"name": "lora", "rank": 2}]
    torch.manual_seed(0)
    model = make_detector("test_vit", strategies=strategies, score_thresh=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    path = model.save_adapter(tmp_path / "detector")
    assert path.name == "detector.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == trainable(model)  # no frozen pretrained weights
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected = model.eval()(image)[0]
        torch.manual_seed(0)
        fresh = make_detector("test_vit", strategies=strategies, score_thresh=0.0).eval()
        assert not torch.equal(fresh(image)[0]["scores"], expected["scores"])
        fresh.load_adapter(path)
        actual = fresh(image)[0]
        torch.manual_seed(0)
        rebuilt = ObjectDetector.from_adapter(path, pretrained=False).eval()
        again = rebuilt(image)[0]
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(expected[key], actual[key]) and torch.equal(expected[key], again[key])
    assert rebuilt.hparams.head == "fcos" and rebuilt.hparams.fpn_channels == 32


def test_param_groups_scale_backbone_and_cover_every_parameter():
    model = make_detector(strategies=["layerwise_lr"], lr=1e-3, backbone_lr_scale=0.1)
    groups = model.param_groups()
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    backbone = [g for g in groups if g["param_names"][0].startswith("backbone.")]
    assert max(g["lr"] for g in backbone) <= 1e-4 + 1e-12 < 1e-3
    assert {g["lr"] for g in groups if g["name"].startswith(("neck/", "head/"))} == {1e-3}


@pytest.mark.parametrize(
    ("strategies", "match"),
    [(["vpt"], "forward_intermediates"), (["l2sp"], "parameter strategies only"), (["supcon"], "several views")],
)
def test_refused_strategies(strategies, match):
    with pytest.raises(StrategyError, match=match):
        make_detector("test_vit", strategies=strategies)
