"""Preference objectives: losses against hand computations, TRPO's trust region, the reference, and the direction of
learning of each method on a generated task whose reward prefers a known action."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies import StrategyStack, build_strategy
from cvft.strategies.outputs import StepBatch, StepOutputs
from cvft.strategies.preference import (
    DPO,
    PPO,
    TRPO,
    Reinforce,
    RewardModel,
    bradley_terry_loss,
    collect_rollout,
    conjugate_gradient,
    dpo_loss,
    ipo_loss,
    kl_penalty,
    ppo_clip_loss,
    ppo_update,
    trpo_step,
)
from cvft.strategies.preference.rewards import CostMatrixReward

CLASSES, FEATURES, GOOD = 3, 4, 2


# --------------------------------------------------------------------------- losses by hand
def test_ppo_clipped_surrogate_and_gradient_by_hand():
    # ratios 1.5 (A > 0: clipped at 1.2), 0.5 (A < 0: clipped at 0.8), 1.1 (A > 0: inside), 0.7 (A > 0: below, not
    # clipped since min takes the unclipped 0.7 A)
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.7])
    advantages = torch.tensor([2.0, -1.0, 1.0, 3.0])
    log_probs = ratios.log().requires_grad_()
    loss = ppo_clip_loss(log_probs, torch.zeros(4), advantages, clip=0.2)
    expected = -(1.2 * 2.0 + 0.8 * -1.0 + 1.1 * 1.0 + 0.7 * 3.0) / 4
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dlogp of -(r A)/N = -r A / N where not clipped; 0 where the clipped branch is taken
    assert log_probs.grad.tolist() == pytest.approx([0.0, 0.0, -1.1 / 4, -0.7 * 3.0 / 4], abs=1e-6)


def test_kl_term_by_hand():
    p = torch.tensor([[0.2, 0.3, 0.5]])
    q = torch.tensor([[0.5, 0.25, 0.25]])
    expected = float((p * (p / q).log()).sum())
    assert float(kl_penalty(p.log(), q.log())) == pytest.approx(expected, abs=1e-6)
    # multi-label: a sum of Bernoulli KLs
    a, b = 0.8, 0.4
    bern = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    logit = lambda x: math.log(x / (1 - x))  # noqa: E731
    value = kl_penalty(torch.tensor([[logit(a), logit(a)]]), torch.tensor([[logit(b), logit(b)]]), multi_label=True)
    assert float(value) == pytest.approx(2 * bern, abs=1e-5)


def test_bradley_terry_loss_by_hand():
    preferred, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    weights = torch.tensor([1.0, 3.0])
    nll = [-math.log(1 / (1 + math.exp(-1.0))), -math.log(1 / (1 + math.exp(1.0)))]
    assert float(bradley_terry_loss(preferred, rejected)) == pytest.approx(sum(nll) / 2, abs=1e-6)
    assert float(bradley_terry_loss(preferred, rejected, weights)) == pytest.approx((nll[0] + 3 * nll[1]) / 4, abs=1e-6)


def test_dpo_and_ipo_by_hand():
    pw, pl, rw, rl = (torch.tensor([v]) for v in (-0.5, -2.0, -1.0, -1.5))
    h = (-0.5 - -1.0) - (-2.0 - -1.5)  # 1.0
    beta, tau = 0.3, 0.25
    assert float(dpo_loss(pw, pl, rw, rl, beta=beta)) == pytest.approx(math.log1p(math.exp(-beta * h)), abs=1e-6)
    assert float(ipo_loss(pw, pl, rw, rl, tau=tau)) == pytest.approx((h - 1 / (2 * tau)) ** 2, abs=1e-6)
    # no gradient into the reference
    rw.requires_grad_()
    pw.requires_grad_()
    dpo_loss(pw, pl, rw, rl).backward()
    assert rw.grad is None


def test_cost_matrix_reward_multi_label():
    reward = CostMatrixReward([[0.0, 1.0], [5.0, 0.0]])
    actions = torch.tensor([[0, 1], [1, 1]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert reward(None, actions, targets, None).tolist() == [-5.0, -1.0]


def test_bad_config_is_refused():
    with pytest.raises(StrategyError, match="cost_matrix"):
        build_strategy({"name": "ppo", "reward": {"cost_matrix": [[0, 1, 2]]}})
    with pytest.raises(StrategyError, match="clip"):
        PPO(clip=1.5)
    with pytest.raises(StrategyError, match="own optimisation steps"):
        StrategyStack([PPO(), build_strategy({"name": "lwf"})])
    with pytest.raises(StrategyError, match="preference pairs"):
        StrategyStack([DPO(), Reinforce()])


# --------------------------------------------------------------------------- TRPO
def test_conjugate_gradient_solves_spd_system():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    a = m @ m.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=generator, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=20, tolerance=1e-20)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)


def _policy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(FEATURES, CLASSES)


def _prefers_good(images, actions, targets, indices):
    return (actions == GOOD).float()


def _data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=generator), torch.randint(CLASSES, (n,), generator=generator)


def _good_probability(model: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(images).softmax(-1)[:, GOOD].mean())


def test_trpo_respects_trust_region_and_improves():
    model = _policy()
    images, targets = _data()
    delta = 0.005
    for step in range(5):
        torch.manual_seed(100 + step)
        rollout = collect_rollout(model, images, targets, _prefers_good, multi_label=False)
        with torch.no_grad():
            old = model(images)
        result = trpo_step(model, rollout, max_kl=delta)
        with torch.no_grad():
            new = model(images)
            measured = float(kl_penalty(old, new))  # KL(pi_old || pi_new)
        assert result.step_fraction > 0
        assert measured <= delta + 1e-7
        assert result.kl == pytest.approx(measured, rel=1e-4, abs=1e-8)
        assert result.improvement > 0


# --------------------------------------------------------------------------- reference and zero reward
def _sgd_step(model: nn.Module, lr: float = 0.5):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def test_reference_stays_bit_identical_while_the_policy_moves():
    model = _policy()
    images, targets = _data()
    ppo = PPO(reward=_prefers_good, kl_coef=0.5, epochs=3)
    step = _sgd_step(model)
    ppo.optimisation_step(model, StepBatch(images, targets), step)
    snapshot = {k: v.clone() for k, v in ppo.reference_policy.snapshot.items()}
    initial = {k: v.clone() for k, v in _policy().state_dict().items()}
    assert all(torch.equal(snapshot[k], initial[k]) for k in initial)
    for _ in range(3):
        ppo.optimisation_step(model, StepBatch(images, targets), step)
    assert all(torch.equal(ppo.reference_policy.snapshot[k], snapshot[k]) for k in snapshot)
    assert not torch.equal(model.weight, initial["weight"])


def _zero_reward(images, actions, targets, indices):
    return torch.zeros(len(actions))


@pytest.mark.parametrize("method", ["reinforce", "ppo", "trpo"])
def test_zero_reward_and_zero_kl_move_nothing(method):
    model = _policy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = _data()
    step = _sgd_step(model)
    if method == "reinforce":
        strategy = Reinforce(reward=_zero_reward, baseline="none")
        for _ in range(3):
            loss = sum(strategy.loss_terms(model, None, StepOutputs(model(images), images, targets)).values())
            loss.backward()
            step()
    elif method == "ppo":
        PPO(reward=_zero_reward, kl_coef=0.0, epochs=3).optimisation_step(model, StepBatch(images, targets), step)
    else:
        TRPO(reward=_zero_reward).optimisation_step(model, StepBatch(images, targets), step)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


# --------------------------------------------------------------------------- each method moves towards the reward
@pytest.mark.parametrize("method", ["reinforce", "ppo", "trpo", "dpo", "reward_model"])
def test_each_method_moves_towards_the_preferred_action(method):
    model = _policy()
    images, targets = _data()
    start = _good_probability(model, images)
    step = _sgd_step(model, lr=0.5)
    torch.manual_seed(3)
    if method == "reinforce":
        strategy = Reinforce(reward=_prefers_good)
        for _ in range(20):
            loss = sum(strategy.loss_terms(model, None, StepOutputs(model(images), images, targets)).values())
            loss.backward()
            step()
    elif method == "ppo":
        strategy = PPO(reward=_prefers_good, kl_coef=0.01, epochs=4, minibatches=2)
        for _ in range(5):
            strategy.optimisation_step(model, StepBatch(images, targets), step)
    elif method == "trpo":
        strategy = TRPO(reward=_prefers_good, max_kl=0.02)
        for _ in range(5):
            strategy.optimisation_step(model, StepBatch(images, targets), step)
    else:
        rejected = (torch.arange(len(images)) % 2).long()  # classes 0 and 1, never GOOD
        pairs = torch.stack([torch.full((len(images),), float(GOOD)), rejected.float(), torch.ones(len(images))], 1)
        strategy = DPO(beta=0.5) if method == "dpo" else RewardModel()
        for _ in range(20):
            loss = sum(strategy.loss_terms(model, None, StepOutputs(model(images), images, pairs)).values())
            loss.backward()
            step()
    assert _good_probability(model, images) > start + 0.1


def test_ppo_inner_loop_takes_epochs_times_minibatches_steps():
    model = _policy()
    images, targets = _data()
    calls = []
    rollout = collect_rollout(model, images, targets, _prefers_good, multi_label=False)
    ppo_update(model, rollout, lambda: calls.append(1), epochs=3, minibatches=4)
    assert len(calls) == 12


def test_reinforce_multi_label_moves_towards_rewarded_labels():
    model = _policy()
    images, _ = _data()
    targets = torch.zeros(len(images), CLASSES)
    targets[:, 0] = 1.0  # reward each label decided as in the target: label 0 on, the others off
    strategy = Reinforce()
    step = _sgd_step(model, lr=0.5)
    with torch.no_grad():
        before = model(images).sigmoid().mean(0)
    for _ in range(20):
        loss = sum(strategy.loss_terms(model, None, StepOutputs(model(images), images, targets)).values())
        loss.backward()
        step()
    with torch.no_grad():
        after = model(images).sigmoid().mean(0)
    assert after[0] > before[0] + 0.1 and (after[1:] < before[1:] - 0.05).all()


def test_dpo_first_step_gradient_is_beta_half_of_log_prob_margin():
    # at pi = pi_ref the DPO gradient is -beta/2 * grad(log pi(y_w) - log pi(y_l))
    logits = torch.randn(1, CLASSES, requires_grad=True)
    images = torch.zeros(1, 1)
    pairs = torch.tensor([[2.0, 0.0, 1.0]])

    class Fixed(nn.Module):
        def forward(self, x):
            return logits

    strategy = DPO(beta=0.4)
    loss = strategy.loss_terms(Fixed(), None, StepOutputs(logits, images, pairs))["dpo"]
    (grad,) = torch.autograd.grad(loss, logits)
    log_p = F.log_softmax(logits, -1)
    (margin_grad,) = torch.autograd.grad(log_p[0, 2] - log_p[0, 0], logits)
    assert torch.allclose(grad, -0.2 * margin_grad, atol=1e-6)
