"""Domain adaptation: AdaBN statistics against hand-computed ones, pseudo-label loss against a hand-written CE."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from cvft.data.dataset import ImageDataset
from cvft.data.samples import Sample
from cvft.data.transforms import build_transforms, data_config_for
from cvft.errors import StrategyError
from cvft.strategies import AdaBNCallback, adabn, apply_strategies, build_strategy
from cvft.strategies.outputs import StepOutputs
from cvft.tasks.classification import ImageClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
from strategy_testkit import make_trainer  # noqa: E402

_COLOURS = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], dtype=np.float64)


# --- helpers written for these tests ----------------------------------------------------------------------------


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=4)


def _toy_pixels(n: int, seed: int, contrast: float = 1.0, offset=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """uint8 32x32 images: a class colour around grey plus a class stripe; the target domain is a per-channel
    affine intensity change ``contrast * x + offset`` (what a colour cast / exposure change does)."""
    rng = np.random.default_rng(seed)
    targets = np.arange(n) % 4
    x = 128 + 40 * _COLOURS[targets][:, None, None, :] * np.ones((n, 32, 32, 3))
    for cls in range(4):
        x[targets == cls, cls * 8 : (cls + 1) * 8] += 40
    x = np.clip(x + rng.normal(0, 12, x.shape), 0, 255)
    x = contrast * x + np.asarray(offset)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), targets


def _write_pngs(folder: Path, pixels: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(pixels):
        path = folder / f"{i:03d}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def _eval_transform(model: nn.Module):
    config = data_config_for(model)
    return build_transforms(
        32,
        config["mean"],
        config["std"],
        train=False,
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
    )


def _bn_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _pooled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance over batch and positions, in float64."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


# --- AdaBN ------------------------------------------------------------------------------------------------------


def test_adabn_first_two_bn_layers_equal_hand_computed_target_statistics():
    model = _resnet()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, 32, 32, generator=generator) * 0.7 + 0.8 for n in (5, 7, 4)]
    stem = model.conv1  # conv -> bn -> relu -> conv -> bn -> relu -> conv
    conv_a, bn_a, conv_b, bn_b = stem[0], stem[1], stem[3], stem[4]
    weight_a, bias_a, eps = bn_a.weight.detach().clone(), bn_a.bias.detach().clone(), bn_a.eps
    with torch.no_grad():
        first = [conv_a(x) for x in batches]
        second = []
        for y in first:  # in the pass, each batch is normalised with its own (biased) statistics
            mean = y.mean((0, 2, 3), keepdim=True)
            var = y.var((0, 2, 3), unbiased=False, keepdim=True)
            normed = (y - mean) / torch.sqrt(var + eps) * weight_a[None, :, None, None] + bias_a[None, :, None, None]
            second.append(conv_b(torch.relu(normed)))
    used = adabn(model, batches)
    assert used == 16
    for bn, outputs in ((bn_a, first), (bn_b, second)):
        mean, var = _pooled(torch.cat(outputs))
        torch.testing.assert_close(bn.running_mean.double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, atol=1e-5, rtol=1e-4)
        assert int(bn.num_batches_tracked) == 3


def test_adabn_every_bn_layer_gets_the_pooled_statistics_of_its_inputs():
    model = _resnet()
    reference = copy.deepcopy(model).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, bn in _bn_layers(reference).items():
        bn.train()  # batch statistics, as in the AdaBN pass
        bn.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].detach()))
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.rand(6, 3, 32, 32, generator=generator) * 2, torch.zeros(6)) for _ in range(3)]
    with torch.no_grad():
        for images, _ in batches:
            reference(images)
    adabn(model, batches, batches=2)  # only the first two batches
    for name, bn in _bn_layers(model).items():
        mean, var = _pooled(torch.cat(inputs[name][:2]))
        torch.testing.assert_close(bn.running_mean.double(), mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(bn.running_var.double(), var, atol=1e-5, rtol=1e-4)


def test_adabn_changes_nothing_but_bn_statistics():
    model = _resnet()
    stack = apply_strategies(model, ["linear_probe"])  # freezes BN statistics with guards
    model.train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    momentums = {name: bn.momentum for name, bn in _bn_layers(model).items()}
    adabn(model, [torch.randn(4, 3, 32, 32) + 3.0])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.requires_grad == flags[name]
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: bn.momentum for name, bn in _bn_layers(model).items()} == momentums
    # the statistics moved, and stay fixed during training since linear_probe froze them
    stats = model.bn1.running_mean.clone()
    assert stats.abs().sum() > 0
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, stats)
    assert len(stack) == 1


def test_adabn_from_a_png_folder_uses_the_backbone_preprocessing(tmp_path):
    pixels, _ = _toy_pixels(10, seed=0, contrast=0.7, offset=(50, -10, 20))
    paths = _write_pngs(tmp_path / "target", pixels)
    model = _resnet()
    reference = copy.deepcopy(model)
    assert adabn(model, tmp_path / "target", image_size=32, batch_size=4) == 10
    dataset = ImageDataset(paths, _eval_transform(reference))  # unlabelled: (image, index)
    adabn(reference, DataLoader(dataset, batch_size=4))
    for name, bn in _bn_layers(model).items():
        torch.testing.assert_close(bn.running_mean, _bn_layers(reference)[name].running_mean)
        torch.testing.assert_close(bn.running_var, _bn_layers(reference)[name].running_var)


def test_adabn_refuses_models_without_batchnorm(tmp_path):
    vit = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32)
    with pytest.raises(StrategyError, match="no BatchNorm.*pseudo_label"):
        adabn(vit, [torch.randn(2, 3, 32, 32)])
    with pytest.raises(StrategyError, match="BatchNorm CNNs"):
        build_strategy({"name": "adabn", "target_root": str(tmp_path)}).setup(vit)
    with pytest.raises(StrategyError, match="batch_size"):
        build_strategy({"name": "adabn", "target_root": str(tmp_path), "batch_size": 0})


def test_adabn_strategy_runs_before_training_and_callback_before_testing(tmp_path):
    pixels, labels = _toy_pixels(8, seed=3, contrast=0.6, offset=(60, 0, 30))
    paths = _write_pngs(tmp_path / "target", pixels)
    expected = _resnet()
    adabn(expected, tmp_path / "target", image_size=32)
    spec = {"name": "adabn", "target_root": str(tmp_path / "target"), "image_size": 32}
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=4, strategies=["linear_probe", spec])
    model.backbone.load_state_dict(_resnet().state_dict())
    images = torch.stack([ImageDataset(paths, _eval_transform(model.backbone))[i][0] for i in range(8)])
    loader = DataLoader(list(zip(images, torch.as_tensor(labels), strict=True)), batch_size=4)
    make_trainer(1, limit_train_batches=2).fit(model, loader)
    for name, bn in _bn_layers(model.backbone).items():  # set before the first step, frozen by linear_probe
        torch.testing.assert_close(bn.running_mean, _bn_layers(expected)[name].running_mean)

    source_model = ImageClassifier("test_resnet", pretrained=False, num_classes=4)
    source_model.backbone.load_state_dict(_resnet().state_dict())
    callback = AdaBNCallback(str(tmp_path / "target"), image_size=32, stages=("test",))
    make_trainer(1, callbacks=[callback]).test(source_model, loader, verbose=False)
    torch.testing.assert_close(source_model.backbone.bn1.running_var, expected.bn1.running_var)


# --- pseudo-labels ----------------------------------------------------------------------------------------------


def _pseudo_label(root: Path, **kwargs):
    return build_strategy({"name": "pseudo_label", "target_root": str(root), "image_size": 32, **kwargs})


def test_pseudo_label_loss_equals_hand_written_ce_on_the_confident_subset(tmp_path):
    pixels, _ = _toy_pixels(6, seed=4)
    paths = _write_pngs(tmp_path / "target", pixels)
    model = _resnet().eval()
    with torch.no_grad():
        model.fc.weight.mul_(20.0)

    # the first batch of the stream: the first 4 items of a permutation seeded with `seed`
    order = torch.randperm(6, generator=torch.Generator().manual_seed(7))[:4].tolist()
    dataset = ImageDataset(paths, _eval_transform(model))
    images = torch.stack([dataset[i][0] for i in order])
    with torch.no_grad():
        logits = model(images)
    probs = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    confidence, labels = probs.max(1)
    ranked = confidence.sort().values
    threshold = float(ranked[1] + ranked[2]) / 2  # keeps the two most confident images
    keep = confidence >= threshold
    assert int(keep.sum()) == 2
    log_probs = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    expected = 0.5 * -(log_probs[keep].gather(1, labels[keep, None]).sum() / keep.sum())

    strategy = _pseudo_label(tmp_path / "target", threshold=threshold, weight=0.5, batch_size=4, seed=7)
    strategy.setup(model)
    outputs = StepOutputs(logits=torch.zeros(2, 4), images=torch.zeros(2, 3, 32, 32))
    term = strategy.loss_terms(model, None, outputs)["ce"]
    torch.testing.assert_close(term.detach(), expected, atol=1e-5, rtol=1e-5)
    assert strategy.last_kept_fraction == 0.5
    assert term.requires_grad


def test_pseudo_label_threshold_filters_and_empty_selection_adds_zero(tmp_path):
    _write_pngs(tmp_path / "target", _toy_pixels(4, seed=5)[0])
    strategy = _pseudo_label(tmp_path / "target", threshold=0.9)
    uniform = torch.zeros(3, 4, requires_grad=True)  # confidence 0.25 everywhere
    loss = strategy.pseudo_label_loss(uniform)
    assert float(loss.detach()) == 0.0 and strategy.last_kept_fraction == 0.0
    loss.backward()
    assert torch.equal(uniform.grad, torch.zeros(3, 4))
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    kept = strategy.pseudo_label_loss(logits)
    manual = -(torch.log_softmax(logits[[0, 2]], 1)[[0, 1], [0, 3]]).mean()
    torch.testing.assert_close(kept, manual)
    assert strategy.last_kept_fraction == pytest.approx(2 / 3)
    everything = _pseudo_label(tmp_path / "target", threshold=0.0)
    everything.pseudo_label_loss(logits)
    assert everything.last_kept_fraction == 1.0
    with pytest.raises(StrategyError, match="threshold"):
        _pseudo_label(tmp_path / "target", threshold=1.5)


def test_pseudo_label_stream_cycles_through_the_folder_and_resumes(tmp_path):
    pixels = np.stack([np.full((32, 32, 3), 20 * i, np.uint8) for i in range(5)])  # image i has grey level 20 i
    _write_pngs(tmp_path / "target", pixels)
    model = _resnet()
    strategy = _pseudo_label(tmp_path / "target", batch_size=2, seed=3)
    strategy.setup(model)

    def ids(images: torch.Tensor) -> list[int]:  # recover the grey level from the normalised pixels (mean .5 std .5)
        return [round(float(((im[0, 16, 16] * 0.5 + 0.5) * 255) / 20)) for im in images]

    draws = [ids(strategy.next_target_batch()) for _ in range(6)]
    assert [len(d) for d in draws] == [2, 2, 1, 2, 2, 1]
    assert sorted(sum(draws[:3], [])) == list(range(5)) and sorted(sum(draws[3:], [])) == list(range(5))
    assert sum(draws[:3], []) != sum(draws[3:], [])  # a new order each pass

    resumed = _pseudo_label(tmp_path / "target", batch_size=2, seed=3)
    resumed.setup(model)
    replay = _pseudo_label(tmp_path / "target", batch_size=2, seed=3)
    replay.setup(model)
    for _ in range(4):
        replay.next_target_batch()
    resumed.load_state_dict(replay.state_dict())
    assert ids(resumed.next_target_batch()) == draws[4]


def strategy_batch(strategy) -> torch.Tensor:
    """The batch the strategy drew last, replayed from a fresh copy of its stream."""
    replay = copy.copy(strategy)
    replay.load_state_dict({"drawn": strategy.state_dict()["drawn"] - 1})
    return replay.next_target_batch()


def test_pseudo_label_weight_ramps_up_by_epoch(tmp_path):
    _write_pngs(tmp_path / "target", _toy_pixels(4, seed=6)[0])
    model = _resnet().eval()
    strategy = _pseudo_label(tmp_path / "target", threshold=0.0, weight=2.0, rampup_epochs=4, batch_size=4)
    stack = apply_strategies(model, [strategy])
    images = torch.zeros(1, 3, 32, 32)
    stack.on_epoch_start(model, 0)
    zero = stack.loss_terms(model, (images, torch.zeros(1, dtype=torch.long)), model(images))["pseudo_label/ce"]
    assert float(zero) == 0.0 and strategy.state_dict()["drawn"] == 0  # no target pass at weight 0
    stack.on_epoch_start(model, 1)
    assert strategy.current_weight() == pytest.approx(0.5)
    term = stack.loss_terms(model, (images, torch.zeros(1, dtype=torch.long)), model(images))["pseudo_label/ce"]
    assert strategy.state_dict()["drawn"] == 1
    torch.testing.assert_close(term, 0.5 * strategy.pseudo_label_loss(model(strategy_batch(strategy))))
    stack.on_epoch_start(model, 9)
    assert strategy.current_weight() == pytest.approx(2.0)


def test_pseudo_label_with_lora_trains_only_lora_and_head(tmp_path):
    pixels, labels = _toy_pixels(8, seed=7)
    _write_pngs(tmp_path / "target", pixels)
    specs = [
        {"name": "lora", "rank": 2, "targets": "resnet_blocks"},
        {
            "name": "pseudo_label",
            "target_root": str(tmp_path / "target"),
            "threshold": 0.0,
            "batch_size": 4,
            "image_size": 32,
        },
    ]
    L.seed_everything(0)
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=4, strategies=specs, lr=1e-2)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or n.startswith("fc.") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    images = torch.randn(8, 3, 32, 32)
    loader = DataLoader(list(zip(images, torch.as_tensor(labels), strict=True)), batch_size=4)
    trainer = make_trainer(1, limit_train_batches=2)
    trainer.fit(model, loader)
    assert "train/pseudo_label/ce" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["train/pseudo_label/ce"])
    for name, p in model.backbone.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert model.strategy_stack.strategies[1].state_dict()["drawn"] == 2


# --- integration: source -> shifted target ----------------------------------------------------------------------


@pytest.mark.slow
def test_adabn_and_pseudo_labels_beat_the_source_only_model_on_a_shifted_domain(tmp_path):
    """Source: colour + stripe classes. Target: the same classes under a colour cast (contrast 0.9, per-channel
    offsets), saved without labels; the labels stay here for scoring."""
    logging.getLogger("cvft").setLevel(logging.ERROR)
    source_pixels, source_labels = _toy_pixels(64, seed=0)
    target_pixels, target_labels = _toy_pixels(64, seed=1, contrast=0.9, offset=(20, -20, 20))
    source_paths = _write_pngs(tmp_path / "source", source_pixels)
    target_root = tmp_path / "target"
    target_paths = _write_pngs(target_root, target_pixels)
    transform = _eval_transform(_resnet())
    source = ImageDataset([Sample(p, int(t)) for p, t in zip(source_paths, source_labels, strict=True)], transform)
    target_images = torch.stack([ImageDataset(target_paths, transform)[i][0] for i in range(64)])
    target_targets = torch.as_tensor(target_labels)

    def target_accuracy(module: nn.Module) -> float:
        module.eval()
        with torch.no_grad():
            return float((module(target_images).argmax(1) == target_targets).float().mean())

    def fit(strategies, epochs: int, state=None) -> ImageClassifier:
        L.seed_everything(0)
        module = ImageClassifier(
            "test_resnet",
            pretrained=False,
            num_classes=4,
            lr=3e-3 if state is None else 1e-3,
            warmup_epochs=0,
            strategies=strategies,
        )
        if state is not None:
            module.backbone.load_state_dict(state)
        make_trainer(epochs).fit(module, DataLoader(source, batch_size=16, shuffle=True))
        return module

    source_model = fit(None, 10)
    state = copy.deepcopy(source_model.backbone.state_dict())
    source_only = fit(None, 3, state)  # the same extra epochs on the source alone
    pseudo = fit(
        [{"name": "pseudo_label", "target_root": str(target_root), "batch_size": 16, "image_size": 32}], 3, state
    )
    adapted = copy.deepcopy(source_model)
    adabn(adapted.backbone, target_root, image_size=32)

    baseline = max(target_accuracy(source_model), target_accuracy(source_only))
    assert baseline < 0.9
    assert target_accuracy(adapted) >= baseline + 0.2
    assert target_accuracy(pseudo) >= baseline + 0.15
