"""Multi-task fine-tuning: task weighting, the task batch sampler, the data module and MultiTaskClassifier."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from quiet_trainer import make_trainer
from torch.utils.data import TensorDataset

from cvft.data.multitask import MultiTaskDataModule, TaskBatchSampler
from cvft.errors import CvftError, DatasetError
from cvft.tasks.multitask import MultiTaskClassifier, check_tasks
from cvft.tasks.task_weighting import FixedWeighting, UncertaintyWeighting, build_task_weighting

SIZE = 32
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
BANDS = 3
TASKS = {"colour": {"num_classes": 4}, "stripes": {"num_classes": BANDS, "multi_label": True}}


def scenes(n: int, seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with a background colour (4 classes) and fine stripes in any subset of the 3 channels (multi-label)."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, len(COLOURS), (n,), generator=generator)
    stripes = (torch.rand(n, BANDS, generator=generator) < 0.5).float()
    images = COLOURS[colour][:, :, None, None].repeat(1, 1, SIZE, SIZE)
    pattern = 1.5 * (torch.arange(SIZE) % 2 * 2 - 1).float()[:, None]  # alternating rows, mean 0
    images = images + stripes[:, :, None, None] * pattern
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images, colour, stripes


def task_datasets(n: int, seed: int) -> dict[str, TensorDataset]:
    """The colour task and the stripes task, on independent images of the same kind."""
    images, colour, _ = scenes(n, seed)
    other, _, stripes = scenes(n, seed + 1000)
    return {"colour": TensorDataset(images, colour), "stripes": TensorDataset(other, stripes)}


def model_for(strategies, **kwargs) -> MultiTaskClassifier:
    torch.manual_seed(0)
    options = dict(pretrained=False, strategies=strategies, lr=3e-3, warmup_epochs=0, weight_decay=0.05)
    options.update(kwargs)
    return MultiTaskClassifier(TASKS, "test_resnet", **options)


@torch.no_grad()
def task_losses(model: MultiTaskClassifier, data: dict[str, TensorDataset]) -> dict[str, float]:
    """Unweighted loss of each task on its whole dataset, in eval mode, written out with plain torch ops."""
    training = model.training
    model.eval()
    colour_images, colour = data["colour"].tensors
    stripe_images, stripes = data["stripes"].tensors
    losses = {
        "colour": float(F.cross_entropy(model(colour_images, "colour"), colour)),
        "stripes": float(F.binary_cross_entropy_with_logits(model(stripe_images, "stripes"), stripes)),
    }
    model.train(training)
    return losses


# ---------------------------------------------------------------------------------------------- weighting
def test_uncertainty_weighting_matches_hand_computed_loss_and_gradient():
    weighting = UncertaintyWeighting(["colour", "stripes"])
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.3, -0.5]))
    loss = torch.tensor(1.7)
    out = weighting("stripes", loss)
    # exp(-s) * L + s with s = -0.5: 1.7 * e^0.5 - 0.5
    assert out.item() == pytest.approx(1.7 * math.exp(0.5) - 0.5, rel=1e-6)
    out.backward()
    # d/ds = -exp(-s) * L + 1, only for the batch's task
    assert weighting.log_vars.grad.tolist() == pytest.approx([0.0, -1.7 * math.exp(0.5) + 1.0], rel=1e-6)
    assert weighting.weight("stripes") == pytest.approx(math.exp(0.5))


def test_uncertainty_weighting_reaches_log_of_the_loss():
    """For a fixed task loss L the learned s converges to log L (the minimiser of exp(-s) L + s)."""
    weighting = UncertaintyWeighting(["a"])
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.5)
    for _ in range(300):
        optimizer.zero_grad()
        weighting("a", torch.tensor(4.0)).backward()
        optimizer.step()
    assert weighting.log_vars.item() == pytest.approx(math.log(4.0), abs=1e-3)


def test_fixed_weights_scale_the_task_loss():
    weighting = FixedWeighting(["colour", "stripes"], {"stripes": 0.25})
    loss = torch.tensor(2.0)
    assert weighting("stripes", loss).item() == pytest.approx(0.5)
    assert weighting("colour", loss).item() == pytest.approx(2.0)  # left out: 1
    assert list(weighting.parameters()) == []


@pytest.mark.parametrize(
    ("weighting", "loss_weights", "message"),
    [
        ("nope", None, "Unknown weighting"),
        ("fixed", None, "needs loss_weights"),
        ("equal", {"a": 2.0}, "weighting='fixed'"),
        ("uncertainty", {"a": 2.0}, "leave loss_weights out"),
        (None, {"c": 1.0}, "unknown tasks ['c']"),
        (None, {"a": -1.0}, "finite number >= 0"),
    ],
)
def test_weighting_errors(weighting, loss_weights, message):
    with pytest.raises(CvftError, match=re.escape(message)):
        build_task_weighting(["a", "b"], weighting, loss_weights)


# ---------------------------------------------------------------------------------------------- task specs
@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({}, "non-empty dict"),
        ({"a": {"classes": 3}}, "unknown keys ['classes']"),
        ({"a": {"num_classes": 1}}, "integer >= 2"),
        ({"a": {"num_classes": 3, "multi_label": True, "label_smoothing": 0.1}}, "single-label tasks only"),
        ({"a.b": {"num_classes": 3}}, "not allowed"),
        ({"keys": {"num_classes": 3}}, "reserved"),
        ({"a": {"num_classes": 2, "class_names": ["x"]}}, "1 class_names for num_classes=2"),
    ],
)
def test_task_spec_errors(tasks, message):
    with pytest.raises(CvftError, match=re.escape(message)):
        check_tasks(tasks)


def test_calibrating_and_objective_strategies_are_refused():
    with pytest.raises(CvftError, match="parameter strategies only"):
        MultiTaskClassifier(
            TASKS, "test_resnet", pretrained=False, strategies=[{"name": "sparse", "criterion": "gradient"}]
        )


# ---------------------------------------------------------------------------------------------- sampler, data
def test_sampler_draws_tasks_with_the_given_ratios():
    sizes, ratios = [100, 300, 50], [0.2, 0.5, 0.3]
    sampler = TaskBatchSampler(sizes, batch_size=8, ratios=ratios, num_batches=6000, seed=3)
    offsets = [0, 100, 400, 450]
    counts = [0, 0, 0]
    for batch in sampler:
        task = next(t for t in range(3) if offsets[t] <= batch[0] < offsets[t + 1])
        assert all(offsets[task] <= i < offsets[task + 1] for i in batch), "a batch must hold one task"
        assert len(set(batch)) == len(batch) == 8
        counts[task] += 1
    frequencies = [c / 6000 for c in counts]
    assert frequencies == pytest.approx(ratios, abs=0.02)


def test_sampler_default_ratios_epoch_length_and_reproducibility():
    sampler = TaskBatchSampler([30, 90], batch_size=10, seed=1)
    assert sampler.ratios == pytest.approx([0.25, 0.75])
    assert len(sampler) == 3 + 9
    first = list(sampler)
    assert first == list(TaskBatchSampler([30, 90], batch_size=10, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != first
    # every sample of a task is seen once before any is repeated
    long = TaskBatchSampler([30, 90], batch_size=10, ratios=[1.0, 0.0], num_batches=3, seed=5)
    assert sorted(i for b in long for i in b) == list(range(30))


def test_datamodule_batches_and_val_loaders():
    train, val = task_datasets(40, 0), task_datasets(12, 7)
    data = MultiTaskDataModule(train, val=val, batch_size=8, ratios={"colour": 1, "stripes": 3}, seed=0)
    data.setup("fit")
    assert data.ratios == {"colour": 0.25, "stripes": 0.75}
    batches = list(data.train_dataloader())
    assert len(batches) == 5 + 5
    for batch in batches:
        assert batch["images"].shape == (8, 3, SIZE, SIZE)
        expected = (8,) if batch["task"] == "colour" else (8, BANDS)
        assert batch["targets"].shape == expected
    loaders = data.val_dataloader()
    assert [next(iter(loader))["task"] for loader in loaders] == ["colour", "stripes"]
    with pytest.raises(DatasetError, match="missing \\['stripes'\\]"):
        MultiTaskDataModule(train, ratios={"colour": 1.0})
    with pytest.raises(DatasetError, match="unknown tasks"):
        MultiTaskDataModule(train, val={"shape": val["colour"]})


# ---------------------------------------------------------------------------------------------- the module
def test_per_task_metrics_are_logged(tmp_path):
    model = model_for(["linear_probe"], weighting="uncertainty")
    data = MultiTaskDataModule(task_datasets(32, 0), val=task_datasets(16, 1), batch_size=8)
    run = make_trainer(1, default_root_dir=tmp_path, limit_train_batches=4)
    run.fit(model, data)
    logged = set(run.callback_metrics)
    for key in ["val/colour/acc", "val/colour/f1_macro", "val/stripes/acc", "val/stripes/auroc", "val/loss"]:
        assert key in logged, key
    assert {"val/colour/loss", "val/stripes/loss", "train/loss"} <= logged
    assert not any("dataloader_idx" in key for key in logged)
    mean = (run.callback_metrics["val/colour/loss"] + run.callback_metrics["val/stripes/loss"]) / 2
    assert float(run.callback_metrics["val/loss"]) == pytest.approx(float(mean), rel=1e-5)
    run.test(model, MultiTaskDataModule(task_datasets(8, 2), test=task_datasets(8, 3), batch_size=8))
    assert {"test/colour/acc", "test/stripes/auroc", "test/loss"} <= set(run.callback_metrics)


def test_optimizer_groups_hold_heads_and_uncertainty_without_decay():
    model = model_for(["linear_probe"], weighting="uncertainty", head_lr_scale=10.0)
    groups = {g["name"]: g for g in model.param_groups()}
    assert groups["heads/decay"]["param_names"] == ["heads.colour.weight", "heads.stripes.weight"]
    assert groups["heads/no_decay"]["param_names"] == ["heads.colour.bias", "heads.stripes.bias", "weighting.log_vars"]
    assert groups["heads/no_decay"]["weight_decay"] == 0.0
    assert groups["heads/decay"]["lr"] == pytest.approx(10 * 3e-3)
    held = {id(p) for g in groups.values() for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}, "every parameter has exactly one group"


def lora_names(model: MultiTaskClassifier) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize(
    "strategies",
    [["linear_probe"], [{"name": "lora", "rank": 4, "alpha": 4, "targets": "resnet_blocks", "bn": "frozen"}]],
    ids=["linear_probe", "lora"],
)
def test_two_tasks_train_on_a_shared_backbone(strategies, tmp_path):
    model = model_for(strategies, weighting="uncertainty", lr=0.1)
    heads = {f"heads.{t}.{p}" for t in TASKS for p in ("weight", "bias")}
    expected = heads | {"weighting.log_vars"}
    if strategies != ["linear_probe"]:
        expected |= lora_names(model)
        assert len(lora_names(model)) > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert not any(n.startswith("backbone.fc.") for n, _ in model.named_parameters()), "placeholder head removed"

    train = task_datasets(64, 0)
    before = task_losses(model, train)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.backbone.named_buffers()}
    data = MultiTaskDataModule(train, batch_size=16, seed=0)
    run = make_trainer(4, default_root_dir=tmp_path, enable_checkpointing=False)
    run.fit(model, data)
    after = task_losses(model, train)
    for task in TASKS:
        assert after[task] < 0.85 * before[task], (task, before, after)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} is frozen but changed"
    for name, buffer in model.backbone.named_buffers():
        assert torch.equal(buffer, buffers[name]), f"BatchNorm buffer {name} moved under a frozen backbone"
    assert not torch.equal(model.weighting.log_vars.detach(), torch.zeros(2)), "uncertainty parameters train"

    path = tmp_path / "multitask.ckpt"
    run.save_checkpoint(path)
    loaded = MultiTaskClassifier.from_checkpoint(path)
    assert loaded.hparams.tasks == model.hparams.tasks
    assert torch.equal(loaded.weighting.log_vars, model.weighting.log_vars)
    images = train["colour"].tensors[0][:4]
    model.eval(), loaded.eval()
    with torch.no_grad():
        for task, logits in model(images).items():
            assert torch.equal(loaded(images, task), logits)


def test_example_script_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "multitask" / "train_multitask.py"
    spec = importlib.util.spec_from_file_location("train_multitask_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(["--epochs", "1", "--train-size", "64", "--output", str(tmp_path)])
    assert {"val/colour/acc", "val/stripes/auroc", "val/loss", "weight/colour"} <= set(metrics)
    assert '"val/stripes/auroc"' in capsys.readouterr().out


def test_layerwise_lr_decays_from_the_heads_down():
    model = MultiTaskClassifier(
        TASKS, "test_resnet", pretrained=False, strategies=[{"name": "layerwise_lr", "decay": 0.5}]
    )
    scales = {g["name"]: g["lr_scale"] for g in model.param_groups()}
    # test_resnet: stem, layer1..layer4 below the heads; the top body group gets one factor of decay
    assert scales["heads/decay"] == 1.0
    assert scales["layer4.0/decay@0.5"] == 0.5
    assert scales["conv1+bn1/decay@0.03125"] == 0.5**5
