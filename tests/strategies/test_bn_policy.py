"""The ``bn`` option (BatchNorm policy) of every parameter strategy, its composition rule and adapter round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from strategy_testkit import IMAGE_SIZE, make_backbone, toy_task
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cvft.adapter_files import adapter_state_dict, load_adapter, save_adapter
from cvft.errors import StrategyError
from cvft.strategies import StrategyStack, apply_strategies, available_strategies, build_strategy, get_strategy
from cvft.strategies.lora import LoRA

#: A spec for every strategy taking ``bn`` that runs on the BatchNorm CNN ``test_resnet`` (the ViT-only ones,
#: vit_adapter, vpt, prefix_tuning and qlora, have no BatchNorm to act on and are checked for the option only).
RESNET_SPECS = {
    "lora": {"rank": 2},
    "loha": {"rank": 2},
    "lokr": {"rank": 2},
    "shared_lora": {"rank": 2},
    "bitfit": {},
    "ssf": {},
    "sparse": {"budget": 0.01},
    "filter_select": {"k": 0.1},
    "block_expansion": {"num_blocks": 1},
    "conv_adapter": {},
    "shared_adapter": {},
    "side_module": {},
    "linear_probe": {},
    "freeze_layers": {"num_groups": 2},
    "norm_only": {},
    "embedding_only": {},
    "gradual_unfreeze": {"milestones": [5]},
}


def _bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.running_mean.clone() for name, m in _bn_layers(model).items()}


def _moved(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {name for name, m in _bn_layers(model).items() if not torch.equal(before[name], m.running_mean)}


def _policy_layers(model: nn.Module) -> set[str]:
    """BatchNorm layers with a frozen affine parameter: the ones whose statistics the policy decides."""
    return {
        name for name, m in _bn_layers(model).items() if any(not p.requires_grad for p in m.parameters(recurse=False))
    }


def test_every_strategy_taking_bn_is_covered_here():
    taking = {name for name in available_strategies() if get_strategy(name).takes_bn}
    vit_only = {"vit_adapter", "vpt", "prefix_tuning", "qlora"}
    assert taking == set(RESNET_SPECS) | vit_only
    for name in vit_only:  # the option is accepted (and validated) there too
        assert build_strategy({"name": name, "bn": "train"}).bn_policy == "train"


@pytest.mark.parametrize("name", sorted(RESNET_SPECS))
def test_bn_policy_decides_whether_frozen_batchnorm_statistics_move(name):
    trainable = {}
    for bn in ("train", "frozen"):
        model = make_backbone("test_resnet")
        apply_strategies(model, [{"name": name, **RESNET_SPECS[name], "bn": bn}])
        # norm_only trains every BatchNorm's affine weights and leaves their statistics to the policy
        decided = set(_bn_layers(model)) if name == "norm_only" else _policy_layers(model)
        assert decided, "the strategy should leave some BatchNorm layers with frozen affine weights"
        trainable[bn] = {n for n, p in model.named_parameters() if p.requires_grad}
        before = _stats(model)
        model.train()  # what Lightning does at every epoch start
        model(toy_task(8)[0])
        moved = _moved(before, model)
        if bn == "train":
            assert decided <= moved  # statistics re-estimated on the new data
        else:
            assert not decided & moved  # pretrained statistics kept
    assert trainable["train"] == trainable["frozen"]  # the policy never changes which parameters train


def test_bn_train_keeps_affine_weights_frozen_while_train_bn_trains_them():
    model = make_backbone("test_resnet")
    apply_strategies(model, [{"name": "linear_probe", "bn": "train"}])
    assert not model.bn1.weight.requires_grad and model.bn1.training
    model = make_backbone("test_resnet")
    apply_strategies(model, [{"name": "linear_probe", "train_bn": True}])
    assert model.bn1.weight.requires_grad
    with pytest.raises(StrategyError, match="train_bn=True"):
        build_strategy({"name": "linear_probe", "train_bn": True, "bn": "frozen"})


def test_adabn_reestimates_once_on_the_training_batches_then_freezes():
    images, targets = toy_task(32)
    model = make_backbone("test_resnet")
    pristine = _stats(model)
    stack = apply_strategies(model, [LoRA(rank=2).with_bn("adabn")], calibration_data=[(images, targets)])
    assert stack.needs_data
    # the stem's BatchNorm now holds the exact batch statistics of its input on the training images
    with torch.no_grad():
        stem_input = model.conv1(images)
    expected = stem_input.mean((0, 2, 3))
    assert not torch.allclose(pristine["bn1"], expected, atol=1e-2)
    torch.testing.assert_close(model.bn1.running_mean, expected, rtol=1e-3, atol=1e-3)
    assert _moved(pristine, model) == set(_bn_layers(model))
    after_calibration = _stats(model)
    model.train()
    model(toy_task(8, seed=3)[0])
    assert not _moved(after_calibration, model)  # frozen from then on


def test_adabn_without_training_batches_is_refused():
    with pytest.raises(StrategyError, match="calibration_data"):
        apply_strategies(make_backbone("test_resnet"), [{"name": "bitfit", "bn": "adabn"}])


def test_bn_errors_name_the_value_and_the_choices():
    with pytest.raises(StrategyError, match="'train', 'frozen', 'adabn'"):
        build_strategy({"name": "lora", "bn": "eval"})
    with pytest.raises(StrategyError, match="bn"):
        build_strategy({"name": "full", "bn": "train"})  # not a parameter strategy


def test_stack_explicit_policies_must_agree():
    with pytest.raises(StrategyError, match="different BatchNorm policies"):
        StrategyStack(
            [
                build_strategy({"name": "freeze_layers", "num_groups": 1, "bn": "train"}),
                build_strategy({"name": "lora", "bn": "frozen"}),
            ]
        )


def test_stack_one_explicit_policy_holds_for_every_member():
    lora = LoRA(rank=2).with_bn("train")
    schedule = build_strategy({"name": "gradual_unfreeze", "milestones": [1]})
    stack = StrategyStack([lora, schedule])
    assert stack.bn_policy == "train" and schedule.bn_policy == "train"
    model = make_backbone("test_resnet")
    stack.setup(model)
    stack.on_epoch_start(model, 1)  # the schedule re-applies the stack's policy, not its own fallback
    assert all(m.training for m in _bn_layers(model.train()).values())
    assert stack.config()[0]["bn"] == "train"  # recorded for adapters and checkpoints
    assert "bn" not in stack.config()[1]  # what the user gave, nothing more


def test_stack_without_explicit_policy_takes_the_last_default(monkeypatch):
    monkeypatch.setattr(LoRA, "default_bn", "train")
    stack = StrategyStack([build_strategy("bitfit"), LoRA(rank=2)])  # bitfit's default is "frozen"
    assert stack.bn_policy == "train"
    model = make_backbone("test_resnet")
    stack.setup(model)
    model.train()
    before = _stats(model)
    model(toy_task(4)[0])
    assert _moved(before, model) == set(_bn_layers(model))


def _train_steps(model, stack, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, targets = toy_task(16)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("bn", ["train", "adabn", "frozen"])
def test_adapter_round_trip_reproduces_the_trained_model(tmp_path, bn):
    pristine = make_backbone("test_resnet")
    model = copy.deepcopy(pristine)
    calibration = [toy_task(16, seed=5)]
    stack = apply_strategies(model, [{"name": "lora", "rank": 2, "bn": bn}], calibration_data=calibration)
    _train_steps(model, stack)
    stats_moved = _moved(_stats(pristine), model)
    assert bool(stats_moved) == (bn != "frozen")
    saved = adapter_state_dict(model)
    assert all(f"{name}.running_mean" in saved for name in stats_moved)
    path = save_adapter(model, tmp_path / "adapter", "test_resnet", stack.config())

    fresh = copy.deepcopy(pristine)
    from cvft.adapter_files import read_adapter

    _, info = read_adapter(path)
    StrategyStack([build_strategy(s) for s in info.strategies]).setup(fresh)  # no calibration: the file has it all
    load_adapter(fresh, path, backbone="test_resnet")
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), model.eval()(images), rtol=0, atol=0)
