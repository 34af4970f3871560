"""Structured selective fine-tuning (``filter_select``): selections against hand-computed rankings for each criterion
and scope, bit-identical unselected rows, exact merge, adapter round trips (also across selections of another size),
closed-form trainable counts, the three usage modes, resume and argument errors."""

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
from cvft.strategies import StrategyCallback, apply_strategies, build_param_groups
from cvft.strategies.filter_select import (
    FilterDeltaLayer,
    filter_select_layers,
    filter_selection,
    merge_filter_select,
    taylor_scores,
)

MODELS = ["test_vit", "test_resnet"]
SCOPES = ["per_layer", "global"]


# --------------------------------------------------------------------------- independent references
def l1_reference(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.weight": m.weight.detach().abs().sum(dim=tuple(range(1, m.weight.dim())))
        for n, m in weight_layers(model).items()
    }


def following_batchnorm(conv_name: str) -> str:
    """The BatchNorm right after each convolution of test_resnet, written out from its architecture."""
    explicit = {"conv1.0": "conv1.1", "conv1.3": "conv1.4", "conv1.6": "bn1"}
    if conv_name in explicit:
        return explicit[conv_name]
    block, _, leaf = conv_name.rpartition(".")
    if block.endswith("downsample"):  # downsample = (pool, conv, bn)
        return f"{block}.{int(leaf) + 1}"
    return f"{block}.bn{leaf[len('conv') :]}"


def bn_scale_reference(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.weight": model.get_submodule(following_batchnorm(n)).weight.detach().abs() for n in weight_layers(model)
    }


def taylor_reference(model: nn.Module, loader, batches: int) -> dict[str, torch.Tensor]:
    """sum_b |sum_row w * dL_b/dw| per output row, on a plain model in eval mode, cross-entropy loss."""
    layers = weight_layers(model)
    model.eval()
    weights = [m.weight for m in layers.values()]
    totals = [torch.zeros(w.shape[0]) for w in weights]
    for seen, (images, targets) in enumerate(loader):
        if seen == batches:
            break
        grads = torch.autograd.grad(F.cross_entropy(model(images), targets), weights)
        for total, weight, grad in zip(totals, weights, grads, strict=True):
            total += (weight.detach() * grad).sum(dim=tuple(range(1, weight.dim()))).abs()
    return {f"{n}.weight": t for n, t in zip(layers, totals, strict=True)}


def count_of(k: float, rows: int) -> int:
    return min(rows, max(1, round(k * rows)))


def expected_rows(scores: dict[str, torch.Tensor], k: float, scope: str) -> dict[str, set[int]]:
    """Top rows per layer or over all layers; the boundary must not be a tie (else the reference is ambiguous)."""
    if scope == "per_layer":
        result = {}
        for name, score in scores.items():
            count = count_of(k, score.numel())
            ordered = score.sort(descending=True).values
            assert count == score.numel() or ordered[count - 1] > ordered[count], f"tie at the boundary in {name}"
            result[name] = set(score.topk(count).indices.tolist())
        return result
    return top_over_tensors(scores, count_of(k, sum(score.numel() for score in scores.values())), "global")


def selection_sets(model: nn.Module) -> dict[str, set[int]]:
    return {name: set(rows.tolist()) for name, rows in filter_selection(model).items()}


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.weight": layer.effective_weight().detach().clone() for n, layer in filter_select_layers(model).items()
    }


def random_gammas(model: nn.Module) -> nn.Module:
    """BatchNorm scales drawn at random (timm initialises them to 1 or 0: a ranking would be all ties)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 2 - 1)
    return model


def calibratable(model_name: str) -> nn.Module:
    """A test model whose every row gets a gradient.

    The ResNet's zero-initialised last BatchNorm of each block would zero the gradients of the whole residual branch
    (its Taylor scores would all tie at 0, and its selected rows could not move).
    """
    model = make_backbone(model_name)
    return random_gammas(model) if model_name == "test_resnet" else model


def outputs(model: nn.Module, seed: int = 5) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


# --------------------------------------------------------------------------- selections
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("model_name", MODELS)
def test_l1_selection_is_the_hand_computed_ranking(model_name, scope):
    expected = expected_rows(l1_reference(make_backbone(model_name)), 0.25, scope)
    model = make_backbone(model_name)
    apply_strategies(model, [{"name": "filter_select", "k": 0.25, "criterion": "l1", "scope": scope}])
    assert selection_sets(model) == expected
    for name, layer in filter_select_layers(model).items():
        assert layer.delta.shape == (len(expected[f"{name}.weight"]), *layer.base.weight.shape[1:])
    if scope == "global":  # layers get different shares of their rows
        shares = {
            len(rows) / filter_select_layers(model)[n.removesuffix(".weight")].num_rows for n, rows in expected.items()
        }
        assert len(shares) > 1


@pytest.mark.parametrize("scope", SCOPES)
def test_bn_scale_selection_is_the_ranking_of_the_following_batchnorm(scope):
    expected = expected_rows(bn_scale_reference(random_gammas(make_backbone("test_resnet"))), 0.25, scope)
    model = random_gammas(make_backbone("test_resnet"))
    apply_strategies(model, [{"name": "filter_select", "k": 0.25, "criterion": "bn_scale", "scope": scope}])
    assert selection_sets(model) == expected
    assert expected != expected_rows(l1_reference(make_backbone("test_resnet")), 0.25, scope)


@pytest.mark.parametrize("model_name", ["test_vit", "test_convnext"])
def test_bn_scale_without_a_following_batchnorm_is_refused(model_name):
    with pytest.raises(StrategyError, match="criterion='l1' or 'taylor'"):
        apply_strategies(make_backbone(model_name), [{"name": "filter_select", "criterion": "bn_scale"}])


def test_bn_scale_refuses_a_layer_no_batchnorm_directly_follows():
    # the ResNet has BatchNorm, but a ReLU now stands between this convolution and its BatchNorm
    model = make_backbone("test_resnet")
    model.layer1[0].conv1 = nn.Sequential(model.layer1[0].conv1, nn.ReLU())
    with pytest.raises(StrategyError, match=r"directly follows layer1\.0\.conv1\.0"):
        apply_strategies(model, [{"name": "filter_select", "criterion": "bn_scale", "targets": r"layer1\.0\.conv1\.0"}])


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("model_name", MODELS)
def test_taylor_selection_is_the_hand_run_calibration(model_name, scope):
    loader = toy_loader(48, 8)
    expected = expected_rows(taylor_reference(calibratable(model_name), loader, batches=3), 0.25, scope)
    assert expected != expected_rows(l1_reference(calibratable(model_name)), 0.25, scope)
    model = calibratable(model_name).train()
    spec = {"name": "filter_select", "k": 0.25, "criterion": "taylor", "scope": scope, "calibration_batches": 3}
    apply_strategies(model, [spec], calibration_data=loader)
    assert selection_sets(model) == expected
    # calibration restored flags and gradients; the resized deltas are the trainable parameters
    assert trainable_names(model) == {f"{n}.delta" for n in filter_select_layers(model)} | head_names(model)
    assert all(p.grad is None for p in model.parameters())
    for name, layer in filter_select_layers(model).items():
        assert layer.delta.shape[0] == len(expected[f"{name}.weight"]) and not layer.delta.any()


class TinyNet(nn.Module):
    """x -> body (Linear 3->4, no bias) -> head (Linear 4->2)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4, bias=False)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.body.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, -3.0]]))
            self.head.weight.copy_(torch.tensor([[1.0, 1.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.5]]))
            self.head.bias.zero_()

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_taylor_scores_on_a_known_loss_by_hand():
    # loss = sum of logits: dL/dW_body[i, j] = s_i * X_j with s = column sums of the head weight, X = sum of the inputs,
    # so the row score of one batch is |s_i * (W_i . X)|
    batches = [(torch.tensor([[1.0, 1.0, 1.0]]), torch.zeros(1)), (torch.tensor([[2.0, -1.0, 0.0]]), torch.zeros(1))]
    # s = [1, 2, -1, 1]; batch 1: W.X = [1, 2, 3, -3] -> |s * W.X| = [1, 4, 3, 3]
    #                    batch 2: W.X = [2, -2, 1, 0] -> [2, 4, 1, 0]; sum: [3, 8, 4, 3]
    model = TinyNet()

    def sum_loss(logits, targets):
        return logits.sum()

    scores = taylor_scores(model, [model.body.weight], batches, sum_loss, num_batches=2)
    assert scores[0].tolist() == [3.0, 8.0, 4.0, 3.0]
    model = TinyNet()
    spec = {"name": "filter_select", "k": 0.5, "criterion": "taylor", "calibration_batches": 2}
    apply_strategies(model, [spec], calibration_data=batches, loss_fn=sum_loss)
    assert model.body.rows.tolist() == [1, 2]  # the two largest of [3, 8, 4, 3]
    assert model.body.delta.shape == (2, 3)


# --------------------------------------------------------------------------- training, merge, adapter files
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("model_name", MODELS)
def test_rows_outside_the_mask_stay_bit_identical_and_selected_rows_move(model_name, scope):
    model = calibratable(model_name)
    apply_strategies(model, [{"name": "filter_select", "k": 0.2, "scope": scope}])
    layers = filter_select_layers(model)
    chosen = selection_sets(model)
    before = effective_weights(model)
    base_before = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    optimizer = torch.optim.AdamW(build_param_groups(model, 1e-2, 0.1), lr=1e-2)
    images, targets = toy_task(8)
    with_gradient: dict[str, set[int]] = {f"{n}.weight": set() for n in layers}
    for _ in range(3):
        model.train()
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, layer in layers.items():  # selected rows with a non-zero gradient (a dead ReLU channel gets none)
            if layer.delta.grad is None:  # a layer without selected rows (global scope)
                continue
            local = torch.nonzero(layer.delta.grad.flatten(1).abs().sum(dim=1)).flatten()
            with_gradient[f"{name}.weight"] |= set(layer.rows[local].tolist())
        optimizer.step()
    after = effective_weights(model)
    for name, weight in after.items():
        moved = {row for row in range(weight.shape[0]) if not torch.equal(weight[row], before[name][row])}
        assert moved <= chosen[name], f"{name}: unselected rows {sorted(moved - chosen[name])[:5]} moved"
        assert moved == with_gradient[name], f"{name}: selected rows with a gradient did not move"
    assert sum(map(len, with_gradient.values())) > 0.5 * sum(map(len, chosen.values())), "most selected rows train"
    for name, layer in layers.items():
        assert torch.equal(layer.base.weight, base_before[name]), "a frozen base weight changed"


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("model_name", [*MODELS, "test_convnext"])
def test_merge_equals_unmerged_and_restores_the_plain_model(model_name, scope):
    model = make_backbone(model_name)
    keys = list(model.state_dict())
    apply_strategies(model, [{"name": "filter_select", "k": 0.3, "scope": scope}])
    adamw_steps(model)
    effective = effective_weights(model)
    expected = outputs(model)
    merge_filter_select(model)
    torch.testing.assert_close(outputs(model), expected, rtol=1e-6, atol=1e-6)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, FilterDeltaLayer) for m in model.modules())
    state = model.state_dict()
    assert all(torch.equal(state[name], weight) for name, weight in effective.items())
    kwargs = {"img_size": 32} if model_name == "test_vit" else {}
    timm.create_model(model_name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).load_state_dict(state)


def test_train_bias_trains_the_selected_rows_biases_only_and_merges_exactly():
    model = make_backbone("test_vit")
    keys = list(model.state_dict())
    apply_strategies(model, [{"name": "filter_select", "k": 0.25, "train_bias": True}])
    layers = filter_select_layers(model)
    assert trainable_names(model) == {f"{n}.{p}" for n in layers for p in ("delta", "bias_delta")} | head_names(model)
    bias_before = {n: layer.effective_bias().detach().clone() for n, layer in layers.items()}
    adamw_steps(model)
    for name, layer in layers.items():
        changed = set(torch.nonzero(layer.effective_bias() != bias_before[name]).flatten().tolist())
        assert changed <= set(layer.rows.tolist()) and changed
    expected = outputs(model)
    merge_filter_select(model)
    torch.testing.assert_close(outputs(model), expected, rtol=1e-6, atol=1e-6)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("model_name", MODELS)
def test_adapter_file_round_trip_is_exact(model_name, tmp_path):
    spec = {"name": "filter_select", "k": 0.2}
    model = make_backbone(model_name)
    stack = apply_strategies(model, [spec])
    adamw_steps(model)
    path = save_adapter(model, tmp_path / "filters", model_name, stack.config())
    tensors, _ = read_adapter(path)
    layers = filter_select_layers(model)
    assert set(tensors) == {f"{n}.{t}" for n in layers for t in ("delta", "rows")} | head_names(model)
    fresh = make_backbone(model_name)
    apply_strategies(fresh, [spec])
    load_adapter(fresh, path, backbone=model_name)
    assert torch.equal(outputs(fresh), outputs(model))


def test_global_taylor_adapter_loads_onto_a_model_that_selected_other_rows(tmp_path):
    spec = {"name": "filter_select", "k": 0.2, "criterion": "taylor", "scope": "global", "calibration_batches": 2}
    model = make_backbone("test_resnet")
    stack = apply_strategies(model, [spec], calibration_data=toy_loader(32, 8))
    adamw_steps(model)
    path = save_adapter(model, tmp_path / "filters", "test_resnet", stack.config())

    fresh = make_backbone("test_resnet")
    images, targets = toy_task(32, seed=7)
    other_data = [(images[i : i + 8], (targets[i : i + 8] + 1) % NUM_CLASSES) for i in range(0, 32, 8)]
    apply_strategies(fresh, [spec], calibration_data=other_data)
    counts = {n: layer.rows.numel() for n, layer in filter_select_layers(fresh).items()}
    assert counts != {n: layer.rows.numel() for n, layer in filter_select_layers(model).items()}
    load_adapter(fresh, path, backbone="test_resnet")  # resizes every layer's delta to the file's selection
    assert selection_sets(fresh) == selection_sets(model)
    assert torch.equal(outputs(fresh), outputs(model))


@pytest.mark.parametrize("k", [0.1, 0.25])
def test_trainable_count_is_k_rows_times_row_size_plus_head(k):
    # ResNet: every conv outside the head, rows = out_channels, row size = in_channels / groups * kh * kw
    model = make_backbone("test_resnet")
    expected = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            expected += count_of(k, module.out_channels) * (module.in_channels // module.groups * kh * kw)
    expected += model.num_features * NUM_CLASSES + NUM_CLASSES
    apply_strategies(model, [{"name": "filter_select", "k": k}])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected

    # ViT: patch conv (D rows of 3*P*P), per block qkv (3D rows of D), proj (D of D), fc1 (H of D), fc2 (D of H)
    vit = make_backbone("test_vit")
    D, L, P = vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size[0]  # noqa: N806
    H = vit.blocks[0].mlp.fc1.out_features  # noqa: N806
    c = count_of
    block = c(k, 3 * D) * D + c(k, D) * D + c(k, H) * D + c(k, D) * H
    expected = c(k, D) * 3 * P * P + L * block + D * NUM_CLASSES + NUM_CLASSES
    apply_strategies(vit, [{"name": "filter_select", "k": k}])
    assert sum(p.numel() for p in vit.parameters() if p.requires_grad) == expected


# --------------------------------------------------------------------------- the Lightning usage modes, resume
def test_image_classifier_fit_calibrates_taylor_on_the_training_data():
    loader = toy_loader(32, 8)
    spec = {"name": "filter_select", "k": 0.2, "criterion": "taylor", "scope": "global", "calibration_batches": 2}
    model = seeded_classifier(spec)
    pristine = make_backbone("test_resnet")
    for name, layer in filter_select_layers(model.backbone).items():
        assert torch.equal(layer.base.weight, weight_layers(pristine)[name].weight), "references must share weights"
    expected = expected_rows(taylor_reference(copy.deepcopy(pristine), loader, batches=2), 0.2, "global")
    before = effective_weights(model.backbone)
    make_trainer(1, limit_train_batches=2).fit(model, loader)
    assert selection_sets(model.backbone) == expected
    after = effective_weights(model.backbone)
    moved = {n: {r for r in range(w.shape[0]) if not torch.equal(w[r], before[n][r])} for n, w in after.items()}
    assert all(moved[n] <= expected[n] for n in expected) and any(moved.values())


def test_strategy_callback_calibrates_a_foreign_module():
    loader = toy_loader(32, 8)
    expected = expected_rows(taylor_reference(make_backbone("test_vit"), loader, batches=2), 0.25, "per_layer")
    module = ForeignClassifier("test_vit", lr=1e-2)
    spec = {"name": "filter_select", "k": 0.25, "criterion": "taylor", "calibration_batches": 2}
    make_trainer(1, [StrategyCallback([spec])], limit_train_batches=2).fit(module, loader)
    assert selection_sets(module.net) == expected
    assert any(layer.delta.any() for layer in filter_select_layers(module.net).values())


def test_resume_restores_a_global_selection_of_other_sizes(tmp_path):
    spec = {"name": "filter_select", "k": 0.2, "criterion": "taylor", "scope": "global", "calibration_batches": 2}

    first = seeded_classifier(spec)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(2, [checkpoint], enable_checkpointing=True, limit_train_batches=2).fit(first, toy_loader(32, 8))
    chosen = selection_sets(first.backbone)
    resumed = seeded_classifier(spec)  # set up by l1: other row counts per layer
    assert selection_sets(resumed.backbone) != chosen
    trainer = make_trainer(3, limit_train_batches=2)
    trainer.fit(resumed, toy_loader(32, 8, seed=3), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.current_epoch == 3
    assert selection_sets(resumed.backbone) == chosen


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0.0}, r"in \(0, 1\]"),
        ({"k": 1.5}, r"in \(0, 1\]"),
        ({"k": True}, r"in \(0, 1\]"),
        ({"k": "10%"}, r"in \(0, 1\]"),
        ({"criterion": "hessian"}, "bn_scale"),
        ({"scope": "per_tensor"}, "per_layer"),
        ({"calibration_batches": 0}, ">= 1"),
        ({"targets": []}, "empty"),
        ({"targets": "blocks.99.attn.qkv"}, "filter_select: target"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(StrategyError, match=match):
        apply_strategies(make_backbone("test_vit"), [{"name": "filter_select", **kwargs}])


def test_taylor_without_calibration_data_is_refused_with_the_way_out():
    with pytest.raises(StrategyError, match="calibration_data="):
        apply_strategies(make_backbone("test_resnet"), [{"name": "filter_select", "criterion": "taylor"}])


def test_k_of_one_trains_every_row():
    model = make_backbone("test_resnet")
    apply_strategies(model, [{"name": "filter_select", "k": 1.0, "targets": r"layer1\.0\.conv1"}])
    layer = model.layer1[0].conv1
    assert layer.rows.tolist() == list(range(layer.num_rows))
