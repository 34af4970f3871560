"""Selective (sparse) fine-tuning: selections against independent top-k references, calibration in the three usage
modes, sparse adapter files, resume, merge and argument errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from strategy_testkit import (
    NUM_CLASSES,
    ForeignClassifier,
    adamw_steps,
    bn_stats,
    head_names,
    make_backbone,
    make_trainer,
    seeded_classifier,
    top_over_tensors,
    toy_loader,
    toy_task,
    trainable_names,
    weight_layers,
)
from torch import nn

from cvft.adapter_files import load_adapter, read_adapter, save_adapter
from cvft.errors import StrategyError
from cvft.strategies import StrategyCallback, apply_strategies
from cvft.strategies.sparse import SparseDeltaLayer, merge_sparse, sparse_layers, sparse_selection

MODELS = ["test_vit", "test_resnet"]


# --------------------------------------------------------------------------- independent references
def reference_scores(model: nn.Module, criterion: str, loader=None, batches: int = 0) -> dict[str, torch.Tensor]:
    """|w|, sum_b |g_b| or mean_b g_b^2 per weight entry of a plain (unwrapped) model, in eval mode."""
    layers = weight_layers(model)
    if criterion == "magnitude":
        return {f"{n}.weight": m.weight.detach().abs() for n, m in layers.items()}
    model.eval()
    weights = [m.weight for m in layers.values()]
    totals = [torch.zeros_like(w) for w in weights]
    seen = 0
    for images, targets in loader:
        if seen == batches:
            break
        grads = torch.autograd.grad(F.cross_entropy(model(images), targets), weights)
        for total, grad in zip(totals, grads, strict=True):
            total += grad.abs() if criterion == "gradient" else grad.square()
        seen += 1
    if criterion == "fisher":
        totals = [t / seen for t in totals]
    return {f"{n}.weight": t for n, t in zip(layers, totals, strict=True)}


def global_top(scores: dict[str, torch.Tensor], k: int) -> dict[str, set[int]]:
    """The k largest scores over all tensors, as per-tensor sets of flat indices; the k-th must be unambiguous."""
    return top_over_tensors(scores, k, "budget")


def selection_sets(model: nn.Module) -> dict[str, set[int]]:
    return {name: set(indices.tolist()) for name, indices in sparse_selection(model).items()}


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": layer.effective_weight().detach().clone() for n, layer in sparse_layers(model).items()}


def changed_positions(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, set[int]]:
    return {n: set(torch.nonzero(before[n].flatten() != after[n].flatten()).flatten().tolist()) for n in before}


def selectable_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in weight_layers(model).values())


# --------------------------------------------------------------------------- selection and training
@pytest.mark.parametrize("model_name", MODELS)
def test_magnitude_selection_is_global_top_k_and_only_it_moves(model_name):
    pristine = make_backbone(model_name)
    k = round(0.01 * selectable_count(pristine))
    expected = global_top(reference_scores(pristine, "magnitude"), k)
    model = make_backbone(model_name)
    apply_strategies(model, [{"name": "sparse", "budget": 0.01, "criterion": "l1"}])
    assert selection_sets(model) == expected
    assert model.sparse_delta.values.numel() == model.sparse_delta.indices.numel() == k

    before = effective_weights(model)
    base_before = {n: layer.base.weight.detach().clone() for n, layer in sparse_layers(model).items()}
    adamw_steps(model, weight_decay=0.1)
    moved = changed_positions(before, effective_weights(model))
    assert all(moved[n] <= expected[n] for n in expected), "an unselected entry of an effective weight moved"
    # every trained value shows up in its effective weight, and nothing else does
    assert sum(map(len, moved.values())) == int(model.sparse_delta.values.ne(0).sum()) > 0
    for n, layer in sparse_layers(model).items():
        assert torch.equal(layer.base.weight, base_before[n]), "a frozen base weight changed"


def test_per_tensor_scope_gives_each_tensor_its_share_of_its_own_top_entries():
    pristine = make_backbone("test_resnet")
    scores = reference_scores(pristine, "magnitude")
    total = sum(s.numel() for s in scores.values())
    model = make_backbone("test_resnet")
    apply_strategies(model, [{"name": "sparse", "budget": 0.02, "scope": "per_tensor"}])
    chosen = selection_sets(model)
    assert sum(map(len, chosen.values())) == round(0.02 * total)
    for name, score in scores.items():
        k = len(chosen[name])
        assert abs(k - 0.02 * score.numel()) < 1
        assert chosen[name] == set(score.flatten().topk(k).indices.tolist())


@pytest.mark.parametrize("criterion", ["gradient", "fisher"])
@pytest.mark.parametrize("model_name", MODELS)
def test_data_criteria_through_apply_strategies(model_name, criterion):
    loader = toy_loader(48, 8)
    pristine = make_backbone(model_name)
    k = round(0.01 * selectable_count(pristine))
    expected = global_top(reference_scores(pristine, criterion, loader, batches=3), k)
    magnitude = global_top(reference_scores(pristine, "magnitude"), k)

    model = make_backbone(model_name).train()
    spec = {"name": "sparse", "budget": 0.01, "criterion": criterion, "calibration_batches": 3}
    stats = bn_stats(model)
    apply_strategies(model, [spec], calibration_data=loader)
    assert selection_sets(model) == expected
    assert expected != magnitude
    # calibration left mode, flags, gradients and BatchNorm statistics as setup left them
    assert all(m.training for m in model.modules() if not isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert trainable_names(model) == {"sparse_delta.values"} | head_names(model)
    assert all(p.grad is None for p in model.parameters())
    for name, (mean, var, count) in bn_stats(model).items():
        assert torch.equal(mean, stats[name][0]) and torch.equal(var, stats[name][1])
        assert torch.equal(count, stats[name][2])

    before = effective_weights(model)
    adamw_steps(model, weight_decay=0.1)
    moved = changed_positions(before, effective_weights(model))
    assert all(moved[n] <= expected[n] for n in expected)
    assert any(moved.values())


def test_data_criterion_without_data_is_refused_with_the_way_out():
    with pytest.raises(StrategyError, match="calibration_data="):
        apply_strategies(make_backbone("test_vit"), [{"name": "sparse", "criterion": "gradient"}])


def test_image_classifier_fit_calibrates_once_on_the_training_data():
    loader = toy_loader(32, 8)
    spec = {"name": "sparse", "budget": 0.01, "criterion": "gradient", "calibration_batches": 2}
    model = seeded_classifier(spec)
    pristine = make_backbone("test_resnet")
    layers = weight_layers(pristine)
    for name, layer in sparse_layers(model.backbone).items():
        assert torch.equal(layer.base.weight, layers[name].weight), "the reference must start from the same weights"
    k = model.backbone.sparse_delta.values.numel()
    assert selection_sets(model.backbone) == global_top(reference_scores(pristine, "magnitude"), k)
    expected = global_top(reference_scores(copy.deepcopy(pristine), "gradient", loader, batches=2), k)

    before = effective_weights(model.backbone)
    make_trainer(1, limit_train_batches=2).fit(model, loader)
    assert selection_sets(model.backbone) == expected
    moved = changed_positions(before, effective_weights(model.backbone))
    assert all(moved[n] <= expected[n] for n in expected) and any(moved.values())

    trained = model.backbone.sparse_delta.values.detach().clone()
    make_trainer(1, limit_train_batches=1).fit(model, toy_loader(32, 8))  # a second fit keeps the selection
    assert selection_sets(model.backbone) == expected
    assert not torch.equal(model.backbone.sparse_delta.values, trained)


def test_strategy_callback_calibrates_a_foreign_module_with_fisher():
    loader = toy_loader(32, 8)
    expected_scores = reference_scores(make_backbone("test_vit"), "fisher", loader, batches=2)
    module = ForeignClassifier("test_vit", lr=1e-2)
    spec = {"name": "sparse", "budget": 200, "criterion": "fisher", "calibration_batches": 2}
    callback = StrategyCallback([spec])
    make_trainer(1, [callback], limit_train_batches=2).fit(module, loader)
    assert selection_sets(module.net) == global_top(expected_scores, 200)


# --------------------------------------------------------------------------- adapter files, resume, merge
def test_adapter_file_holds_values_and_indices_only_and_loads_onto_a_differently_calibrated_model(tmp_path):
    spec = {"name": "sparse", "budget": 0.01, "criterion": "gradient", "calibration_batches": 2}
    model = make_backbone("test_vit")
    stack = apply_strategies(model, [spec], calibration_data=toy_loader(32, 8))
    adamw_steps(model)
    path = save_adapter(model, tmp_path / "sparse", "test_vit", stack.config())
    tensors, _ = read_adapter(path)
    k = model.sparse_delta.values.numel()
    assert set(tensors) == {"sparse_delta.values", "sparse_delta.indices", "head.weight", "head.bias"}
    assert tensors["sparse_delta.values"].shape == tensors["sparse_delta.indices"].shape == (k,)
    assert tensors["sparse_delta.indices"].dtype == torch.int64

    fresh = make_backbone("test_vit")
    images, targets = toy_task(32, seed=7)
    other_data = [(images[i : i + 8], (targets[i : i + 8] + 1) % NUM_CLASSES) for i in range(0, 32, 8)]
    apply_strategies(fresh, [spec], calibration_data=other_data)
    assert selection_sets(fresh) != selection_sets(model)
    load_adapter(fresh, path, backbone="test_vit")
    assert selection_sets(fresh) == selection_sets(model)
    x = torch.randn(3, 3, 32, 32)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_resume_from_a_checkpoint_keeps_the_indices(tmp_path):
    spec = {"name": "sparse", "budget": 0.01, "criterion": "gradient", "calibration_batches": 2}
    other = toy_loader(32, 8, seed=3)

    first = seeded_classifier(spec)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(3, [checkpoint], enable_checkpointing=True, limit_train_batches=2).fit(first, toy_loader(32, 8))
    chosen = selection_sets(first.backbone)

    reference = seeded_classifier(spec)  # what a fresh fit on the other data would choose
    make_trainer(1, limit_train_batches=1).fit(reference, other)
    assert selection_sets(reference.backbone) != chosen

    resumed = seeded_classifier(spec)
    trainer = make_trainer(4, limit_train_batches=2)
    trainer.fit(resumed, other, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.current_epoch == 4
    assert selection_sets(resumed.backbone) == chosen


@pytest.mark.parametrize("model_name", MODELS)
def test_merge_is_exact_and_restores_the_plain_model(model_name):
    model = make_backbone(model_name)
    keys = list(model.state_dict())
    apply_strategies(
        model, [{"name": "sparse", "budget": 0.02, "criterion": "fisher"}], calibration_data=toy_loader(16, 8)
    )
    adamw_steps(model)
    effective = effective_weights(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        merge_sparse(model)
        assert torch.equal(model(x), expected)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, SparseDeltaLayer) for m in model.modules())
    state = model.state_dict()
    assert all(torch.equal(state[name], weight) for name, weight in effective.items())
    timm.create_model(
        model_name, pretrained=False, num_classes=NUM_CLASSES, **({"img_size": 32} if model_name == "test_vit" else {})
    ).load_state_dict(state)


def test_other_timm_families_start_unchanged_and_merge_exactly():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    apply_strategies(model, [{"name": "sparse", "budget": 0.001, "targets": [r".*conv_dw", r".*mlp\.fc\d"]}])
    assert {n.rsplit(".", 2)[-2] for n in sparse_selection(model)} == {"conv_dw", "fc1", "fc2"}
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference)
        model.sparse_delta.values.normal_()
        expected = model(x)
        merge_sparse(model)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_conv_subclasses_keep_their_own_forward():
    from timm.layers import Conv2dSame

    from cvft.strategies.sparse import SparseDelta

    conv = Conv2dSame(3, 4, 3, stride=2)
    layer = SparseDeltaLayer(conv, SparseDelta([conv.weight.numel()], count=5), position=0)
    with torch.no_grad():
        layer.owner.values.normal_()
    x = torch.randn(1, 3, 9, 9)
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight.copy_(layer.effective_weight())
        assert torch.equal(layer(x), reference(x))


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 0.0}, r"in \(0, 1\)"),
        ({"budget": 1.0}, r"in \(0, 1\)"),
        ({"budget": 0}, ">= 1"),
        ({"budget": True}, "fraction"),
        ({"budget": "1%"}, "fraction"),
        ({"criterion": "hessian"}, "magnitude"),
        ({"scope": "layer"}, "per_tensor"),
        ({"calibration_batches": 0}, ">= 1"),
        ({"targets": []}, "empty"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(StrategyError, match=match):
        apply_strategies(make_backbone("test_resnet"), [{"name": "sparse", **kwargs}])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 10**9}, "exceeds"),
        ({"budget": 1e-9}, "selects nothing"),
        ({"targets": "blocks.99.attn.qkv"}, "Candidates: patch_embed.proj"),
        ({"targets": "head"}, "outside the classifier head"),
    ],
)
def test_budgets_and_targets_that_do_not_fit_the_model_are_refused(kwargs, match):
    with pytest.raises(StrategyError, match=match):
        apply_strategies(make_backbone("test_vit"), [{"name": "sparse", **kwargs}])
