"""Teacher-student distillation: the losses against hand computations, teacher loading and freezing, the cache,
composition with parameter strategies, and distillation beating the student trained alone on held-out data."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
from strategy_testkit import LossRecorder, make_backbone, make_trainer, toy_task  # noqa: E402

from cvft.errors import StrategyError  # noqa: E402
from cvft.strategies import StrategyStack, apply_strategies, build_strategy  # noqa: E402
from cvft.strategies.aux import get_aux_module  # noqa: E402
from cvft.strategies.distillation import (  # noqa: E402
    PROJECTION_NAME,
    Distillation,
    feature_distillation_loss,
    kd_loss,
)
from cvft.strategies.outputs import StepOutputs  # noqa: E402
from cvft.tasks import ImageClassifier  # noqa: E402
from cvft.tasks.teachers import load_teacher, teacher_kind  # noqa: E402

CLASSES = 4


def _save_weights(model: nn.Module, path: Path) -> str:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture
def teacher_file(tmp_path) -> str:
    """A test_resnet with 4 classes, its running statistics made non-trivial, saved as safetensors."""
    model = make_backbone("test_resnet", seed=7)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))  # BatchNorm statistics away from their defaults
    return _save_weights(model, tmp_path / "teacher.safetensors")


def _quiet_classifier(**kwargs) -> ImageClassifier:
    kwargs = {"backbone": "test_resnet", "pretrained": False, "num_classes": CLASSES, "warmup_epochs": 0, **kwargs}
    return ImageClassifier(**kwargs)


# ---------------------------------------------------------------------------------------------------- losses
def test_kd_loss_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    t = 2.0
    p_teacher = torch.exp(teacher / t) / torch.exp(teacher / t).sum(dim=1, keepdim=True)
    p_student = torch.exp(student / t) / torch.exp(student / t).sum(dim=1, keepdim=True)
    per_row = (p_teacher * (torch.log(p_teacher) - torch.log(p_student))).sum(dim=1)
    expected = per_row.sum() / 2 * t * t  # batch mean of the KL, times T^2
    assert torch.allclose(kd_loss(student, teacher, temperature=t), expected, atol=1e-6)
    assert float(expected) > 0
    # the gradient reaches the student only
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher, temperature=t).backward()
    assert student.grad is not None and teacher.grad is None


def test_kd_loss_refuses_mismatched_logits():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_feature_loss_with_projection_matches_manual():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5), torch.randn(3, 7)
    projection = nn.Linear(5, 7)
    projected = student @ projection.weight.T + projection.bias
    expected = ((projected - teacher) ** 2).sum() / (3 * 7)
    assert torch.allclose(feature_distillation_loss(student, teacher, projection), expected, atol=1e-6)
    with pytest.raises(ValueError, match="projection"):
        feature_distillation_loss(student, teacher)


# ---------------------------------------------------------------------------------------------------- arguments
def test_weights_and_flags_follow_the_arguments():
    kd = Distillation("test_resnet", alpha=0.3)
    assert kd.task_loss_weight == pytest.approx(0.7)
    assert "task_loss_weight" not in vars(kd)
    assert not kd.needs_features and not kd.needs_indices
    both = Distillation("test_resnet", feature_weight=2.0, cache_logits=True)
    assert both.needs_features and both.needs_indices
    assert StrategyStack([both]).needs_features
    assert build_strategy({"name": "distillation", "teacher": "test_vit"}).objective
    config = kd.config()
    assert set(config) == {
        "teacher",
        "teacher_weights",
        "teacher_pretrained",
        "temperature",
        "alpha",
        "feature_weight",
        "cache_logits",
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher": ""}, "needs a teacher"),
        ({"temperature": 0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"feature_weight": -1}, "feature_weight"),
        ({"alpha": 0.0}, "distils nothing"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(StrategyError, match=match):
        Distillation(**{"teacher": "test_resnet", **kwargs})


# ---------------------------------------------------------------------------------------------------- teachers
def test_teacher_from_timm_name_with_weights_file(teacher_file):
    teacher = load_teacher("test_resnet", weights=teacher_file)
    reference = make_backbone("test_resnet", seed=7)
    reference.load_state_dict(load_file(teacher_file))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(x), reference.eval()(x))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_from_timm_name_without_weights_is_refused():
    with pytest.raises(StrategyError, match="random weights"):
        load_teacher("test_resnet", pretrained=False)


def test_teacher_file_kinds_are_detected(tmp_path, teacher_file):
    assert teacher_kind("test_vit") == "timm"
    with pytest.raises(StrategyError, match="does not exist"):
        teacher_kind(str(tmp_path / "missing.ckpt"))
    with pytest.raises(StrategyError, match="teacher_weights"):
        teacher_kind(teacher_file)  # plain weights, not an adapter


def test_teacher_from_cvft_checkpoint(tmp_path):
    images, targets = toy_task(16, seed=0)
    classifier = _quiet_classifier(lr=1e-2)
    trainer = make_trainer(1, limit_train_batches=2)
    trainer.fit(classifier, DataLoader(TensorDataset(images, targets), batch_size=8))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    assert teacher_kind(str(path)) == "checkpoint"
    teacher = Distillation(str(path)).teacher_model
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(teacher(x), classifier.backbone.eval()(x), atol=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(StrategyError, match="holds every weight"):
        load_teacher(str(path), weights="anything.safetensors")


def test_teacher_from_adapter_file(tmp_path, teacher_file):
    classifier = _quiet_classifier(weights=teacher_file, strategies="linear_probe")
    with torch.no_grad():
        classifier.backbone.fc.weight.mul_(3.0)  # the adapter holds a head that differs from the base weights
    adapter = classifier.save_adapter(tmp_path / "adapter.safetensors")
    assert teacher_kind(str(adapter)) == "adapter"
    teacher = load_teacher(str(adapter), weights=teacher_file)
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(teacher(x), classifier.backbone.eval()(x), atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_given_as_a_loaded_module(teacher_file):
    module = make_backbone("test_resnet")
    module.load_state_dict(load_file(teacher_file))
    strategy = Distillation(module, feature_weight=1.0)
    strategy.setup(make_backbone("test_vit"))
    assert strategy.teacher_model is module
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert strategy.config()["teacher"] == "module:ResNet"  # primitives only: checkpoints stay weights_only
    with pytest.raises(StrategyError, match="pass the module again"):
        Distillation(**strategy.config()).setup(make_backbone("test_vit"))


def test_class_count_mismatch_is_a_clear_error(tmp_path):
    five = _save_weights(make_backbone("test_resnet", num_classes=5), tmp_path / "five.safetensors")
    student = make_backbone("test_resnet")
    strategy = Distillation("test_resnet", teacher_weights=five)
    strategy.setup(student)
    images = torch.randn(2, 3, 32, 32)
    outputs = StepOutputs(logits=student(images), images=images)
    with pytest.raises(StrategyError, match="5 classes but the student 4"):
        strategy.loss_terms(student, None, outputs)
    with pytest.raises(StrategyError, match="5 classes"):  # loaded at setup when features are distilled
        Distillation("test_resnet", teacher_weights=five, feature_weight=1.0).setup(make_backbone("test_resnet"))
    # features only: any head will do
    Distillation("test_resnet", teacher_weights=five, alpha=0.0, feature_weight=1.0).setup(student)


# ---------------------------------------------------------------------------------------------------- loss terms
def test_loss_terms_match_the_losses_on_every_view(teacher_file):
    torch.manual_seed(0)
    student = make_backbone("test_vit")
    strategy = Distillation("test_resnet", teacher_weights=teacher_file, temperature=3.0, alpha=0.4, feature_weight=2)
    strategy.setup(student)  # ViT student (width 64), ResNet teacher (width 96)
    projection = get_aux_module(student, PROJECTION_NAME)
    assert (projection.in_features, projection.out_features) == (64, 96)
    images = torch.randn(6, 3, 32, 32)  # 2 views of 3 images, view-major
    features = student.forward_head(student.forward_features(images), pre_logits=True)
    logits = student.get_classifier()(features)
    outputs = StepOutputs(logits, images, torch.zeros(6, dtype=torch.long), features, num_views=2)
    terms = strategy.loss_terms(student, None, outputs)
    teacher = strategy.teacher_model
    with torch.no_grad():
        teacher_features = teacher.forward_head(teacher.forward_features(images), pre_logits=True)
        teacher_logits = teacher(images)
    assert torch.allclose(terms["kd"], 0.4 * kd_loss(logits, teacher_logits, 3.0), atol=1e-6)
    expected_feature = F.mse_loss(projection(features), teacher_features)
    assert torch.allclose(terms["feature"], 2.0 * expected_feature, atol=1e-6)
    sum(terms.values()).backward()
    assert projection.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_is_kept_in_eval_mode_if_someone_trains_it(teacher_file):
    student = make_backbone("test_resnet")
    strategy = Distillation("test_resnet", teacher_weights=teacher_file)
    strategy.setup(student)
    teacher = strategy.teacher_model
    stats = teacher.bn1.running_mean.clone()
    teacher.train()
    images = torch.randn(4, 3, 32, 32)
    strategy.loss_terms(student, None, StepOutputs(student(images), images))
    assert not teacher.training
    assert torch.equal(teacher.bn1.running_mean, stats)


def test_composes_with_lora(teacher_file):
    student = make_backbone("test_vit")
    stack = apply_strategies(
        student,
        ["lora", {"name": "distillation", "teacher": "test_resnet", "teacher_weights": teacher_file,
                  "feature_weight": 1.0}],
    )  # fmt: skip
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert {f"cvft_aux.{PROJECTION_NAME}.weight", f"cvft_aux.{PROJECTION_NAME}.bias"} <= trainable
    assert any("lora" in n for n in trainable) and "head.weight" in trainable
    assert "blocks.0.attn.qkv.weight" not in trainable
    assert stack.needs_features and stack.task_loss_weight == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------- fit
def _indexed_loader(n: int = 32, batch_size: int = 8, shuffle: bool = True, seed: int = 0) -> DataLoader:
    images, targets = toy_task(n, seed=seed)
    return DataLoader(
        TensorDataset(images, targets, torch.arange(n)),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
    )


def test_teacher_stays_frozen_outside_the_student_through_fit(tmp_path, teacher_file):
    spec = {"name": "distillation", "teacher": "test_resnet", "teacher_weights": teacher_file, "feature_weight": 1.0}
    model = _quiet_classifier(strategies=["linear_probe", spec], lr=1e-2)
    strategy = model.strategy_stack.strategies[-1]
    teacher = strategy.teacher_model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = make_trainer(2, limit_train_batches=2)
    trainer.fit(model, _indexed_loader())

    assert not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "teacher weights or BN changed"
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not teacher_ids & optimised
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert all(m is not teacher for m in model.modules())
    projection = get_aux_module(model.backbone, PROJECTION_NAME)
    assert {id(p) for p in projection.parameters()} <= optimised

    # the student's checkpoint holds no teacher weights, and reloads
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    student_keys = {f"backbone.{k}" for k in model.backbone.state_dict()}
    assert {k for k in state if k.startswith("backbone.")} == student_keys
    assert len(student_keys) == len(make_backbone("test_resnet").state_dict()) + 2  # + projection
    reloaded = ImageClassifier.from_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded.eval()(x), model.eval()(x), atol=1e-6)


def test_logit_student_reloads_without_its_teacher(tmp_path, teacher_file):
    spec = {"name": "distillation", "teacher": "test_resnet", "teacher_weights": teacher_file}
    model = _quiet_classifier(strategies=[spec])
    trainer = make_trainer(1, limit_train_batches=1)
    trainer.fit(model, _indexed_loader())
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    Path(teacher_file).unlink()  # the teacher is gone: inference and export must not need it
    reloaded = ImageClassifier.from_checkpoint(tmp_path / "student.ckpt")
    assert reloaded.eval()(torch.randn(1, 3, 32, 32)).shape == (1, CLASSES)


class _TeacherRows:
    """Counts the images the teacher sees (at its stem, whichever forward method ran)."""

    def __init__(self, teacher: nn.Module) -> None:
        self.rows = 0
        teacher.conv1.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        self.rows += inputs[0].shape[0]


def _cached_fit(teacher_file: str, cache: bool) -> tuple[list[float], int, Distillation]:
    pl.seed_everything(0)
    spec = {"name": "distillation", "teacher": "test_resnet", "teacher_weights": teacher_file, "cache_logits": cache}
    model = _quiet_classifier(strategies=[spec], lr=1e-2)
    strategy = model.strategy_stack.strategies[0]
    counter = _TeacherRows(strategy.teacher_model)
    recorder = LossRecorder()
    make_trainer(2, callbacks=[recorder]).fit(model, _indexed_loader(n=32, batch_size=8))
    return recorder.losses, counter.rows, strategy


def test_cache_runs_the_teacher_once_per_sample_and_gives_the_same_loss(teacher_file):
    cached_losses, cached_rows, strategy = _cached_fit(teacher_file, cache=True)
    plain_losses, plain_rows, _ = _cached_fit(teacher_file, cache=False)
    assert cached_rows == 32 and plain_rows == 64  # 32 samples, two epochs
    assert len(strategy._cache) == 32
    assert strategy.state_dict() == {}  # the cache never goes into checkpoints
    assert len(cached_losses) == len(plain_losses) == 8
    assert torch.allclose(torch.tensor(cached_losses), torch.tensor(plain_losses), atol=1e-5)


def test_cache_serves_every_view_and_fills_only_missing_samples(teacher_file):
    student = make_backbone("test_resnet")
    strategy = Distillation("test_resnet", teacher_weights=teacher_file, cache_logits=True, feature_weight=1.0)
    strategy.setup(student)
    counter = _TeacherRows(strategy.teacher_model)
    images = torch.randn(6, 3, 32, 32)  # 2 views x 3 images
    logits = torch.zeros(6, CLASSES)
    first = StepOutputs(logits, images, num_views=2, indices=torch.tensor([4, 9, 2]))
    cached = strategy._teacher_outputs(first)
    assert counter.rows == 6
    with torch.no_grad():
        direct = strategy.teacher_model(images)
    assert torch.allclose(cached[0], direct, atol=1e-6)
    counter.rows = 0
    # a batch with one new sample (7) and one seen (9): only the new one's two views go through the teacher
    views = images.view(2, 3, 3, 32, 32)
    second_images = torch.stack([views[:, 1], torch.randn(2, 3, 32, 32)], dim=1).flatten(0, 1)
    second = StepOutputs(torch.zeros(4, CLASSES), second_images, num_views=2, indices=torch.tensor([9, 7]))
    logits2, features2 = strategy._teacher_outputs(second)
    assert counter.rows == 2
    with torch.no_grad():
        assert torch.allclose(logits2, strategy.teacher_model(second_images), atol=1e-6)
    assert features2.shape == (4, 96)


def test_cache_without_indices_warns_once_and_runs_the_teacher(teacher_file):
    student = make_backbone("test_resnet")
    strategy = Distillation("test_resnet", teacher_weights=teacher_file, cache_logits=True)
    strategy.setup(student)
    images = torch.randn(2, 3, 32, 32)
    outputs = StepOutputs(student(images), images)
    with pytest.warns(UserWarning, match="no dataset indices"):
        strategy.loss_terms(student, None, outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.loss_terms(student, None, outputs)
    assert strategy._cache == {}


# ---------------------------------------------------------------------------------------------------- the point
def _held_out_accuracy(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(-1) == targets).float().mean())


@pytest.mark.slow
def test_distillation_beats_the_student_trained_alone(tmp_path):
    """A small, partly mislabelled training set: alone, the student learns the wrong labels; distilled from a teacher
    trained on plenty of clean data, it follows the teacher. Same student, data, seeds and steps in both runs."""
    noise = 6.0
    teacher_images, teacher_targets = toy_task(256, seed=1, noise=noise)
    images, targets = toy_task(24, seed=2, noise=noise)
    wrong = torch.arange(6)
    targets = targets.clone()
    targets[wrong] = (targets[wrong] + 1 + wrong % 3) % CLASSES  # a quarter of the 24 labels are wrong
    held_out = toy_task(512, seed=3, noise=noise)

    pl.seed_everything(0)
    teacher = _quiet_classifier(lr=3e-3, weight_decay=0.0)
    teacher_loader = DataLoader(TensorDataset(teacher_images, teacher_targets), batch_size=32, shuffle=True)
    make_trainer(3).fit(teacher, teacher_loader)
    assert _held_out_accuracy(teacher, *held_out) > 0.95
    weights = _save_weights(teacher.backbone, tmp_path / "teacher.safetensors")

    def student_accuracy(strategies, seed: int) -> float:
        pl.seed_everything(seed)
        student = _quiet_classifier(lr=3e-3, weight_decay=0.0, strategies=strategies)
        loader = DataLoader(TensorDataset(images, targets), batch_size=8, shuffle=True)
        make_trainer(10).fit(student, loader)
        return _held_out_accuracy(student, *held_out)

    kd = {"name": "distillation", "teacher": "test_resnet", "teacher_weights": weights, "alpha": 0.9}
    alone = [student_accuracy(None, seed) for seed in (0, 1)]
    distilled = [student_accuracy([kd], seed) for seed in (0, 1)]
    assert sum(distilled) / 2 > sum(alone) / 2 + 0.1, (alone, distilled)
    assert min(distilled) > max(alone)
