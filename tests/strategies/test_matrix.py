"""One matrix for every registered strategy: each row faces the same checks on a ViT and on a CNN.

A row is ``(strategy specs, expected trainable set, closed-form trainable count, BatchNorm rule, learning rate)``.
Adding a strategy to the registry adds rows here; ``test_every_registered_strategy_has_a_row`` fails otherwise.

Shared checks per row and model:

a. exactly the intended parameters are trainable, and their count matches a closed-form formula;
b. frozen parameters stay bit-identical through AdamW steps with weight decay, trainable ones move;
c. BatchNorm running statistics of frozen layers stay fixed in train mode (and move where they should);
d. the loss falls on a learnable toy task;
e. the output shape is right;
f. the freshly set-up model computes what the original did (where the method starts from the identity);
g. an adapter file saved after training and loaded onto a fresh model gives identical outputs;
h. merging or folding the method into the model (where it offers that) leaves the output unchanged;
i. a row restricted to some test models is refused, with a ``StrategyError``, on the others.

The same checks then run through the three ways of using strategies: ``ImageClassifier(strategies=...)``,
``StrategyCallback`` on a foreign LightningModule, and ``apply_strategies`` on a bare model.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from matrix_kit import (
    LORA_SPEC,
    Row,
    _adapter_params,
    _adapter_spec,
    _all,
    _biases,
    _bn_affine,
    _groups,
    _head,
    _loha_count,
    _lokr_count,
    _lora_count,
    _lora_params,
    _lora_spec,
    _minus,
    _norms,
    _union,
    dims_of,
    injected_row,
)
from strategy_testkit import (
    MODELS,
    NUM_CLASSES,
    ForeignClassifier,
    LossRecorder,
    batchnorm_modules,
    bn_stats,
    dense,
    head_names,
    make_backbone,
    make_trainer,
    snapshot,
    toy_loader,
    toy_task,
    trainable_names,
)
from torch import nn

from cvft.adapter_files import load_adapter, save_adapter
from cvft.errors import StrategyError
from cvft.strategies import (
    StrategyCallback,
    apply_strategies,
    available_strategies,
    build_param_groups,
    get_strategy,
)
from cvft.strategies.lowrank import merge_low_rank
from cvft.tasks import ImageClassifier

# Snapshot at import, before any test registers throw-away strategies.
REGISTERED = available_strategies()


ROWS = [
    Row("full", ["full"], _all, lambda d: d.total, lr=1e-3),
    Row("linear_probe", ["linear_probe"], _head, lambda d: d.head, lr=3e-2),
    Row(
        "linear_probe-train_bn",
        [{"name": "linear_probe", "train_bn": True}],
        _union(_head, _bn_affine),
        lambda d: d.head + 2 * d.bn_channels,
        bn_fixed="none",
        lr=3e-2,
    ),
    Row("classifier_only", ["classifier_only"], _head, lambda d: d.head, bn_fixed="all", lr=3e-2),
    Row(
        "freeze_layers-2",
        [{"name": "freeze_layers", "num_groups": 2}],
        _minus(_all, _groups(0, 1)),
        lambda d: d.total - d.groups[0] - d.groups[1],
        lr=1e-3,
    ),
    Row(
        "freeze_layers-2-train_bn",
        [{"name": "freeze_layers", "num_groups": 2, "train_bn": True}],
        _union(_minus(_all, _groups(0, 1)), _bn_affine),
        lambda d: d.total - d.groups[0] - d.groups[1] + 2 * (d.group_bn_channels[0] + d.group_bn_channels[1]),
        bn_fixed="none",
        lr=1e-3,
    ),
    Row(
        "freeze_layers-patterns",
        [{"name": "freeze_layers", "patterns": [r"^(blocks\.[12]|layer[23])\."]}],
        _minus(_all, _groups(2, 3)),
        lambda d: d.total - d.groups[2] - d.groups[3],
        lr=1e-3,
    ),
    Row("bitfit", ["bitfit"], _union(_biases, _head), lambda d: d.biases + d.head_weight, lr=1e-2),
    Row(
        "bitfit-train_bn",
        [{"name": "bitfit", "train_bn": True}],
        _union(_biases, _head, _bn_affine),
        lambda d: d.biases + d.head_weight + d.bn_channels,
        bn_fixed="none",
        lr=1e-2,
    ),
    Row(
        "norm_only",
        ["norm_only"],
        _union(_norms, _head),
        lambda d: d.norms + d.head,
        bn_fixed="all",
        lr=1e-2,
    ),
    Row(
        "norm_only-train_bn",
        [{"name": "norm_only", "train_bn": True}],
        _union(_norms, _head),
        lambda d: d.norms + d.head,
        bn_fixed="none",
        lr=1e-2,
    ),
    Row("embedding_only", ["embedding_only"], _union(_groups(0), _head), lambda d: d.groups[0] + d.head, lr=1e-2),
    Row(
        "embedding_only-train_bn",
        [{"name": "embedding_only", "train_bn": True}],
        _union(_groups(0), _head, _bn_affine),
        lambda d: d.groups[0] + d.head + 2 * (d.bn_channels - d.group_bn_channels[0]),
        bn_fixed="none",
        lr=1e-2,
    ),
    Row("gradual_unfreeze", [{"name": "gradual_unfreeze", "milestones": [1, 2, 3]}], _head, lambda d: d.head, lr=3e-2),
    Row(
        "gradual_unfreeze-top2-at-0",
        [{"name": "gradual_unfreeze", "milestones": [0, 3], "groups_per_milestone": 2}],
        _union(_head, _groups(-1, -2)),
        lambda d: d.head + d.groups[-1] + d.groups[-2],
        lr=1e-3,
    ),
    Row(
        "gradual_unfreeze-train_bn",
        [{"name": "gradual_unfreeze", "milestones": [1, 2], "train_bn": True}],
        _union(_head, _bn_affine),
        lambda d: d.head + 2 * d.bn_channels,
        bn_fixed="none",
        lr=3e-2,
    ),
    Row(
        "freeze_layers+gradual_unfreeze",
        [{"name": "freeze_layers", "num_groups": 1}, {"name": "gradual_unfreeze", "milestones": [0]}],
        _minus(_all, _groups(0)),
        lambda d: d.total - d.groups[0],
        lr=1e-3,
    ),
    Row("layerwise_lr", [{"name": "layerwise_lr", "decay": 0.5}], _all, lambda d: d.total, lr=3e-3),
    Row(
        "freeze_layers+layerwise_lr",
        [{"name": "freeze_layers", "num_groups": 2}, "layerwise_lr"],
        _minus(_all, _groups(0, 1)),
        lambda d: d.total - d.groups[0] - d.groups[1],
        lr=1e-3,
    ),
    injected_row(
        "lora",
        lambda model_name: [_lora_spec(model_name)],
        _lora_params,
        _lora_count,
        merge=merge_low_rank,
        bn_fixed="none",  # lora's BatchNorm policy is "train" (measured; see LoRA.default_bn)
        lr=3e-2,
    ),
    Row(
        "lora+gradual_unfreeze",
        [LORA_SPEC, {"name": "gradual_unfreeze", "milestones": [1, 2]}],
        _head,
        lambda d: d.head,
        injected=_lora_count,
        specs_for=lambda model_name: [_lora_spec(model_name), {"name": "gradual_unfreeze", "milestones": [1, 2]}],
        bn_fixed="none",
        lr=3e-2,
    ),
    *[
        injected_row(name, _adapter_spec(name), _adapter_params(*factors), count, merge=merge_low_rank, lr=3e-2)
        for name, factors, count in [
            ("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), _loha_count),
            ("lokr", ("lokr_w1", "lokr_w2_a", "lokr_w2_b"), _lokr_count),
        ]
    ],
    injected_row(
        "qlora",
        [{**LORA_SPEC, "name": "qlora", "targets": "vit_attention"}],
        _lora_params,
        _lora_count,
        merge=merge_low_rank,
        lr=3e-2,
        models=("test_vit",),
        requires=("torchao",),
        # NF4 rounding of the base weights changes the function; test_qlora compares with the dequantised base
        unchanged_at_init=False,
    ),
]
# Rows of other strategy families, from rows_<family>.py beside this file.
for _path in sorted(Path(__file__).parent.glob("rows_*.py")):
    ROWS += importlib.import_module(_path.stem).ROWS
ROWS_BY_ID = {row.id: row for row in ROWS}
assert len(ROWS_BY_ID) == len(ROWS), "row ids must be unique"

MATRIX = [pytest.param(row, model, id=f"{row.id}-{model}", marks=row.marks) for row in ROWS for model in row.models]
OTHER_FAMILY = [
    pytest.param(row, model, id=f"{row.id}-{model}", marks=row.marks)
    for row in ROWS
    for model in MODELS
    if model not in row.models
]
MERGE_MATRIX = [p for p in MATRIX if p.values[0].merge is not None]
RESNET_MATRIX = [
    pytest.param(row, "test_resnet", id=row.id, marks=row.marks) for row in ROWS if "test_resnet" in row.models
]


def test_every_registered_strategy_has_a_row():
    covered = set().union(*(row.strategy_names for row in ROWS))
    # objectives (distillation, contrastive, continual regularisers) change the loss, not which parameters train;
    # tests/objectives checks them against hand-computed losses and end-to-end regimes
    objectives = {name for name in REGISTERED if getattr(get_strategy(name), "objective", False)}
    missing = sorted(set(REGISTERED) - covered - objectives)
    assert not missing, f"add rows to tests/strategies/test_matrix.py for: {missing}"


# --------------------------------------------------------------------------- shared checks
def expected_fixed_bn(row: Row, model: nn.Module, expected: set[str]) -> set[str]:
    modules = batchnorm_modules(model)
    if row.bn_fixed == "all":
        return set(modules)
    if row.bn_fixed == "none":
        return set()
    return {
        name
        for name, module in modules.items()
        if any(f"{name}.{p}" not in expected for p, _ in module.named_parameters(recurse=False))
    }


def optimizer_for(model: nn.Module, stack, lr: float, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    groups = build_param_groups(model, lr, weight_decay, stack.lr_scales(model), include_frozen=True)
    return torch.optim.AdamW(groups, lr=lr)


def train_steps(model: nn.Module, optimizer, steps: int, images, targets, with_gradient=None) -> list[float]:
    """Plain training steps; names of parameters that received a non-zero gradient go into ``with_gradient``."""
    losses = []
    for _ in range(steps):
        model.train()  # Lightning does this at every epoch; frozen BatchNorm must not care
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if with_gradient is not None:
            with_gradient |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        optimizer.step()
        losses.append(loss.item())
    return losses


def pristine_like(model_name: str, model: nn.Module) -> nn.Module:
    """A fresh model of the same configuration as ``model`` (input size, classes), without any strategy."""
    kwargs = {"num_classes": model.num_classes}
    if model_name == "test_vit":
        kwargs["img_size"] = model.patch_embed.img_size
    return timm.create_model(model_name, pretrained=False, **kwargs)


def check_trainable(row: Row, model_name: str, model: nn.Module) -> set[str]:
    expected = row.trainable(model_name, model)
    actual = trainable_names(model)
    assert actual == expected, f"unexpected: {sorted(actual - expected)[:5]}, missing: {sorted(expected - actual)[:5]}"
    # sizes of the original architecture (a fresh model), plus what the strategy injected by its own formula
    dims = replace(dims_of(model_name, pristine_like(model_name, model)), injected=row.injected(model_name, model))
    assert dims.total + dims.injected == sum(p.numel() for p in model.parameters()), "closed-form size is wrong"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == row.count(dims)
    return expected


def check_frozen_unchanged(model, before, expected_trainable, with_gradient=None) -> None:
    """Frozen parameters are bit-identical; trainable ones moved.

    With ``with_gradient``, every trainable parameter that received a non-zero gradient must have moved (some get an
    exactly zero gradient, e.g. a BasicBlock's ``bn1`` while the zero-initialised ``bn2.weight`` is frozen);
    without it, the head and at least one other trainable tensor must have moved.
    """
    moved = set()
    for name, param in model.named_parameters():
        if name in expected_trainable:
            if not torch.equal(param, before[name]):
                moved.add(name)
        else:
            assert torch.equal(dense(param), before[name]), f"frozen {name} moved"
    if with_gradient is not None:
        assert with_gradient <= set(expected_trainable), "a frozen parameter received a gradient"
        assert with_gradient <= moved, f"trainable but did not move: {sorted(with_gradient - moved)[:5]}"
    else:
        assert head_names(model) <= moved
    if set(expected_trainable) - head_names(model):
        assert moved - head_names(model), "no trainable parameter outside the head moved"


def check_bn_stats(row, model, stats_before, expected_trainable) -> None:
    fixed = expected_fixed_bn(row, model, expected_trainable)
    for name, (mean, var, count) in bn_stats(model).items():
        before = stats_before[name]
        unchanged = torch.equal(mean, before[0]) and torch.equal(var, before[1]) and torch.equal(count, before[2])
        if name in fixed:
            assert unchanged, f"running statistics of frozen BatchNorm {name} moved"
        else:
            assert not unchanged, f"running statistics of trainable BatchNorm {name} did not update"


def check_loss_fell(losses: list[float], factor: float = 0.7) -> None:
    assert losses[-1] < factor * losses[0], f"loss did not fall enough: {losses[0]:.3f} -> {losses[-1]:.3f}"


# --------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize(("row", "model_name"), MATRIX)
def test_intended_parameters_train(row, model_name):
    model = make_backbone(model_name)
    apply_strategies(model, row.specs_of(model_name))
    check_trainable(row, model_name, model)


@pytest.mark.parametrize(("row", "model_name"), MATRIX)
def test_frozen_parameters_stay_bit_identical(row, model_name):
    model = make_backbone(model_name)
    stack = apply_strategies(model, row.specs_of(model_name))
    expected = row.trainable(model_name, model)
    optimizer = optimizer_for(model, stack, lr=1e-3, weight_decay=0.1)
    # frozen parameters are in the optimizer too, so weight decay would move them if they were not skipped
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    before = snapshot(model)
    images, targets = toy_task(8)
    with_gradient: set[str] = set()
    train_steps(model, optimizer, 3, images, targets, with_gradient)
    check_frozen_unchanged(model, before, expected, with_gradient)


@pytest.mark.parametrize(("row", "model_name"), RESNET_MATRIX)
def test_batchnorm_statistics_follow_train_bn(row, model_name):
    model = make_backbone(model_name)
    stack = apply_strategies(model, row.specs_of(model_name))
    expected = row.trainable(model_name, model)
    stats = bn_stats(model)
    assert stats, "test_resnet should have BatchNorm layers"
    train_steps(model, optimizer_for(model, stack, 1e-3), 3, *toy_task(8))
    check_bn_stats(row, model, stats, expected)


@pytest.mark.parametrize(("row", "model_name"), MATRIX)
def test_loss_falls_on_toy_task(row, model_name):
    model = make_backbone(model_name)
    stack = apply_strategies(model, row.specs_of(model_name))
    optimizer = optimizer_for(model, stack, lr=row.lr, weight_decay=0.01)
    losses = train_steps(model, optimizer, 25, *toy_task(32))
    check_loss_fell(losses)


@pytest.mark.parametrize(("row", "model_name"), MATRIX)
def test_output_shape(row, model_name):
    model = make_backbone(model_name)
    apply_strategies(model, row.specs_of(model_name))
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            assert model(torch.randn(3, 3, 32, 32)).shape == (3, NUM_CLASSES)


def _outputs(model: nn.Module, seed: int = 5) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


def _trained(row: Row, model_name: str, steps: int = 3) -> tuple[nn.Module, object]:
    """A model with the row's strategies, after a few AdamW steps so that every update is non-zero."""
    model = make_backbone(model_name)
    stack = apply_strategies(model, row.specs_of(model_name))
    train_steps(model, optimizer_for(model, stack, lr=row.lr, weight_decay=0.01), steps, *toy_task(16))
    return model, stack


@pytest.mark.parametrize(("row", "model_name"), MATRIX)
def test_model_unchanged_at_initialisation(row, model_name):
    if not row.unchanged_at_init:
        pytest.skip("the method changes the function at the start by design; see its own reference test")
    reference = _outputs(make_backbone(model_name))
    model = make_backbone(model_name)
    apply_strategies(model, row.specs_of(model_name))
    torch.testing.assert_close(_outputs(model), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("row", "model_name"), MATRIX)
def test_adapter_file_round_trip_is_exact(row, model_name, tmp_path):
    model, stack = _trained(row, model_name)
    expected = _outputs(model)
    path = save_adapter(model, tmp_path / "adapter", model_name, stack.config(), class_names=list("abcd"))
    fresh = make_backbone(model_name)  # same base weights (same seed), strategies set up anew
    apply_strategies(fresh, row.specs_of(model_name))
    load_adapter(fresh, path, backbone=model_name)
    assert torch.equal(_outputs(fresh), expected)


@pytest.mark.parametrize(("row", "model_name"), MERGE_MATRIX)
def test_merge_is_exact(row, model_name):
    model, _ = _trained(row, model_name)
    expected = _outputs(model)
    row.merge(model)
    torch.testing.assert_close(_outputs(model), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("row", "model_name"), OTHER_FAMILY)
def test_wrong_family_is_refused(row, model_name):
    with pytest.raises(StrategyError):
        apply_strategies(make_backbone(model_name), row.specs_of(model_name))


# --------------------------------------------------------------------------- the three usage modes
MODE_CASES = [
    pytest.param(ROWS_BY_ID["freeze_layers-2"], "test_resnet", id="freeze_layers-2-test_resnet"),
    pytest.param(ROWS_BY_ID["bitfit"], "test_vit", id="bitfit-test_vit"),
]


def _check_fit(row, model_name, backbone, before, stats, losses, steps_per_epoch):
    expected = check_trainable(row, model_name, backbone)
    check_frozen_unchanged(backbone, before, expected)
    check_bn_stats(row, backbone, stats, expected)
    first_epoch = sum(losses[:steps_per_epoch]) / steps_per_epoch
    last_epoch = sum(losses[-steps_per_epoch:]) / steps_per_epoch
    check_loss_fell([first_epoch, last_epoch])
    backbone.eval()
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(("row", "model_name"), MODE_CASES)
def test_mode_image_classifier(row, model_name):
    torch.manual_seed(0)
    model = ImageClassifier(
        model_name,
        pretrained=False,
        num_classes=NUM_CLASSES,
        strategies=row.specs_of(model_name),
        lr=row.lr,
        warmup_epochs=0,
    )
    before, stats = snapshot(model.backbone), bn_stats(model.backbone)
    recorder = LossRecorder()
    make_trainer(6, [recorder]).fit(model, toy_loader(64, 16))
    _check_fit(row, model_name, model.backbone, before, stats, recorder.losses, 4)


@pytest.mark.parametrize(("row", "model_name"), MODE_CASES)
def test_mode_strategy_callback_on_foreign_module(row, model_name):
    module = ForeignClassifier(model_name, lr=row.lr)
    before, stats = snapshot(module.net), bn_stats(module.net)
    callback = StrategyCallback(row.specs_of(model_name))
    recorder = LossRecorder()
    trainer = make_trainer(6, [callback, recorder])
    trainer.fit(module, toy_loader(64, 16))
    assert callback.backbone is module.net
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in module.net.parameters() if p.requires_grad}
    _check_fit(row, model_name, module.net, before, stats, recorder.losses, 4)


@pytest.mark.parametrize(("row", "model_name"), MODE_CASES)
def test_mode_apply_strategies_on_bare_model(row, model_name):
    model = make_backbone(model_name)
    stack = apply_strategies(model, row.specs_of(model_name))
    before, stats = snapshot(model), bn_stats(model)
    optimizer = optimizer_for(model, stack, row.lr, weight_decay=0.05)
    loader = toy_loader(64, 16)
    losses = []
    for epoch in range(6):
        stack.on_epoch_start(model, epoch)
        for images, targets in loader:
            losses += train_steps(model, optimizer, 1, images, targets)
    _check_fit(row, model_name, model, before, stats, losses, 4)
