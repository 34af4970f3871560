from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from cvft.cli import main
from cvft.medical.explain import attention_rollout, explain_images, grad_cam, overlay, rollout
from cvft.tasks import ImageClassifier


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                                      nn.ReLU())  # fmt: skip
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _reference_cam(model: nn.Module, images: torch.Tensor, target: int) -> torch.Tensor:
    store = {}
    handle = model.features.register_forward_hook(lambda _m, _i, out: store.update(act=out))
    images = images.clone().requires_grad_(True)
    logits = model(images)
    store["act"].retain_grad()
    logits[:, target].sum().backward()
    handle.remove()
    act, grad = store["act"].detach(), store["act"].grad
    cam = torch.relu((grad.mean((2, 3))[:, :, None, None] * act).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return (cam - low) / (high - low)


def test_grad_cam_equals_a_hand_computed_reference():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    images = torch.randn(2, 3, 16, 16)
    cams = grad_cam(model, images, target_class=2, layer=model.features)
    assert cams.shape == (2, 16, 16) and float(cams.min()) == 0.0 and float(cams.max()) == pytest.approx(1.0)
    torch.testing.assert_close(cams, _reference_cam(model, images, 2), atol=1e-5, rtol=1e-5)
    predicted = model(images).argmax(1)
    for i in range(2):
        expected = _reference_cam(model, images[i : i + 1], int(predicted[i]))
        torch.testing.assert_close(grad_cam(model, images[i : i + 1], layer="features"), expected, atol=1e-5, rtol=0)
    assert not model.features._forward_hooks


def test_grad_cam_on_frozen_cnn_and_vit_classifiers():
    torch.manual_seed(0)
    cnn = ImageClassifier("test_resnet", pretrained=False, num_classes=2, strategies="linear_probe").train()
    maps = grad_cam(cnn, torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32) and cnn.training  # mode restored
    assert all(p.grad is None for p in cnn.parameters())
    vit = ImageClassifier("test_vit", pretrained=False, num_classes=3)
    maps = grad_cam(vit, torch.randn(1, 3, 32, 48), target_class=1)
    assert maps.shape == (1, 32, 48) and float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


def _attention_by_hand(vit: nn.Module, images: torch.Tensor) -> list[np.ndarray]:
    """softmax(q k^T / sqrt(d)) recomputed from each attention module's input (independent of the fused path)."""
    maps = []

    def capture(module, inputs):
        x = inputs[0]
        b, n, _ = x.shape
        qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        maps.append(((qkv[0] @ qkv[1].transpose(-2, -1)) * module.scale).softmax(-1).detach().numpy())

    handles = [block.attn.register_forward_pre_hook(capture) for block in vit.blocks]
    with torch.no_grad():
        vit(images)
    for handle in handles:
        handle.remove()
    return maps


def test_attention_rollout_equals_numpy_rollout():
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False).eval()
    images = torch.randn(2, 3, 48, 32) * 3
    attentions = _attention_by_hand(vit, images)
    tokens = attentions[0].shape[-1]
    rolled = np.broadcast_to(np.eye(tokens), (2, tokens, tokens))
    for layer in attentions:
        fused = layer.mean(1)
        mixed = (fused + np.eye(tokens)) / 2
        mixed = mixed / mixed.sum(-1, keepdims=True)
        rolled = mixed @ rolled
    torch.testing.assert_close(rollout([torch.tensor(a) for a in attentions]).double(), torch.tensor(rolled),
                               atol=1e-5, rtol=1e-4)  # fmt: skip
    grid = torch.tensor(rolled[:, 0, 1:]).float().reshape(2, 1, 3, 2)  # 48 x 32 input, 16 px patches
    grid = nn.functional.interpolate(grid, size=(48, 32), mode="bilinear", align_corners=False)[:, 0]
    low, high = grid.amin((1, 2), keepdim=True), grid.amax((1, 2), keepdim=True)
    maps = attention_rollout(vit, images)
    torch.testing.assert_close(maps, (grid - low) / (high - low), atol=1e-4, rtol=1e-4)
    assert all(block.attn.fused_attn == timm.layers.use_fused_attn() for block in vit.blocks)  # restored


def test_rollout_head_fusion_and_discard_ratio():
    attention = torch.rand(1, 2, 4, 4).softmax(-1)
    by_max = rollout([attention], head_fusion="max")
    fused = attention.amax(1)
    expected = (fused + torch.eye(4)) / 2
    torch.testing.assert_close(by_max, expected / expected.sum(-1, keepdim=True))
    discarded = rollout([attention], discard_ratio=0.5)
    kept = (attention.mean(1) > attention.mean(1).flatten().median()).sum()
    assert discarded.shape == (1, 4, 4) and kept <= 8
    assert torch.allclose(discarded.sum(-1), torch.ones(1, 4))


def test_overlay_keeps_the_image_size():
    image = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    heat = np.linspace(0, 1, 35, dtype=np.float32).reshape(7, 5)
    blended = overlay(image, heat, alpha=0.5)
    assert blended.shape == (40, 30, 3) and blended.dtype == np.uint8
    assert np.array_equal(overlay(image, heat, alpha=0.0), image)
    assert overlay(np.zeros((12, 9), np.float32), torch.rand(3, 3)).shape == (12, 9, 3)


def test_explain_images_writes_one_png_per_file(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    png = tmp_path / "xray.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36), dtype=np.uint8)).save(png)
    dicom = pydicom.data.get_testdata_file("CT_small.dcm")
    model = ImageClassifier("test_vit", pretrained=False, class_names=["normal", "nodule"])
    written = explain_images(model, [png, dicom], out_dir=tmp_path / "out")
    assert [p.name for p in written] == ["xray.png", "CT_small.png"]
    assert all(Image.open(p).size[0] > 100 for p in written)


def test_cvft_explain_on_a_checkpoint_from_a_one_step_fit(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("normal", "pneumonia"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    fit = ["fit", "--model.backbone=test_resnet", "--model.pretrained=false", "--model.warmup_epochs=0",
           f"--data.root={tmp_path / 'data'}", "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0",
           "--data.val_fraction=0.4", "--data.augment=none", "--trainer.max_epochs=1",
           "--trainer.limit_train_batches=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={tmp_path / 'runs'}", "--medical_report.enabled=true"]  # fmt: skip
    main(fit)
    run = next((tmp_path / "runs").glob("*/version_0"))
    assert (run / "roc_curves.png").is_file() and (run / "medical_metrics.csv").is_file()
    images = [str(tmp_path / "data" / "normal" / "0.png"), str(tmp_path / "data" / "pneumonia" / "0.png")]
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--images", *images,
              "--out", str(tmp_path / "explanations")])  # fmt: skip
    assert exit_info.value.code == 0
    assert sorted(p.name for p in (tmp_path / "explanations").iterdir()) == ["0.png", "0_1.png"]
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--images", images[0]])
    assert exit_info.value.code == 2
