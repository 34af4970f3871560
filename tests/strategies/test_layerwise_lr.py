"""Layer-wise learning-rate decay: the scales, and the learning rates they give in every usage mode."""

from __future__ import annotations

import pytest
import torch
from strategy_testkit import (
    BODY_PREFIXES,
    MODELS,
    ForeignClassifier,
    body_group,
    head_names,
    make_backbone,
    make_trainer,
    toy_loader,
)

from cvft.backbones.layer_groups import layer_groups
from cvft.errors import StrategyError
from cvft.strategies import LayerwiseLRDecay, Strategy, StrategyCallback, StrategyStack, build_param_groups
from cvft.tasks import ImageClassifier


def expected_scales(model_name, model, decay):
    """Head 1.0; the body group ``i`` (stem = 0) gets ``decay ** (num_groups - 1 - i)`` with the head counted."""
    body = BODY_PREFIXES[model_name]
    scales = {name: 1.0 for name in head_names(model)}
    for index in range(len(body)):
        scales |= {name: decay ** (len(body) - index) for name in body_group(model_name, model, index)}
    return scales


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("decay", [0.5, 0.75, 1.0])
def test_scales_decay_from_head_to_stem(model_name, decay):
    model = make_backbone(model_name)
    scales = LayerwiseLRDecay(decay=decay).lr_scales(model)
    assert scales == pytest.approx(expected_scales(model_name, model, decay))
    assert set(scales) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("model_name", MODELS)
def test_coarse_groups_follow_timm_coarse_matcher(model_name):
    model = make_backbone(model_name)
    groups = layer_groups(model, coarse=True)
    scales = LayerwiseLRDecay(decay=0.5, coarse=True).lr_scales(model)
    for group in groups:
        for name in group.parameter_names:
            assert scales[name] == pytest.approx(0.5 ** (len(groups) - 1 - group.index))
    assert all(scales[n] == 1.0 for n in head_names(model))


@pytest.mark.parametrize("decay", [0.0, -0.1, 1.5])
def test_decay_outside_unit_interval_raises(decay):
    with pytest.raises(StrategyError, match="decay"):
        LayerwiseLRDecay(decay=decay)


def test_layerwise_lr_does_not_freeze_anything():
    model = make_backbone("test_resnet")
    LayerwiseLRDecay().setup(model)
    assert all(p.requires_grad for p in model.parameters())


def test_scales_of_several_strategies_multiply():
    class DoubleHead(Strategy):
        name = "double_head_test"

        def lr_scales(self, model):
            return {name: 2.0 for name in head_names(model)} | {"cls_token": 3.0}

    model = make_backbone("test_vit")
    scales = StrategyStack([LayerwiseLRDecay(decay=0.5), DoubleHead()]).lr_scales(model)
    assert scales["head.weight"] == 2.0
    assert scales["cls_token"] == pytest.approx(3.0 * 0.5**7)
    assert scales["blocks.5.mlp.fc1.weight"] == 0.5


def _per_parameter_lr(optimizer, model, prefix=""):
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


@pytest.mark.parametrize("model_name", MODELS)
def test_build_param_groups_applies_the_scales(model_name):
    model = make_backbone(model_name)
    groups = build_param_groups(model, lr=0.1, weight_decay=0.05, lr_scales=LayerwiseLRDecay(0.5).lr_scales(model))
    optimizer = torch.optim.AdamW(groups)
    expected = expected_scales(model_name, model, 0.5)
    assert _per_parameter_lr(optimizer, model) == pytest.approx({n: 0.1 * s for n, s in expected.items()})
    for group in groups:
        assert group["lr"] == pytest.approx(0.1 * group["lr_scale"]) == pytest.approx(group["initial_lr"])
        assert group["name"].endswith("" if group["lr_scale"] == 1.0 else f"@{group['lr_scale']:.4g}")


def test_image_classifier_optimizer_uses_the_scales():
    model = ImageClassifier(
        "test_resnet", pretrained=False, num_classes=4, strategies=[{"name": "layerwise_lr", "decay": 0.5}], lr=0.1
    )
    trainer = make_trainer(1, limit_train_batches=1)
    trainer.fit(model, toy_loader(16, 16))
    optimizer = trainer.optimizers[0]
    expected = expected_scales("test_resnet", model.backbone, 0.5)
    for group in optimizer.param_groups:
        assert group["initial_lr"] == pytest.approx(0.1 * group["lr_scale"])
        for name in group["param_names"]:
            assert group["lr_scale"] == pytest.approx(expected[name.removeprefix("backbone.")])


@pytest.mark.parametrize("model_name", MODELS)
def test_strategy_callback_splits_a_foreign_optimizer(model_name):
    module = ForeignClassifier(model_name, lr=0.1)
    trainer = make_trainer(1, [StrategyCallback([{"name": "layerwise_lr", "decay": 0.5}])], limit_train_batches=1)
    trainer.fit(module, toy_loader(16, 16))
    expected = expected_scales(model_name, module.net, 0.5)
    lrs = _per_parameter_lr(trainer.optimizers[0], module.net)
    assert lrs == pytest.approx({n: 0.1 * s for n, s in expected.items()})
