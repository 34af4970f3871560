"""One matrix for every registered strategy: each row faces the same checks on a ViT and on a CNN.

A row is ``(strategy specs, expected trainable set, closed-form trainable count, BatchNorm rule, learning rate)``.
Adding a strategy to the registry adds rows here; ``test_every_registered_strategy_has_a_row`` fails otherwise.

Shared checks per row and model:

a. exactly the intended parameters are trainable, and their count matches a closed-form formula;
b. frozen parameters stay bit-identical through AdamW steps with weight decay, trainable ones move;
c. BatchNorm running statistics of frozen layers stay fixed in train mode (and move where they should);
d. the loss falls on a learnable toy task;
e. the output shape is right.

The same checks then run through the three ways of using strategies: ``ImageClassifier(strategies=...)``,
``StrategyCallback`` on a foreign LightningModule, and ``apply_strategies`` on a bare model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from strategy_testkit import (
    MODELS,
    NUM_CLASSES,
    ForeignClassifier,
    LossRecorder,
    batchnorm_modules,
    bn_stats,
    body_group,
    dense,
    head_names,
    make_backbone,
    make_trainer,
    module_parameter_names,
    snapshot,
    toy_loader,
    toy_task,
    trainable_names,
)
from torch import nn

from cvft.strategies import (
    StrategyCallback,
    apply_strategies,
    available_strategies,
    build_param_groups,
    build_strategies,
)
from cvft.tasks import ImageClassifier

# Snapshot at import, before any test registers throw-away strategies.
REGISTERED = available_strategies()


# --------------------------------------------------------------------------- closed-form sizes of the test models
@dataclass
class Dims:
    """Parameter counts of a test model, from its hyper-parameters (never by enumerating parameters)."""

    total: int
    head: int
    head_weight: int
    biases: int
    norms: int
    bn_channels: int
    groups: list[int]
    group_bn_channels: list[int]
    #: Parameters a strategy injected (LoRA updates), from the row's closed-form formula.
    injected: int = 0


def _vit_dims(model: nn.Module) -> Dims:
    D, L = model.embed_dim, len(model.blocks)  # noqa: N806
    H = model.blocks[0].mlp.fc1.out_features  # noqa: N806
    N, P, C = model.patch_embed.num_patches, model.patch_embed.patch_size[0], model.num_classes  # noqa: N806
    stem = D + (N + 1) * D + 3 * P * P * D + D  # cls_token, pos_embed, patch conv weight + bias
    block = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * H + H) + (H * D + D)
    final_norm = 2 * D
    head = D * C + C
    return Dims(
        total=stem + L * block + final_norm + head,
        head=head,
        head_weight=D * C,
        biases=L * (D + 3 * D + D + D + H + D) + D + D + C,
        norms=L * 4 * D + final_norm,
        bn_channels=0,
        groups=[stem] + [block] * (L - 1) + [block + final_norm],
        group_bn_channels=[0] * (L + 1),
    )


def _resnet_dims(model: nn.Module) -> Dims:
    from strategy_testkit import BODY_PREFIXES

    prefixes = [tuple(p.rstrip(".") for p in group) for group in BODY_PREFIXES["test_resnet"]]

    def group_of(module_name: str) -> int | None:
        for index, group in enumerate(prefixes):
            if any(module_name == p or module_name.startswith(p + ".") for p in group):
                return index
        return None

    groups = [0] * len(prefixes)
    group_bn = [0] * len(prefixes)
    for name, module in model.named_modules():
        index = group_of(name)
        if ".lora_" in name:  # injected by LoRA; counted by the row's own formula
            continue
        if isinstance(module, nn.Conv2d) and index is not None:
            assert module.bias is None
            kh, kw = module.kernel_size
            groups[index] += module.in_channels * module.out_channels * kh * kw // module.groups
        elif isinstance(module, nn.BatchNorm2d) and index is not None:
            groups[index] += 2 * module.num_features
            group_bn[index] += module.num_features
    F_, C = model.num_features, model.num_classes  # noqa: N806
    bn_channels = sum(group_bn)
    head = F_ * C + C
    return Dims(
        total=sum(groups) + head,
        head=head,
        head_weight=F_ * C,
        biases=bn_channels + C,
        norms=2 * bn_channels,
        bn_channels=bn_channels,
        groups=groups,
        group_bn_channels=group_bn,
    )


def dims_of(model_name: str, model: nn.Module) -> Dims:
    return _vit_dims(model) if model_name == "test_vit" else _resnet_dims(model)


# --------------------------------------------------------------------------- expected trainable sets
def _all(name, model):
    return {n for n, _ in model.named_parameters()}


def _head(name, model):
    return head_names(model)


def _bn_affine(name, model):
    return module_parameter_names(model, (nn.BatchNorm2d,))


def _biases(name, model):
    return {n for n, _ in model.named_parameters() if n.endswith(".bias")}


def _norms(name, model):
    return module_parameter_names(model, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm))


def _groups(*indices):
    def expected(name, model):
        return set().union(*(body_group(name, model, i) for i in indices))

    return expected


def _union(*parts):
    return lambda name, model: set().union(*(part(name, model) for part in parts))


def _minus(whole, *parts):
    return lambda name, model: whole(name, model) - set().union(*(part(name, model) for part in parts))


def _no_injection(name, model):
    return 0


# LoRA rows: rank LORA_RANK on the ViT's attention (q and v thirds of qkv, and proj) and on the ResNet's block convs.
LORA_RANK = 4
LORA_SPEC = {"name": "lora", "rank": LORA_RANK, "alpha": 8, "qkv_parts": ["q", "v"]}
_RESNET_BLOCK_CONV = re.compile(r"layer[1-4]\.\d+\.conv[123]")


def _lora_spec(model_name: str) -> dict:
    return {**LORA_SPEC, "targets": "vit_attention" if model_name == "test_vit" else "resnet_blocks"}


def _lora_params(name, model):
    if name == "test_vit":
        return {
            f"blocks.{i}.attn.{layer}.{ab}.weight"
            for i in range(len(model.blocks))
            for layer, ab in [("qkv", "lora_A.q"), ("qkv", "lora_B.q"), ("qkv", "lora_A.v"), ("qkv", "lora_B.v")]
            + [("proj", "lora_A"), ("proj", "lora_B")]
        }
    return {
        f"{module}.{ab}.weight"
        for module, _ in model.named_modules()
        if _RESNET_BLOCK_CONV.fullmatch(module)
        for ab in ("lora_A", "lora_B")
    }


def _lora_count(name, model):
    """Closed form: r * (in + out) per Linear update (out = D for each qkv third), r * (in * k * k + out) per conv."""
    r = LORA_RANK
    if name == "test_vit":
        D = model.embed_dim  # noqa: N806
        return len(model.blocks) * (2 * r * (D + D) + r * (D + D))
    total = 0
    for module_name, module in model.named_modules():
        if _RESNET_BLOCK_CONV.fullmatch(module_name):
            conv = module.base
            kh, kw = conv.kernel_size
            total += r * (conv.in_channels * kh * kw + conv.out_channels)
    return total


# LoHA / LoKr rows: same targets as LoRA (whole qkv, proj; ResNet block convs), factors over the flattened weight.
ADAPTER_RANK = 4


def _adapter_spec(name: str) -> Callable[[str], list[Any]]:
    def specs(model_name: str) -> list[Any]:
        targets = "vit_attention" if model_name == "test_vit" else "resnet_blocks"
        return [{"name": name, "rank": ADAPTER_RANK, "alpha": 8, "targets": targets}]

    return specs


def _adapted_shapes(name, model) -> dict[str, tuple[int, int]]:
    """``(out, in_flat)`` of every adapted weight, from the architecture (ViT: D and 3D; convs: their geometry)."""
    if name == "test_vit":
        D = model.embed_dim  # noqa: N806
        return {
            f"blocks.{i}.attn.{layer}": shape
            for i in range(len(model.blocks))
            for layer, shape in [("qkv", (3 * D, D)), ("proj", (D, D))]
        }
    shapes = {}
    for module_name, module in model.named_modules():
        if _RESNET_BLOCK_CONV.fullmatch(module_name):
            conv = module.base
            kh, kw = conv.kernel_size
            shapes[module_name] = (conv.out_channels, conv.in_channels // conv.groups * kh * kw)
    return shapes


def _adapter_params(*suffixes):
    return lambda name, model: {f"{m}.{s}" for m in _adapted_shapes(name, model) for s in suffixes}


def _balanced_split(n: int) -> tuple[int, int]:
    small = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return small, n // small


def _loha_count(name, model):
    """Closed form: 2 * r * (out + in_flat) per adapted weight (two rank-r products)."""
    return sum(2 * ADAPTER_RANK * (out + inp) for out, inp in _adapted_shapes(name, model).values())


def _lokr_count(name, model):
    """Closed form: o1 * i1 (C) + r * (o2 + i2) (B A) per adapted weight, with balanced splits of out and in_flat."""
    total = 0
    for out, inp in _adapted_shapes(name, model).values():
        (o1, o2), (i1, i2) = _balanced_split(out), _balanced_split(inp)
        total += o1 * i1 + ADAPTER_RANK * (o2 + i2)
    return total


@dataclass(frozen=True)
class Row:
    """One strategy configuration and what it must do."""

    id: str
    specs: list[Any]
    trainable: Callable[[str, nn.Module], set[str]]
    count: Callable[[Dims], int]
    #: Which BatchNorm layers keep fixed statistics: those with a frozen parameter, all, or none.
    bn_fixed: Literal["frozen", "all", "none"] = "frozen"
    lr: float = 1e-2
    covers: tuple[str, ...] = field(default=())
    #: Closed-form number of parameters the strategies inject into the model.
    injected: Callable[[str, nn.Module], int] = _no_injection
    #: Per-model specs, when the specs depend on the architecture (LoRA targets).
    specs_for: Callable[[str], list[Any]] | None = None
    #: Models the row applies to (QLoRA quantises Linear layers only, so it has no CNN row).
    models: tuple[str, ...] = tuple(MODELS)

    def specs_of(self, model_name: str) -> list[Any]:
        return self.specs_for(model_name) if self.specs_for is not None else self.specs

    @property
    def strategy_names(self) -> set[str]:
        return {s.name for s in build_strategies(self.specs)}


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
    Row(
        "lora",
        [LORA_SPEC],
        _union(_head, _lora_params),
        lambda d: d.head + d.injected,
        injected=_lora_count,
        specs_for=lambda model_name: [_lora_spec(model_name)],
        lr=3e-2,
    ),
    Row(
        "lora+gradual_unfreeze",
        [LORA_SPEC, {"name": "gradual_unfreeze", "milestones": [1, 2]}],
        _head,
        lambda d: d.head,
        injected=_lora_count,
        specs_for=lambda model_name: [_lora_spec(model_name), {"name": "gradual_unfreeze", "milestones": [1, 2]}],
        lr=3e-2,
    ),
    Row(
        "loha",
        _adapter_spec("loha")("test_vit"),
        _union(_head, _adapter_params("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
        lambda d: d.head + d.injected,
        injected=_loha_count,
        specs_for=_adapter_spec("loha"),
        lr=3e-2,
    ),
    Row(
        "lokr",
        _adapter_spec("lokr")("test_vit"),
        _union(_head, _adapter_params("lokr_w1", "lokr_w2_a", "lokr_w2_b")),
        lambda d: d.head + d.injected,
        injected=_lokr_count,
        specs_for=_adapter_spec("lokr"),
        lr=3e-2,
    ),
    Row(
        "qlora",
        [{**LORA_SPEC, "name": "qlora", "targets": "vit_attention"}],
        _union(_head, _lora_params),
        lambda d: d.head + d.injected,
        injected=_lora_count,
        lr=3e-2,
        models=("test_vit",),
    ),
]
ROWS_BY_ID = {row.id: row for row in ROWS}
assert len(ROWS_BY_ID) == len(ROWS), "row ids must be unique"

MATRIX = [pytest.param(row, model, id=f"{row.id}-{model}") for row in ROWS for model in row.models]
RESNET_MATRIX = [pytest.param(row, "test_resnet", id=row.id) for row in ROWS if "test_resnet" in row.models]


def test_every_registered_strategy_has_a_row():
    covered = set().union(*(row.strategy_names for row in ROWS))
    missing = sorted(set(REGISTERED) - covered)
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


def check_trainable(row: Row, model_name: str, model: nn.Module) -> set[str]:
    expected = row.trainable(model_name, model)
    actual = trainable_names(model)
    assert actual == expected, f"unexpected: {sorted(actual - expected)[:5]}, missing: {sorted(expected - actual)[:5]}"
    dims = replace(dims_of(model_name, model), injected=row.injected(model_name, model))
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
