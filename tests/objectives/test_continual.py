"""Continual fine-tuning: L2-SP, EWC and LwF against hand-written formulas, and forgetting on a task sequence."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cvft.continual import ContinualResult, run_continual
from cvft.errors import StrategyError
from cvft.strategies import build_strategy
from cvft.strategies.continual import EWC, L2SP, LwF, MultiHeadNet, diagonal_fisher
from cvft.strategies.outputs import StepOutputs

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and faster on a shared machine
    yield
    torch.set_num_threads(threads)


def _outputs(logits: torch.Tensor, images: torch.Tensor, features: torch.Tensor | None = None) -> StepOutputs:
    return StepOutputs(logits=logits, images=images, features=features)


def _perturb(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


# ----------------------------------------------------------------------------------------------------- L2-SP
def test_l2sp_penalty_is_alpha_half_squared_distance_to_start_plus_head_decay():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    l2sp = L2SP(alpha=0.3, beta=0.2)
    l2sp.setup(model)
    _perturb(model)
    terms = l2sp.loss_terms(model, None, _outputs(torch.zeros(1, 3), torch.zeros(1, 3, SIZE, SIZE)))

    params = dict(model.named_parameters())
    body = sum(((params[n] - start[n]) ** 2).sum() for n in params if not n.startswith("fc."))
    head = (params["fc.weight"] ** 2).sum() + (params["fc.bias"] ** 2).sum()
    assert torch.allclose(terms["l2sp"], 0.3 / 2 * body, rtol=1e-5)
    assert torch.allclose(terms["head_decay"], 0.2 / 2 * head, rtol=1e-5)


def test_l2sp_skips_frozen_parameters_and_anchors_late_unfrozen_ones_at_their_start():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("fc.", "layer4.")))
    l2sp = L2SP(alpha=1.0)
    l2sp.setup(model)
    assert all(n.startswith("layer4.") for n in l2sp.state_dict()["anchor"])
    outputs = _outputs(torch.zeros(1, 3), torch.zeros(1, 3, SIZE, SIZE))
    model.layer3[0].conv1.weight.requires_grad_(True)  # unfrozen later, not yet moved
    assert float(l2sp.loss_terms(model, None, outputs)["l2sp"].detach()) == 0.0
    with torch.no_grad():
        model.layer3[0].conv1.weight.add_(1.0)
        model.conv1[0].weight.add_(5.0)  # frozen: no penalty
    expected = 0.5 * model.layer3[0].conv1.weight.numel()
    assert math.isclose(float(l2sp.loss_terms(model, None, outputs)["l2sp"]), expected, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------------- EWC
def _linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    images, labels = torch.randn(10, 3), torch.randint(0, 4, (10,))
    return model, [(images[:5], labels[:5]), (images[5:], labels[5:])], images, labels


def _manual_fisher(model: nn.Linear, images, choose):
    """Per-sample squared gradients of -log softmax for a linear model: dW = (p - e_y) x^T, db = p - e_y."""
    fw, fb = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    with torch.no_grad():
        for i, x in enumerate(images):
            p = torch.softmax(model.weight @ x + model.bias, -1)
            for y, weight in choose(i, p):
                residual = p - F.one_hot(torch.tensor(y), 4).float()
                fw += weight * torch.outer(residual, x) ** 2
                fb += weight * residual**2
    return fw / len(images), fb / len(images)


def test_fisher_expected_and_empirical_match_closed_form_on_linear_softmax():
    model, batches, images, labels = _linear_problem()
    expected = diagonal_fisher(model, batches, ["weight", "bias"], kind="expected")
    fw, fb = _manual_fisher(model, images, lambda i, p: [(c, float(p[c])) for c in range(4)])
    assert torch.allclose(expected["weight"], fw, atol=1e-6) and torch.allclose(expected["bias"], fb, atol=1e-6)
    empirical = diagonal_fisher(model, batches, ["weight", "bias"], kind="empirical")
    fw, fb = _manual_fisher(model, images, lambda i, p: [(int(labels[i]), 1.0)])
    assert torch.allclose(empirical["weight"], fw, atol=1e-6) and torch.allclose(empirical["bias"], fb, atol=1e-6)
    assert model.weight.grad is None, "the Fisher pass must not leave gradients behind"


def test_fisher_sampled_draws_labels_from_the_model_and_respects_max_batches():
    model, batches, images, _ = _linear_problem()
    sampled = diagonal_fisher(model, batches, ["weight"], kind="sampled", generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    draws = []
    with torch.no_grad():
        for x in images:
            p = torch.softmax(model.weight @ x + model.bias, -1)
            draws.append(int(torch.multinomial(p[None], 1, generator=generator)[0]))
    fw, _ = _manual_fisher(model, images, lambda i, p: [(draws[i], 1.0)])
    assert torch.allclose(sampled["weight"], fw, atol=1e-6)
    first = diagonal_fisher(model, batches, ["weight"], kind="expected", max_batches=1)
    fw, _ = _manual_fisher(model, images[:5], lambda i, p: [(c, float(p[c])) for c in range(4)])
    assert torch.allclose(first["weight"], fw, atol=1e-6)


def test_ewc_penalty_is_half_lambda_fisher_weighted_distance_and_accumulates():
    model, batches, images, labels = _linear_problem()
    ewc = EWC(lam=7.0, fisher="empirical", gamma=0.5)
    outputs = _outputs(torch.zeros(1, 4), images[:1])
    assert float(ewc.loss_terms(model, None, outputs)["ewc"]) == 0.0, "no penalty before the first consolidation"
    ewc.consolidate(model, batches, F.cross_entropy)
    f1w, f1b = _manual_fisher(model, images, lambda i, p: [(int(labels[i]), 1.0)])
    anchor_w, anchor_b = model.weight.detach().clone(), model.bias.detach().clone()
    _perturb(model, scale=0.3)
    expected = 7.0 / 2 * ((f1w * (model.weight - anchor_w) ** 2).sum() + (f1b * (model.bias - anchor_b) ** 2).sum())
    assert torch.allclose(ewc.loss_terms(model, None, outputs)["ewc"], expected, rtol=1e-5)

    ewc.consolidate(model, batches, F.cross_entropy)  # second task: F <- gamma * F + F_2, anchor <- current
    f2w, _ = _manual_fisher(model, images, lambda i, p: [(int(labels[i]), 1.0)])
    assert torch.allclose(ewc.state_dict()["fisher"]["weight"], 0.5 * f1w + f2w, atol=1e-6)
    assert float(ewc.loss_terms(model, None, outputs)["ewc"]) == 0.0


# ----------------------------------------------------------------------------------------------------- LwF
def _multi_head(seed: int = 0, heads=(3, 4, 2)) -> MultiHeadNet:
    torch.manual_seed(seed)
    return MultiHeadNet(timm.create_model("test_resnet", num_classes=0), list(heads))


def test_lwf_distils_every_old_head_against_the_recorded_model_with_temperature_two():
    net = _multi_head().eval()
    lwf = LwF(lam=0.7)
    lwf.setup(net)
    net.active_task = 2
    lwf.begin_task(net, 2)
    teacher = lwf._teacher
    assert teacher is not None and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(m is not teacher for m in net.modules()), "the recorded model must not be a sub-module"
    with torch.no_grad():
        recorded = {k: v.clone() for k, v in net.state_dict().items()}
    _perturb(net, scale=0.05)

    images = torch.randn(5, 3, SIZE, SIZE)
    features = net.forward_features(images)
    terms = lwf.loss_terms(net, None, _outputs(net.heads[2](features), images, features))

    old_net = _multi_head()
    old_net.load_state_dict(recorded)
    old_net.eval()
    expected = 0.0
    with torch.no_grad():
        old_features = old_net.forward_features(images)
        for k in (0, 1):
            t = torch.softmax(old_net.heads[k](old_features) / 2.0, -1)
            s = torch.log_softmax(net.heads[k](features) / 2.0, -1)
            expected += (t * (torch.log(t) - s)).sum(1).mean()
    assert torch.allclose(terms["distill"].detach(), 0.7 * expected, rtol=1e-4, atol=1e-7)
    terms["distill"].backward()
    assert net.heads[0].weight.grad is not None and net.heads[2].weight.grad is None
    assert lwf.loss_terms(net, None, _outputs(torch.zeros(1, 2), images)) is not None


def test_lwf_before_any_old_task_adds_nothing_and_single_head_distils_the_start_model():
    net = _multi_head()
    lwf = LwF()
    lwf.setup(net)
    lwf.begin_task(net, 0)
    images = torch.randn(2, 3, SIZE, SIZE)
    assert lwf.loss_terms(net, None, _outputs(net(images), images)) == {}

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    single = LwF(lam=1.0, temperature=2.0)
    single.setup(model)
    start = model(images).detach()
    _perturb(model, scale=0.05)
    logits = model(images)
    t = torch.softmax(start / 2, -1)
    expected = (t * (t.log() - torch.log_softmax(logits / 2, -1))).sum(1).mean()
    assert torch.allclose(single.loss_terms(model, None, _outputs(logits, images))["distill"], expected, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------- state
def test_state_dicts_round_trip_through_a_weights_only_checkpoint(tmp_path):
    net = _multi_head().eval()
    loader = [(torch.randn(4, 3, SIZE, SIZE), torch.randint(0, 3, (4,)))]
    l2sp, ewc, lwf = L2SP(alpha=1.0), EWC(fisher_batches=1), LwF()
    for strategy in (l2sp, ewc, lwf):
        strategy.setup(net)
    ewc.consolidate(net, loader, F.cross_entropy)
    net.active_task = 1
    lwf.begin_task(net, 1)
    path = tmp_path / "state.pt"
    torch.save({s.name: s.state_dict() for s in (l2sp, ewc, lwf)}, path)
    _perturb(net, scale=0.05)
    images = torch.randn(3, 3, SIZE, SIZE)
    features = net.forward_features(images)
    outputs = _outputs(net(images), images, features)
    before = {s.name: s.loss_terms(net, None, outputs) for s in (l2sp, ewc, lwf)}

    state = torch.load(path, weights_only=True)
    restored = [L2SP(alpha=1.0), EWC(fisher_batches=1), LwF()]
    for strategy in restored:
        strategy.load_state_dict(state[strategy.name])
        for key, value in strategy.loss_terms(net, None, outputs).items():
            assert torch.equal(value, before[strategy.name][key]), (strategy.name, key)


def test_arguments_are_validated_with_clear_messages():
    with pytest.raises(StrategyError, match="alpha must be >= 0"):
        L2SP(alpha=-1)
    with pytest.raises(StrategyError, match="'sampled', 'expected' or 'empirical'"):
        EWC(fisher="true")
    with pytest.raises(StrategyError, match="gamma"):
        EWC(gamma=2.0)
    with pytest.raises(StrategyError, match="temperature"):
        LwF(temperature=0)
    with pytest.raises(StrategyError, match="not a continual objective"):
        run_continual("test_resnet", [("A", [], [], 2)], method="linear_probe")
    assert build_strategy("ewc").objective and build_strategy("lwf").objective and build_strategy("l2sp").objective


# ----------------------------------------------------------------------------------------------------- report
def test_result_measures_follow_their_definitions(tmp_path):
    nan = float("nan")
    r = [[0.9, nan, nan], [0.7, 0.8, nan], [0.5, 0.85, 0.6]]
    result = ContinualResult("x", ["A", "B", "C"], r)
    assert result.average_accuracy == pytest.approx((0.5 + 0.85 + 0.6) / 3)
    assert result.forgetting == pytest.approx([0.9 - 0.5, 0.8 - 0.85])  # max over k < T of R[k][j] - R[T][j]
    assert result.bwt == pytest.approx(((0.5 - 0.9) + (0.85 - 0.8)) / 2)  # Lopez-Paz & Ranzato
    assert "avg forgetting" in result.table()
    rows = result.to_csv(tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "after_task,A,B,C" and rows[1].startswith("A,0.9") and rows[4].startswith("forgetting,0.4")


# ----------------------------------------------------------------------------------------------------- sequences
_COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])


def _cue_images(n: int, seed: int):
    """Images carrying three independent cues: a colour, a bright horizontal band and a dark vertical band."""
    generator = torch.Generator().manual_seed(seed)
    colour, row, column = (torch.randint(0, 4, (n,), generator=generator) for _ in range(3))
    images = 0.6 * _COLOURS[colour][:, :, None, None].repeat(1, 1, SIZE, SIZE)
    for k in range(4):
        band = slice(k * SIZE // 4, (k + 1) * SIZE // 4)
        images[row == k, :, band, :] += 1.5
        images[column == k, :, :, band] -= 1.5
    return images + 0.3 * torch.randn(images.shape, generator=generator), (colour, row, column)


def conflicting_tasks(n: int = 128, batch_size: int = 32):
    """Tasks A, B, C on the same images, each labelled by another cue: learning one cue overwrites the features of
    the previous one, so plain sequential fine-tuning forgets."""
    train_images, train_labels = _cue_images(n, 1)
    val_images, val_labels = _cue_images(128, 100)
    return [
        (
            name,
            DataLoader(
                TensorDataset(train_images, train_labels[i]),
                batch_size=batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(i),
            ),
            DataLoader(TensorDataset(val_images, val_labels[i]), batch_size=128),
            4,
        )
        for i, name in enumerate("ABC")
    ]


def test_adapter_per_task_has_zero_forgetting_and_keeps_the_base_frozen(tmp_path):
    tasks = conflicting_tasks(n=32, batch_size=16)
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0)
    base = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    result = run_continual(
        backbone, tasks, method="adapter_per_task", epochs=2, lr=1e-2, output_dir=tmp_path, verbose=False
    )
    assert result.forgetting == [0.0, 0.0] and result.bwt == 0.0
    assert all(result.accuracy[i][j] == result.accuracy[j][j] for i in range(3) for j in range(i + 1))
    after = {n.replace(".base.", "."): p for n, p in backbone.named_parameters() if "lora" not in n}
    assert after.keys() == base.keys() and all(torch.equal(base[n], p) for n, p in after.items())
    assert (tmp_path / "continual_adapter_per_task.csv").is_file()


def test_ewc_composes_with_lora_fisher_only_over_what_trains():
    tasks = conflicting_tasks(n=32, batch_size=16)[:2]
    ewc = EWC(lam=10.0, fisher_batches=1)
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0)
    run_continual(
        backbone, tasks, method=ewc, strategies=[{"name": "lora", "train_head": False}], epochs=1, verbose=False
    )
    names = set(ewc.state_dict()["fisher"])
    assert names and all("lora" in n or n.startswith("heads.") for n in names), sorted(names)[:5]


def test_l2sp_in_image_classifier_fit_logs_its_term_and_checkpoints_its_anchor(tmp_path):
    import lightning.pytorch as pl

    from cvft.tasks.classification import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(
        "test_resnet", pretrained=False, num_classes=4, strategies=[{"name": "l2sp", "alpha": 0.1}], lr=1e-2
    )
    images, labels = _cue_images(16, 0)
    loader = DataLoader(TensorDataset(images, labels[0]), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader)
    assert float(trainer.callback_metrics["train/l2sp/l2sp"]) > 0.0
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = ImageClassifier.from_checkpoint(tmp_path / "last.ckpt")
    anchor = restored.strategy_stack.strategies[0].state_dict()["anchor"]
    assert torch.equal(
        anchor["conv1.0.weight"], model.strategy_stack.strategies[0].state_dict()["anchor"]["conv1.0.weight"]
    )


@pytest.mark.slow
def test_ewc_l2sp_and_lwf_each_forget_less_than_sequential_fine_tuning(capsys):
    methods = {
        "finetune": "finetune",
        "ewc": {"name": "ewc", "lam": 1000.0, "fisher_batches": 1},
        "l2sp": {"name": "l2sp", "alpha": 10.0},
        "lwf": {"name": "lwf", "lam": 10.0},
    }
    forgetting = {}
    for name, method in methods.items():
        result = run_continual("test_resnet", conflicting_tasks(), method=method, epochs=4, lr=2e-3, seed=0)
        forgetting[name] = result.average_forgetting
    assert "forget" in capsys.readouterr().out
    assert forgetting["finetune"] > 0.25, f"the tasks must conflict: {forgetting}"
    for name in ("ewc", "l2sp", "lwf"):
        assert forgetting[name] < forgetting["finetune"] - 0.1, forgetting
