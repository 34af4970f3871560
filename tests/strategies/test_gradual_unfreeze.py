"""Gradual unfreezing: schedule math, composition, validation, and exact resume in both Lightning usage modes."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from strategy_testkit import (
    BODY_PREFIXES,
    ForeignClassifier,
    StopAfterEpochs,
    batchnorm_modules,
    body_group,
    head_names,
    make_backbone,
    make_trainer,
    toy_loader,
    trainable_names,
)
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies import GradualUnfreeze, StrategyCallback, apply_strategies, build_strategy
from cvft.strategies._freeze import has_frozen_stats
from cvft.tasks import ImageClassifier


def expected_open(model_name: str, model: nn.Module, count: int) -> set[str]:
    """Head plus the top ``count`` body groups."""
    groups = len(BODY_PREFIXES[model_name])
    opened = set().union(*(body_group(model_name, model, i) for i in range(groups - count, groups)))
    return head_names(model) | opened


# --------------------------------------------------------------------------- schedule math
@pytest.mark.parametrize(
    ("model_name", "kwargs", "per_epoch"),
    [
        ("test_vit", {"milestones": [1, 3, 5]}, [0, 3, 3, 5, 5, 7, 7, 7]),  # 7 groups spread over 3 milestones
        ("test_vit", {"milestones": [1, 2], "groups_per_milestone": 2}, [0, 2, 4, 4, 4]),
        ("test_vit", {"milestones": [0, 1], "groups_per_milestone": 5}, [5, 7, 7]),  # capped at the body size
        ("test_resnet", {"milestones": [2, 4]}, [0, 0, 3, 3, 5, 5]),
        ("test_resnet", {"milestones": [1], "groups_per_milestone": 1}, [0, 1, 1]),
    ],
)
def test_schedule_opens_top_groups_per_epoch(model_name, kwargs, per_epoch):
    model = make_backbone(model_name)
    strategy = GradualUnfreeze(**kwargs)
    strategy.setup(model)
    for epoch, count in enumerate(per_epoch):
        assert strategy.unfrozen_groups(epoch) == count
        strategy.on_epoch_start(model, epoch)
        assert trainable_names(model) == expected_open(model_name, model, count), f"epoch {epoch}"
        assert head_names(model) <= trainable_names(model)


@pytest.mark.parametrize("model_name", ["test_vit", "test_resnet"])
def test_everything_trains_after_last_milestone(model_name):
    model = make_backbone(model_name)
    strategy = GradualUnfreeze(milestones=[1, 2, 3])
    strategy.setup(model)
    assert trainable_names(model) == head_names(model)
    strategy.on_epoch_start(model, 3)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(has_frozen_stats(m) for m in batchnorm_modules(model).values())


def test_on_epoch_start_reports_newly_trainable_names_in_model_order():
    model = make_backbone("test_vit")
    strategy = GradualUnfreeze(milestones=[1, 2], groups_per_milestone=1)
    strategy.setup(model)
    newly = strategy.on_epoch_start(model, 1)
    assert set(newly) == body_group("test_vit", model, 6)  # blocks.5 + final norm
    order = [n for n, _ in model.named_parameters()]
    assert newly == [n for n in order if n in set(newly)]
    assert strategy.on_epoch_start(model, 1) == []  # same epoch again: nothing new


def test_schedule_is_a_pure_function_of_the_epoch():
    model = make_backbone("test_resnet")
    strategy = GradualUnfreeze(milestones=[1, 2, 3])
    strategy.setup(model)
    strategy.on_epoch_start(model, 3)
    strategy.on_epoch_start(model, 1)  # e.g. a resumed run replaying an earlier epoch
    fresh = make_backbone("test_resnet")
    reference = GradualUnfreeze(milestones=[1, 2, 3])
    reference.setup(fresh)
    reference.on_epoch_start(fresh, 1)
    assert trainable_names(model) == trainable_names(fresh)
    frozen_stats = {n for n, m in batchnorm_modules(model).items() if has_frozen_stats(m)}
    assert frozen_stats == {n for n, m in batchnorm_modules(fresh).items() if has_frozen_stats(m)}


def test_unfrozen_batchnorm_layers_update_their_statistics():
    model = make_backbone("test_resnet")
    strategy = GradualUnfreeze(milestones=[1], groups_per_milestone=1)
    strategy.setup(model)
    layer4 = {n: m for n, m in batchnorm_modules(model).items() if n.startswith("layer4.")}
    assert layer4 and all(has_frozen_stats(m) for m in layer4.values())
    strategy.on_epoch_start(model, 1)
    assert not any(has_frozen_stats(m) for m in layer4.values())
    assert all(has_frozen_stats(m) for n, m in batchnorm_modules(model).items() if n not in layer4)
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert all(int(m.num_batches_tracked) == 1 for m in layer4.values())


# --------------------------------------------------------------------------- composition
@pytest.mark.parametrize("model_name", ["test_vit", "test_resnet"])
def test_composition_never_unfreezes_what_an_earlier_strategy_froze(model_name):
    model = make_backbone(model_name)
    stack = apply_strategies(
        model, [{"name": "freeze_layers", "num_groups": 1}, {"name": "gradual_unfreeze", "milestones": [1, 2]}]
    )
    stem = body_group(model_name, model, 0)
    for epoch in range(6):
        stack.on_epoch_start(model, epoch)
        assert not (trainable_names(model) & stem)
    everything = {n for n, _ in model.named_parameters()}
    assert trainable_names(model) == everything - stem


def test_after_linear_probe_only_the_head_ever_trains():
    model = make_backbone("test_vit")
    stack = apply_strategies(model, ["linear_probe", {"name": "gradual_unfreeze", "milestones": [1]}])
    for epoch in range(3):
        assert stack.on_epoch_start(model, epoch) == []
        assert trainable_names(model) == head_names(model)


def test_parameters_added_after_setup_are_left_alone():
    model = make_backbone("test_vit")
    strategy = GradualUnfreeze(milestones=[1, 2])
    strategy.setup(model)
    model.extra = nn.Linear(2, 2)  # e.g. a module injected by a strategy set up later
    model.extra.bias.requires_grad_(False)
    strategy.on_epoch_start(model, 1)
    strategy.on_epoch_start(model, 2)
    assert model.extra.weight.requires_grad and not model.extra.bias.requires_grad


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs",
    [
        {"milestones": []},
        {"milestones": [2, 1]},
        {"milestones": [1, 1]},
        {"milestones": [-1, 2]},
        {"milestones": [1], "groups_per_milestone": 0},
    ],
)
def test_bad_configuration_raises(kwargs):
    with pytest.raises(StrategyError, match="gradual_unfreeze"):
        GradualUnfreeze(**kwargs)
    with pytest.raises(StrategyError):
        build_strategy({"name": "gradual_unfreeze", **kwargs})


def test_schedule_before_setup_raises():
    with pytest.raises(StrategyError, match="setup"):
        GradualUnfreeze().trainable_names(0, make_backbone("test_vit"))


# --------------------------------------------------------------------------- resume exactness
def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    b_params = dict(b.named_parameters())
    for name, param in a.named_parameters():
        torch.testing.assert_close(param, b_params[name], atol=1e-6, rtol=0, msg=name)
        assert param.requires_grad == b_params[name].requires_grad, name


def _groups(optimizer) -> list[tuple]:
    return [(g.get("name"), g["lr"], len(g["params"])) for g in optimizer.param_groups]


def _resumed_run(make_module, tmp_path, callbacks=()):
    """Train 2 of 4 epochs with a checkpoint, then resume into a fresh module and Trainer."""
    first = make_module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(4, [*callbacks(), StopAfterEpochs(2), checkpoint], enable_checkpointing=True).fit(
        first, toy_loader(32, 16)
    )
    assert first.current_epoch == 2
    resumed = make_module(seed=123)  # different initial weights: everything must come from the checkpoint
    trainer = make_trainer(4, callbacks())
    trainer.fit(resumed, toy_loader(32, 16), ckpt_path=tmp_path / "last.ckpt")
    return resumed, trainer


def test_image_classifier_resume_matches_uninterrupted_run(tmp_path):
    def make_module(seed=0):
        torch.manual_seed(seed)
        return ImageClassifier(
            "test_vit",
            pretrained=False,
            num_classes=4,
            strategies=[{"name": "gradual_unfreeze", "milestones": [1, 2, 3]}],
            lr=1e-3,
            warmup_epochs=1,
        )

    uninterrupted = make_module()
    trainer_a = make_trainer(4)
    trainer_a.fit(uninterrupted, toy_loader(32, 16))
    assert all(p.requires_grad for p in uninterrupted.parameters())

    resumed, trainer_b = _resumed_run(make_module, tmp_path, callbacks=lambda: [])
    _assert_same_parameters(uninterrupted, resumed)
    assert _groups(trainer_a.optimizers[0]) == _groups(trainer_b.optimizers[0])
    names_a = [g["param_names"] for g in trainer_a.optimizers[0].param_groups]
    assert names_a == [g["param_names"] for g in trainer_b.optimizers[0].param_groups]


@pytest.mark.parametrize("scheduler", [None, "lambda"])
def test_strategy_callback_resume_matches_uninterrupted_run(tmp_path, scheduler):
    strategies = [{"name": "gradual_unfreeze", "milestones": [1, 2, 3]}]

    def make_module(seed=0):
        return ForeignClassifier("test_resnet", lr=1e-3, scheduler=scheduler, seed=seed)

    uninterrupted = make_module()
    trainer_a = make_trainer(4, [StrategyCallback(strategies)])
    trainer_a.fit(uninterrupted, toy_loader(32, 16))
    optimizer_a = trainer_a.optimizers[0]
    assert len(optimizer_a.param_groups) > 1, "unfrozen parameters should have been added as groups"
    assert all(g["name"].startswith("cvft/") for g in optimizer_a.param_groups[1:])
    held = {id(p) for g in optimizer_a.param_groups for p in g["params"]}
    assert held == {id(p) for p in uninterrupted.parameters()}

    resumed, trainer_b = _resumed_run(make_module, tmp_path, callbacks=lambda: [StrategyCallback(strategies)])
    _assert_same_parameters(uninterrupted, resumed)
    assert _groups(optimizer_a) == _groups(trainer_b.optimizers[0])
    if scheduler:
        sched_a, sched_b = trainer_a.lr_scheduler_configs[0].scheduler, trainer_b.lr_scheduler_configs[0].scheduler
        assert sched_a.base_lrs == sched_b.base_lrs and len(sched_b.lr_lambdas) == len(optimizer_a.param_groups)


# --------------------------------------------------------------------------- schedulers of foreign modules
class LearningRates:
    """Records every param group's learning rate at the start of every training batch."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        class _Recorder(pl.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):  # noqa: N805
                self.by_step.append([g["lr"] for g in trainer.optimizers[0].param_groups])

        self.by_step: list[list[float]] = []
        self.callback = _Recorder()


@pytest.mark.parametrize("scheduler", ["lambda", "step"])
def test_added_groups_follow_the_foreign_scheduler(scheduler):
    module = ForeignClassifier("test_resnet", lr=0.1, optimizer="sgd", scheduler=scheduler)
    lrs = LearningRates()
    trainer = make_trainer(3, [StrategyCallback([{"name": "gradual_unfreeze", "milestones": [1]}]), lrs.callback])
    trainer.fit(module, toy_loader(32, 16))
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) > 1
    # two steps per epoch; the schedule halves the rate every epoch, for old and new groups alike
    for step, rates in enumerate(lrs.by_step):
        expected = 0.1 * 0.5 ** (step // 2)
        assert rates == pytest.approx([expected] * len(rates)), f"step {step}"
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert len(sched.get_last_lr()) == len(optimizer.param_groups)
    assert sched.get_last_lr() == pytest.approx([0.1 * 0.5**3] * len(optimizer.param_groups))
    if scheduler == "lambda":
        assert len(sched.lr_lambdas) == len(sched.base_lrs) == len(optimizer.param_groups)
