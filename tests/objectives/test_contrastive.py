"""Supervised contrastive fine-tuning: the SupCon loss against hand computations, and the ``supcon`` strategy."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from cvft.errors import StrategyError
from cvft.strategies import build_strategy
from cvft.strategies.aux import get_aux_module
from cvft.strategies.contrastive import (
    SupCon,
    distributed_supcon_loss,
    supcon_loss,
)
from cvft.strategies.outputs import StepOutputs, forward_with_features, split_views
from cvft.tasks import ImageClassifier
from cvft.workflows import linear_probe_after_contrastive

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
from strategy_testkit import make_trainer, toy_task  # noqa: E402


# ---------------------------------------------------------------------------------------------- reference, by hand
def reference_supcon(z: list[list[float]], labels: list[int], temperature: float) -> float:
    """Eq. 2 of Khosla et al. with explicit loops over anchors, positives and the denominator (plain floats)."""
    unit = []
    for row in z:
        norm = math.sqrt(sum(v * v for v in row))
        unit.append([v / norm for v in row])
    n = len(unit)

    def sim(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(unit[i], unit[j], strict=True)) / temperature

    total, anchors = 0.0, 0
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue  # anchors without a positive are excluded
        denominator = sum(math.exp(sim(i, a)) for a in range(n) if a != i)
        term = sum(math.log(math.exp(sim(i, p)) / denominator) for p in positives)
        total += -term / len(positives)
        anchors += 1
    return total / anchors


# 4 images x 2 views, 3-d embeddings, view-major rows (view 0 of images 0..3, then view 1)
Z = [
    [1.0, 0.2, -0.3],
    [0.8, 0.1, 0.4],
    [-0.5, 1.0, 0.2],
    [0.1, -0.7, 0.9],
    [0.9, 0.3, -0.1],
    [0.7, -0.2, 0.5],
    [-0.4, 0.8, 0.6],
    [0.3, -0.9, 0.7],
]
LABELS = [0, 0, 1, 2, 0, 0, 1, 2]


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_loss_matches_hand_computation(temperature):
    expected = reference_supcon(Z, LABELS, temperature)
    got = supcon_loss(torch.tensor(Z), torch.tensor(LABELS), temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_anchors_without_positive_are_left_out_of_the_mean():
    z, labels = Z[:4], [0, 0, 1, 2]  # one view only: images 2 and 3 have no positive
    expected = reference_supcon(z, labels, 0.1)
    assert supcon_loss(torch.tensor(z), torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-5)
    # all-distinct labels: no anchor counts; a zero that still backpropagates
    x = torch.tensor(z, requires_grad=True)
    loss = supcon_loss(x, torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_base_temperature_scales_by_t_over_base_t():
    z, y = torch.tensor(Z), torch.tensor(LABELS)
    plain = supcon_loss(z, y, temperature=0.1)
    assert supcon_loss(z, y, temperature=0.1, base_temperature=0.1).item() == pytest.approx(plain.item())
    scaled = supcon_loss(z, y, temperature=0.1, base_temperature=0.07)
    assert scaled.item() == pytest.approx(plain.item() * 0.1 / 0.07, rel=1e-6)


def test_gradient_matches_reference_autograd():
    # the same formula written with plain torch ops (no max subtraction, no masking tricks): gradients must agree
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(LABELS)
    u = F.normalize(z, dim=1)
    s = u @ u.T / 0.1
    eye = torch.eye(len(z), dtype=torch.bool)
    log_prob = s - torch.log((s.exp() * (~eye)).sum(1, keepdim=True))
    pos = (y[:, None] == y[None, :]) & ~eye
    reference = (-(log_prob * pos).sum(1) / pos.sum(1)).mean()
    (grad_ref,) = torch.autograd.grad(reference, z)
    z2 = z.detach().clone().requires_grad_(True)
    supcon_loss(z2, y).backward()
    assert torch.allclose(z2.grad.double(), grad_ref, atol=1e-5)


def test_invariant_to_permuting_the_batch():
    torch.manual_seed(0)
    z, y = torch.randn(12, 5), torch.tensor([0, 1, 2, 0, 1, 2] * 2)
    perm = torch.randperm(12)
    assert supcon_loss(z[perm], y[perm]).item() == pytest.approx(supcon_loss(z, y).item(), rel=1e-6)
    # and to the scale of each embedding (they are normalised)
    scales = torch.rand(12, 1) + 0.5
    assert supcon_loss(z * scales, y).item() == pytest.approx(supcon_loss(z, y).item(), rel=1e-5)


def test_label_clustered_embeddings_score_lower_than_random():
    torch.manual_seed(0)
    y = torch.arange(4).repeat_interleave(4)
    centres = F.normalize(torch.randn(4, 16), dim=1)
    clustered = centres[y] + 0.05 * torch.randn(16, 16)
    random = torch.randn(16, 16)
    assert supcon_loss(clustered, y) < supcon_loss(random, y) - 1.0


def test_numerically_stable_at_small_temperature():
    z = torch.tensor(Z) * 1e3
    loss = supcon_loss(z, torch.tensor(LABELS), temperature=1e-3)
    assert torch.isfinite(loss)
    assert supcon_loss(z.half(), torch.tensor(LABELS), temperature=0.1).dtype == torch.float32


def test_multi_label_and_soft_targets_are_refused():
    with pytest.raises(StrategyError, match="Multi-label or soft"):
        supcon_loss(torch.randn(4, 3), torch.tensor([[1, 0], [0, 1], [1, 1], [0, 1]]))
    with pytest.raises(StrategyError, match="one class index per sample"):
        supcon_loss(torch.randn(4, 3), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(StrategyError, match="one label per row"):
        supcon_loss(torch.randn(4, 3), torch.tensor([0, 1, 0]))


def test_distributed_form_equals_plain_loss_without_process_group():
    z, y = torch.tensor(Z), torch.tensor(LABELS)
    assert distributed_supcon_loss(z, y, 0.2, 0.07).item() == pytest.approx(supcon_loss(z, y, 0.2, 0.07).item())


# ---------------------------------------------------------------------------------------------- strategy
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "pretrain"}, "'joint'"),
        ({"weight": 0.0}, "weight must be > 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"base_temperature": -1.0}, "base_temperature"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"out_dim": 0}, "out_dim"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, message):
    with pytest.raises(StrategyError, match=message):
        SupCon(**kwargs)


def test_class_attributes_task_weight_and_config_round_trip():
    joint, alone = build_strategy("supcon"), build_strategy({"name": "supcon", "mode": "alone", "weight": 0.5})
    assert (SupCon.num_views, SupCon.needs_features, SupCon.objective) == (2, True, True)
    assert (joint.task_loss_weight, alone.task_loss_weight) == (1.0, 0.0)
    assert "task_loss_weight" not in alone.config()
    rebuilt = build_strategy({"name": "supcon", **alone.config()})
    assert rebuilt.config() == alone.config() and rebuilt.task_loss_weight == 0.0


@pytest.mark.parametrize(
    "name, dim, kwargs",
    [("test_resnet", 96, {}), ("test_vit", 64, {"img_size": 32}), ("mobilenetv3_small_050", 1024, {})],
)
def test_projection_head_shape_and_trainability(name, dim, kwargs):
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    build_strategy("linear_probe").setup(model)
    SupCon(out_dim=16).setup(model)
    head = get_aux_module(model, "supcon_projection")
    shapes = [tuple(p.shape) for p in head.parameters()]
    assert shapes == [(dim, dim), (dim,), (16, dim), (16,)]  # hidden = D by default
    assert all(p.requires_grad for p in head.parameters())
    # the projection consumes exactly the pooled pre-logit features the training step hands over
    _, features = forward_with_features(model.eval(), torch.randn(2, 3, 32, 32))
    assert head(features).shape == (2, 16)


def test_loss_terms_use_both_views_and_need_features():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    strategy = SupCon(weight=2.0, out_dim=8)
    strategy.setup(model)
    images, targets, views = split_views(torch.randn(4, 2, 3, 32, 32), torch.tensor([0, 1, 0, 2]))
    logits, features = forward_with_features(model, images)
    outputs = StepOutputs(logits, images, targets, features, num_views=views)
    term = strategy.loss_terms(model, None, outputs)["contrastive"]
    projected = get_aux_module(model, "supcon_projection")(features)
    assert term.item() == pytest.approx(2.0 * supcon_loss(projected, targets).item(), rel=1e-5)
    # with two views, every anchor has a positive (its other view), so all 8 rows count
    assert supcon_loss(projected, targets).item() == pytest.approx(
        reference_supcon(projected.tolist(), targets.tolist(), 0.1), rel=1e-4
    )
    with pytest.raises(StrategyError, match="needs the pooled features"):
        strategy.loss_terms(model, None, StepOutputs(logits, images, targets, None, num_views=2))


# ---------------------------------------------------------------------------------------------- training
def _two_view_loader(n: int = 32, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """Toy images with two independently noised views each: ``(B, 2, C, H, W)`` batches."""
    images, targets = toy_task(n, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    views = torch.stack([images + 0.3 * torch.randn(images.shape, generator=generator) for _ in range(2)], 1)
    return DataLoader(TensorDataset(views, targets), batch_size=batch_size, shuffle=False)


def _objective(classifier: ImageClassifier, loader: DataLoader) -> float:
    """The training objective (task loss x weight + SupCon terms) on the whole loader, without updating anything."""
    total = 0.0
    with torch.no_grad():
        for batch in loader:
            images, targets, views = split_views(*batch)
            logits, features = forward_with_features(classifier.backbone, images)
            outputs = StepOutputs(logits, images, targets, features, num_views=views)
            terms = classifier.strategy_stack.loss_terms(classifier.backbone, batch, outputs)
            weight = classifier.strategy_stack.task_loss_weight
            total += float(weight * classifier.loss(logits, targets) + sum(terms.values()))
    return total


def _classifier(name: str, strategies, **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    backbone_kwargs = {"img_size": 32} if name == "test_vit" else None
    return ImageClassifier(
        name, pretrained=False, num_classes=4, strategies=strategies, backbone_kwargs=backbone_kwargs, **kwargs
    )


def test_linear_probe_with_supcon_trains_head_and_projection_only():
    model = _classifier("test_resnet", [{"name": "linear_probe"}, {"name": "supcon", "out_dim": 32}], lr=1e-2)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("cvft_aux.supcon_projection.")} == {"fc.weight", "fc.bias"}
    assert len([n for n in trainable if n.startswith("cvft_aux.supcon_projection.")]) == 4
    loader = _two_view_loader()
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    buffers = {n: b.clone() for n, b in model.backbone.named_buffers()}
    start = _objective(model.eval(), loader)
    make_trainer(6, limit_val_batches=0).fit(model, loader)
    assert _objective(model.eval(), loader) < 0.8 * start
    for name, param in model.backbone.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name
    for name, buffer in model.backbone.named_buffers():
        assert torch.equal(buffer, buffers[name]), f"frozen BatchNorm statistics changed: {name}"


def test_lora_with_supcon_trains_lora_and_projection():
    strategies = [{"name": "lora", "rank": 4}, {"name": "supcon", "out_dim": 16, "weight": 0.5}]
    model = _classifier("test_vit", strategies, lr=3e-3)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trainable) and any(n.startswith("cvft_aux.") for n in trainable)
    loader = _two_view_loader()
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    start = _objective(model.eval(), loader)
    make_trainer(4, limit_val_batches=0).fit(model, loader)
    assert _objective(model.eval(), loader) < start
    changed = {n for n, p in model.backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable and any(n.startswith("cvft_aux.supcon_projection") for n in changed)
    assert any("lora" in n for n in changed)


# ---------------------------------------------------------------------------------------------- data path, two stages
def _shapes_folder(root: Path, per_class: int = 12, size: int = 40) -> Path:
    """A learnable 3-class image folder: red discs, green squares, blue stripes on dark noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for kind in ("disc", "square", "stripes"):
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            canvas = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            if kind == "disc":
                canvas[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = (230, 60, 60)
            elif kind == "square":
                canvas[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (60, 230, 60)
            else:
                canvas[(xx // 4) % 2 == 0] = (60, 60, 230)
            Image.fromarray(canvas).save(root / kind / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return _shapes_folder(tmp_path_factory.mktemp("supcon") / "shapes")


def _data(root: Path, batch_size: int = 8):
    from cvft.data import ImageFolderDataModule

    # str: a Path in the data hparams would make the checkpoint unloadable with weights_only=True
    return ImageFolderDataModule(
        str(root), image_size=32, batch_size=batch_size, num_workers=0, val_fraction=0.25, seed=0
    )


def test_image_folder_delivers_two_augmented_views_for_supcon(shapes_root):
    import lightning.pytorch as pl

    shapes: dict[str, list] = {"train": [], "val": []}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            shapes["train"].append(batch[0])

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            shapes["val"].append(batch[0])

    model = ImageClassifier("test_resnet", pretrained=False, num_classes=3, strategies=["linear_probe", "supcon"])
    trainer = make_trainer(1, callbacks=[Record()], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=_data(shapes_root))
    train = shapes["train"][0]
    assert train.shape == (8, 2, 3, 32, 32)
    assert not torch.equal(train[:, 0], train[:, 1]), "the two views must be independent augmentations"
    assert shapes["val"][0].shape[1:] == (3, 32, 32)  # evaluation stays single-view
    logged = trainer.callback_metrics
    assert "train/supcon/contrastive" in logged and torch.isfinite(logged["train/supcon/contrastive"])


def _fit_and_score(model: ImageClassifier, root: Path, epochs: int) -> float:
    trainer = make_trainer(epochs, limit_val_batches=1.0)
    data = _data(root)
    trainer.fit(model, datamodule=data)
    return float(trainer.validate(model, datamodule=data, verbose=False)[0]["val/acc"])


@pytest.mark.slow
def test_contrastive_alone_then_linear_probe_two_stage_flow(shapes_root, tmp_path, capsys):
    torch.manual_seed(0)
    stage1 = ImageClassifier(
        "test_resnet",
        pretrained=False,
        num_classes=3,
        lr=3e-3,
        warmup_epochs=0,
        strategies=["full", {"name": "supcon", "mode": "alone", "out_dim": 32}],
    )
    assert stage1.strategy_stack.task_loss_weight == 0.0
    trainer = make_trainer(8, limit_val_batches=0)
    trainer.fit(stage1, datamodule=_data(shapes_root))
    ckpt = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(ckpt)
    stem = next(iter(stage1.backbone.parameters())).detach().clone()  # the first convolution

    # stage 2 from the Lightning checkpoint: folded, projection head dropped, backbone frozen, head trains
    probe = linear_probe_after_contrastive(ckpt, tmp_path / "stage1.safetensors", lr=1e-2, warmup_epochs=0)
    assert not hasattr(probe.backbone, "cvft_aux")
    assert torch.equal(next(iter(probe.backbone.parameters())), stem)
    assert [n for n, p in probe.backbone.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    contrastive_acc = _fit_and_score(probe, shapes_root, 8)
    assert torch.equal(next(iter(probe.backbone.parameters())), stem), "the probe must not change the backbone"

    torch.manual_seed(0)  # the same random start as stage 1, probed directly
    direct = ImageClassifier(
        "test_resnet", pretrained=False, num_classes=3, lr=1e-2, warmup_epochs=0, strategies=["linear_probe"]
    )
    direct_acc = _fit_and_score(direct, shapes_root, 8)
    with capsys.disabled():
        print(f"\nlinear probe val acc: after supcon stage 1 {contrastive_acc:.3f}, direct {direct_acc:.3f}")
    assert 0.0 <= contrastive_acc <= 1.0 and 0.0 <= direct_acc <= 1.0
