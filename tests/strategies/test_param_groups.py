"""Named optimizer groups: building them, splitting a foreign optimizer by scale, and growing it on unfreeze."""

from __future__ import annotations

import pytest
import torch
from strategy_testkit import MODELS, head_names, make_backbone

from cvft.strategies import (
    GradualUnfreeze,
    LayerwiseLRDecay,
    add_param_groups,
    apply_strategies,
    build_param_groups,
    no_weight_decay_names,
)
from cvft.strategies.param_groups import split_param_groups_by_scale


def _decay_exempt(model):
    """Independent rule: biases, 1-d tensors (norm weights) and the ViT's tokens / position embedding."""
    tokens = {"cls_token", "pos_embed", "reg_token", "dist_token"}
    return {n for n, p in model.named_parameters() if n.endswith(".bias") or p.ndim <= 1 or n in tokens}


@pytest.mark.parametrize("model_name", MODELS)
def test_no_weight_decay_names(model_name):
    model = make_backbone(model_name)
    assert no_weight_decay_names(model) == _decay_exempt(model)


@pytest.mark.parametrize("model_name", MODELS)
def test_groups_are_named_complete_and_disjoint(model_name):
    model = make_backbone(model_name)
    groups = build_param_groups(model, lr=0.1, weight_decay=0.05, prefix="backbone.")
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    members = [id(p) for g in groups for p in g["params"]]
    assert sorted(members) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        assert group["param_names"] == ["backbone." + by_id[id(p)] for p in group["params"]]
        assert group["lr"] == group["initial_lr"] == 0.1 and group["lr_scale"] == 1.0
        kind = group["name"].split("/")[-1]
        assert kind in {"decay", "no_decay"}
        assert group["weight_decay"] == (0.05 if kind == "decay" else 0.0)
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {n for n, _ in model.named_parameters()} - _decay_exempt(model)
    assert set(groups[-1]["param_names"]) | set(groups[-2]["param_names"]) == {
        "backbone." + n for n in head_names(model)
    }
    torch.optim.AdamW(groups)  # a valid optimizer spec


def test_zero_weight_decay_gives_only_no_decay_groups():
    groups = build_param_groups(make_backbone("test_vit"), lr=0.1, weight_decay=0.0)
    assert all(g["name"].endswith("/no_decay") and g["weight_decay"] == 0.0 for g in groups)


def test_include_frozen_false_leaves_frozen_parameters_out():
    model = make_backbone("test_vit")
    apply_strategies(model, "linear_probe")
    groups = build_param_groups(model, lr=0.1, weight_decay=0.05, include_frozen=False)
    assert {n for g in groups for n in g["param_names"]} == head_names(model)
    everything = build_param_groups(model, lr=0.1, weight_decay=0.05)
    assert sum(len(g["params"]) for g in everything) == len(list(model.parameters()))


# --------------------------------------------------------------------------- split_param_groups_by_scale
@pytest.mark.parametrize("named", [False, True])
def test_split_gives_each_parameter_its_scaled_rate(named):
    model = make_backbone("test_vit")
    scales = LayerwiseLRDecay(decay=0.5).lr_scales(model)
    params = model.named_parameters() if named else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    split_param_groups_by_scale(optimizer, model, scales, [scheduler])
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(by_id) == len(list(model.parameters()))
    for name, param in model.named_parameters():
        group = by_id[id(param)]
        assert group["lr"] == pytest.approx(0.01 * scales[name])
        assert group["weight_decay"] == 0.05
        if named:
            assert group["param_names"][[id(p) for p in group["params"]].index(id(param))] == name
    assert len(scheduler.lr_lambdas) == len(scheduler.base_lrs) == len(optimizer.param_groups)
    optimizer.step()
    scheduler.step()
    for name, param in model.named_parameters():
        assert by_id[id(param)]["lr"] == pytest.approx(0.01 * scales[name] * 0.5)


def test_split_with_uniform_scale_keeps_the_groups():
    model = make_backbone("test_resnet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    split_param_groups_by_scale(optimizer, model, {n: 0.5 for n, _ in model.named_parameters()})
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


# --------------------------------------------------------------------------- add_param_groups
def test_add_param_groups_adds_only_missing_parameters_as_named_groups():
    model = make_backbone("test_resnet")
    strategy = GradualUnfreeze(milestones=[1], groups_per_milestone=1)
    strategy.setup(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.05)
    newly = strategy.on_epoch_start(model, 1)
    added = add_param_groups(optimizer, model, [n for n, p in model.named_parameters() if p.requires_grad])
    assert {n for n, p in model.named_parameters() if id(p) in {id(q) for g in added for q in g["params"]}} == set(
        newly
    )
    assert all(g["name"].startswith("cvft/layer4") for g in added)
    assert {g["weight_decay"] for g in added} == {0.0, 0.05}
    assert all("param_names" not in g for g in optimizer.param_groups)
    assert add_param_groups(optimizer, model, newly) == []  # already held


def test_add_param_groups_keeps_param_names_when_the_optimizer_uses_them():
    model = make_backbone("test_resnet")
    apply_strategies(model, "linear_probe")
    optimizer = torch.optim.AdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=0.01)
    added = add_param_groups(optimizer, model, ["layer4.0.conv1.weight"])
    assert added[0]["param_names"] == ["layer4.0.conv1.weight"]


def test_added_groups_join_a_running_schedule_at_their_own_scale():
    """The first group's own lr scale and the schedule's current factor must not leak into new groups."""
    model = make_backbone("test_vit")
    stack = apply_strategies(
        model, [{"name": "gradual_unfreeze", "milestones": [0, 2], "groups_per_milestone": 1}, "layerwise_lr"]
    )
    scales = stack.lr_scales(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.1**epoch)
    split_param_groups_by_scale(optimizer, model, scales, [scheduler])
    assert optimizer.param_groups[0]["lr_scale"] != 1.0  # the first group is the scaled top block
    optimizer.step()
    scheduler.step()  # schedule factor is now 0.1
    newly = stack.on_epoch_start(model, 2)
    added = add_param_groups(optimizer, model, newly, lr_scales=scales, schedulers=[scheduler])
    assert added
    by_name = {n: p for n, p in model.named_parameters()}
    for group in added:
        scale = scales[next(n for n in newly if by_name[n] is group["params"][0])]
        assert group["lr_scale"] == pytest.approx(scale)
        assert group["initial_lr"] == pytest.approx(scale)
        assert group["lr"] == pytest.approx(0.1 * scale)
    optimizer.step()
    scheduler.step()
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.01 * group["lr_scale"])
