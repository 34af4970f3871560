"""ImageClassifier: losses, metrics, validation of arguments, checkpoints, optimizer groups and schedules."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from quiet_trainer import make_trainer
from torch.utils.data import DataLoader, TensorDataset

from cvft.errors import CvftError
from cvft.strategies import Strategy
from cvft.tasks import ImageClassifier, WarmupCosine


def make_classifier(backbone="test_resnet", seed=0, **kwargs) -> ImageClassifier:
    torch.manual_seed(seed)
    kwargs.setdefault("num_classes", 3)
    return ImageClassifier(backbone, pretrained=False, **kwargs)


def single_label_loader(n=24, num_classes=3, batch_size=8, seed=0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % num_classes
    images = torch.randn(n, 3, 32, 32, generator=generator) + targets[:, None, None, None].float()
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size, shuffle=False)


def multi_label_loader(n=24, num_classes=3, batch_size=8, seed=0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.arange(n)[:, None] >> torch.arange(num_classes)) % 2  # every label both on and off
    images = torch.randn(n, 3, 32, 32, generator=generator)
    return DataLoader(TensorDataset(images, targets.float()), batch_size=batch_size, shuffle=False)


def fit_one_step(model: ImageClassifier, loader=None) -> pl.Trainer:
    trainer = make_trainer(1, limit_train_batches=1)
    trainer.fit(model, loader or single_label_loader())
    return trainer


# --------------------------------------------------------------------------- arguments
def test_num_classes_and_class_names_must_agree():
    with pytest.raises(CvftError, match="num_classes=3 but 2 class names"):
        make_classifier(num_classes=3, class_names=["cat", "dog"])
    model = make_classifier(num_classes=None, class_names=["cat", "dog"])
    assert model.num_classes == 2 and model.class_names == ["cat", "dog"]
    assert make_classifier(num_classes=2).class_names == ["0", "1"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": None}, "num_classes"),
        ({"num_classes": 0}, "num_classes"),
        ({"pos_weight": [1.0, 2.0, 3.0]}, "pos_weight"),  # needs multi_label
        ({"multi_label": True, "pos_weight": [1.0]}, "pos_weight"),  # one value per class
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(CvftError, match=match):
        make_classifier(**kwargs)


def test_unknown_optimizer_raises_when_optimizers_are_configured():
    model = make_classifier(optimizer="lamb")
    with pytest.raises(CvftError, match="Unknown optimizer 'lamb'"):
        fit_one_step(model)


# --------------------------------------------------------------------------- losses and metrics
def test_single_label_loss_is_cross_entropy_with_label_smoothing():
    model = make_classifier(label_smoothing=0.1)
    logits, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    expected = F.cross_entropy(logits, targets, label_smoothing=0.1)
    torch.testing.assert_close(model.loss(logits, targets), expected)


def test_multi_label_loss_is_bce_with_pos_weight():
    model = make_classifier(multi_label=True, pos_weight=[1.0, 2.0, 4.0])
    logits, targets = torch.randn(5, 3), (torch.rand(5, 3) > 0.5).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(model.loss(logits, targets), expected)
    unweighted = F.binary_cross_entropy_with_logits(logits, targets)
    assert not torch.allclose(model.loss(logits, targets), unweighted)
    assert "pos_weight" not in model.state_dict()  # rebuilt from hparams, not stored twice


def test_single_label_metrics_and_confusion_matrix():
    model = make_classifier()
    trainer = make_trainer()
    loader = single_label_loader()
    (results,) = trainer.validate(model, loader, verbose=False)
    assert {"val/loss", "val/acc", "val/f1_macro"} <= set(results)
    assert 0.0 <= results["val/acc"] <= 1.0
    # accuracy against an independent computation
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(1) for x, _ in loader])
    targets = torch.cat([y for _, y in loader])
    assert results["val/acc"] == pytest.approx((predictions == targets).float().mean().item(), abs=1e-6)
    confusion = model.last_val_confusion
    assert confusion.shape == (3, 3) and int(confusion.sum()) == len(targets)


def test_top5_accuracy_only_with_more_than_five_classes():
    assert "acc_top5" not in make_classifier(num_classes=5).train_metrics
    assert "acc_top5" in make_classifier(num_classes=6).train_metrics


def test_multi_label_metrics_and_training():
    model = make_classifier(multi_label=True, pos_weight=[1.0, 2.0, 0.5], lr=1e-2)
    trainer = make_trainer(2, limit_train_batches=2)
    trainer.fit(model, multi_label_loader())
    assert {"train/loss", "train/acc", "train/f1_macro", "train/auroc"} <= set(trainer.callback_metrics)
    (results,) = trainer.validate(model, multi_label_loader(), verbose=False)
    assert {"val/loss", "val/acc", "val/f1_macro", "val/auroc"} <= set(results)
    assert model.last_val_confusion is None


def test_predict_step_returns_probabilities_and_indices():
    for multi_label in (False, True):
        model = make_classifier(multi_label=multi_label).eval()
        images, index = torch.randn(4, 3, 32, 32), torch.arange(10, 14)
        with torch.no_grad():
            out = model.predict_step((images, index), 0)
        assert out["probs"].shape == (4, 3) and torch.equal(out["index"], index)
        assert ((out["probs"] >= 0) & (out["probs"] <= 1)).all()
        if not multi_label:
            torch.testing.assert_close(out["probs"].sum(1), torch.ones(4))


class _Penalty(Strategy):
    name = "penalty_test"

    def loss_terms(self, model, batch, outputs):
        return {"l2": 0.5 * outputs.logits.pow(2).mean()}


def test_strategy_loss_terms_are_added_and_logged(monkeypatch):
    model = make_classifier(strategies=[_Penalty()]).eval()  # eval: identical logits in both forward passes
    images, targets = next(iter(single_label_loader()))
    logged = {}
    monkeypatch.setattr(model, "log", lambda name, value, **kwargs: logged.__setitem__(name, value))
    monkeypatch.setattr(model, "log_dict", lambda *args, **kwargs: None)
    loss = model.training_step((images, targets), 0)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(loss, model.loss(logits, targets) + 0.5 * logits.pow(2).mean())
    torch.testing.assert_close(logged["train/penalty_test/l2"], 0.5 * logits.pow(2).mean())
    assert {"train/task_loss", "train/loss"} <= set(logged)

    trainer = make_trainer(1, limit_train_batches=1)
    trainer.fit(make_classifier(strategies=[_Penalty()]), single_label_loader())
    assert "train/penalty_test/l2" in trainer.callback_metrics


class _ViewsAndFeatures(Strategy):
    """Asks for two views and features, drops the task loss, and records what it was given."""

    name = "views_features_test"
    num_views = 2
    needs_features = True
    task_loss_weight = 0.0

    def __init__(self):
        self.seen = None
        self.calls = 0

    def loss_terms(self, model, batch, outputs):
        self.seen = outputs
        return {"feature_norm": outputs.features.pow(2).mean()}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_training_step_gives_strategies_views_features_and_indices(monkeypatch):
    strategy = _ViewsAndFeatures()
    model = make_classifier(strategies=[strategy]).eval()
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(model, "log_dict", lambda *args, **kwargs: None)
    images, targets = next(iter(single_label_loader()))
    two_views = torch.stack([images, images.flip(-1)], dim=1)  # (B, 2, C, H, W)
    indices = torch.arange(len(images)) + 100
    loss = model.training_step((two_views, targets, indices), 0)
    seen = strategy.seen
    assert seen.num_views == 2 and seen.batch_size == len(images)
    torch.testing.assert_close(seen.per_view(seen.images)[1], images.flip(-1))  # view-major rows
    assert torch.equal(seen.per_view(seen.targets)[0], targets) and torch.equal(seen.indices, indices)
    with torch.no_grad():
        pooled = model.backbone.forward_head(model.backbone.forward_features(seen.images), pre_logits=True)
        torch.testing.assert_close(seen.features, pooled)
        torch.testing.assert_close(seen.logits, model(seen.images))
    torch.testing.assert_close(loss, seen.features.pow(2).mean())  # task_loss_weight 0: the term alone


def test_strategy_state_travels_in_checkpoints(tmp_path):
    strategy = _ViewsAndFeatures()
    strategy.calls = 7
    model = make_classifier(strategies=[strategy])
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    fresh_strategy = _ViewsAndFeatures()
    make_classifier(strategies=[fresh_strategy]).on_load_checkpoint(checkpoint)
    assert fresh_strategy.calls == 7


# --------------------------------------------------------------------------- checkpoints
def _only_primitives(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _only_primitives(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_only_primitives(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


@pytest.mark.parametrize("backbone", ["test_vit", "test_resnet"])
def test_checkpoint_round_trip(tmp_path, backbone):
    model = make_classifier(
        backbone,
        num_classes=None,
        class_names=["ant", "bee", "cat"],
        strategies=[{"name": "freeze_layers", "num_groups": 1}, {"name": "layerwise_lr", "decay": 0.5}],
        lr=1e-2,
    )
    trainer = make_trainer(1, limit_train_batches=2)
    trainer.fit(model, single_label_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    raw = torch.load(path, weights_only=True, map_location="cpu")  # no pickled objects anywhere
    assert _only_primitives(dict(raw["hyper_parameters"]))
    assert raw["hyper_parameters"]["strategies"][0] == {
        "name": "freeze_layers",
        "num_groups": 1,
        "patterns": None,
        "train_bn": False,
    }

    loaded = ImageClassifier.from_checkpoint(path)
    assert loaded.class_names == ["ant", "bee", "cat"] and loaded.num_classes == 3
    assert loaded.strategy_stack.config() == model.strategy_stack.config()
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
    images = torch.randn(4, 3, 32, 32)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


# --------------------------------------------------------------------------- optimizer groups and schedule
def test_configure_optimizers_uses_named_groups_for_every_parameter():
    model = make_classifier("test_vit", strategies="linear_probe", weight_decay=0.05)
    trainer = fit_one_step(model)
    groups = trainer.optimizers[0].param_groups
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    assert all(name.split("/")[-1].split("@")[0] in {"decay", "no_decay"} for name in names)
    assert names[-2:] == ["head/decay", "head/no_decay"]
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in model.backbone.parameters())  # frozen ones too
    all_names = [n for g in groups for n in g["param_names"]]
    assert sorted(all_names) == sorted(f"backbone.{n}" for n, _ in model.backbone.named_parameters())


def test_no_weight_decay_on_norms_biases_and_tokens():
    model = make_classifier("test_vit", weight_decay=0.05)
    groups = fit_one_step(model).optimizers[0].param_groups
    exempt = {"backbone.cls_token", "backbone.pos_embed"}
    params = dict(model.named_parameters())
    for group in groups:
        for name in group["param_names"]:
            should_decay = params[name].ndim >= 2 and not name.endswith(".bias") and name not in exempt
            assert group["weight_decay"] == (0.05 if should_decay else 0.0), name


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_warmup_then_cosine_follows_warmup_cosine(optimizer):
    class LearningRates(pl.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    model = make_classifier(
        optimizer=optimizer, lr=0.1, warmup_epochs=1, min_lr_ratio=0.1, strategies=[{"name": "layerwise_lr"}]
    )
    recorder = LearningRates()
    trainer = make_trainer(3, [recorder])
    trainer.fit(model, single_label_loader(n=32))  # 4 steps per epoch: 4 warmup steps of 12
    scales = [g["lr_scale"] for g in trainer.optimizers[0].param_groups]
    assert len(recorder.lrs) == 12
    for step, lrs in enumerate(recorder.lrs):
        warmup = (step + 1) / 5
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 4) / 8))
        factor = warmup if step < 4 else cosine
        assert lrs == pytest.approx([0.1 * s * factor for s in scales]), f"step {step}"
        assert WarmupCosine(4, 12, 0.1)(step) == pytest.approx(factor)
    assert WarmupCosine(4, 12, 0.1)(12) == pytest.approx(0.1)
    if optimizer == "sgd":
        assert trainer.optimizers[0].param_groups[0]["nesterov"] is True


def test_warmup_cosine_validates_its_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(0, 0)
    assert WarmupCosine(0, 10)(0) == 1.0


# --------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_trains_and_matches_plain_gradients():
    plain = make_classifier("test_vit")
    checkpointed = make_classifier("test_vit", grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.backbone.grad_checkpointing
    images, targets = next(iter(single_label_loader()))
    for model in (plain, checkpointed):
        model.train()
        model.loss(model(images), targets).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)

    before = {n: p.detach().clone() for n, p in checkpointed.named_parameters()}
    checkpointed.zero_grad()
    trainer = make_trainer(2, limit_train_batches=2)
    trainer.fit(checkpointed, single_label_loader())
    assert all(not torch.equal(p, before[n]) for n, p in checkpointed.named_parameters() if n.endswith("weight"))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_metrics_stay_separate_when_first_batch_makes_states_equal():
    """A perfect first batch gives equal top-1 and top-5 states; later batches must not share them."""
    from sklearn.metrics import f1_score

    model = ImageClassifier("test_resnet", pretrained=False, num_classes=10)
    targets = torch.arange(10).repeat(3)
    perfect = torch.nn.functional.one_hot(targets, 10).float()
    always_zero = torch.full((30, 10), 0.01)
    always_zero[:, 0] = 0.5
    model.val_metrics.update(perfect, targets)
    model.val_metrics.update(always_zero, targets)
    result = model.val_metrics.compute()
    predicted = torch.cat([targets, torch.zeros(30, dtype=torch.long)])
    expected_f1 = f1_score(torch.cat([targets, targets]), predicted, average="macro")
    assert result["val/acc"] == pytest.approx(33 / 60)
    assert result["val/f1_macro"].item() == pytest.approx(expected_f1, abs=1e-6)
