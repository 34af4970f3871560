"""The ``trpo`` objective: Trust Region Policy Optimization (Schulman et al., 2015) on the trainable parameters.

On each training batch's rollout (:func:`~cvft.strategies.preference.rollout.collect_rollout`) TRPO maximises the
surrogate ``L(theta) = mean(pi_theta(a | x) / pi_old(a | x) * A) - kl_coef * KL(pi_theta || pi_ref)`` subject to
``mean KL(pi_old || pi_theta) <= max_kl``:

1. ``g``, the gradient of ``L`` at ``theta_old``;
2. ``s ~= F^-1 g`` by conjugate gradient (:func:`conjugate_gradient`), where ``F v`` is the Fisher-vector product,
   the Hessian of the mean KL at ``theta_old`` times ``v`` by double backpropagation (plus ``damping * v``);
3. the largest step along ``s`` that meets the quadratic constraint, ``beta = sqrt(2 max_kl / s^T F s)``;
4. a backtracking line search on ``theta_old + 0.5^k beta s`` that accepts the first step whose *measured* KL is at
   most ``max_kl`` and whose surrogate improved; if none does, the parameters stay at ``theta_old``.

Every gradient and Fisher-vector product is averaged over DDP ranks, and so are the line search's KL and surrogate,
so every rank takes the same step. The parameters change in place (no optimizer); the task still calls its optimizer
with no gradients so that the step counter advances.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from cvft.errors import StrategyError
from cvft.strategies.base import eval_mode
from cvft.strategies.preference._distributed import average_gradients, mean_across_ranks
from cvft.strategies.preference.losses import kl_penalty
from cvft.strategies.preference.objective import ReferenceSpec, RewardSpec, RolloutObjective
from cvft.strategies.preference.policy import action_log_probs, policy_kl
from cvft.strategies.preference.rollout import Rollout, trainable_parameters
from cvft.strategies.registry import register_strategy

__all__ = ["TRPO", "TRPOStep", "conjugate_gradient", "trpo_step"]


def conjugate_gradient(
    matrix_vector: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10, tolerance: float = 1e-10
) -> Tensor:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` given as ``matrix_vector(v) = A v``.

    Stops after ``iterations`` or when the squared residual falls below ``tolerance``; starts from ``x = 0``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0])).tolist()  # exact: [1/11, 7/11]
        [0.09090909361839294, 0.6363636255264282]
    """
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    squared = residual @ residual
    for _ in range(iterations):
        if squared < tolerance:
            break
        product = matrix_vector(direction)
        alpha = squared / (direction @ product)
        x = x + alpha * direction
        residual = residual - alpha * product
        new_squared = residual @ residual
        direction = residual + (new_squared / squared) * direction
        squared = new_squared
    return x


@dataclass
class TRPOStep:
    """What one TRPO step did.

    Attributes:
        kl: Measured mean ``KL(pi_old || pi_new)`` after the step (0 when rejected).
        improvement: Surrogate after minus before (0 when rejected).
        expected_improvement: ``g . step`` of the full step, the linear prediction.
        step_fraction: The accepted fraction ``0.5^k`` of the full step (0: rejected, parameters unchanged).
    """

    kl: float
    improvement: float
    expected_improvement: float
    step_fraction: float


def _surrogate(model: nn.Module, rollout: Rollout, kl_coef: float) -> tuple[Tensor, Tensor]:
    """``L(theta)`` and the logits it came from."""
    logits = model(rollout.images)
    log_probs = action_log_probs(logits, rollout.actions, rollout.multi_label)
    ratio = torch.exp(log_probs - rollout.old_log_probs)
    objective = (ratio * rollout.advantages).mean()
    if kl_coef > 0 and rollout.reference_logits is not None:
        objective = objective - kl_coef * kl_penalty(logits, rollout.reference_logits, rollout.multi_label)
    return objective, logits


def trpo_step(
    model: nn.Module,
    rollout: Rollout,
    max_kl: float = 0.01,
    damping: float = 0.1,
    cg_iterations: int = 10,
    backtracks: int = 10,
    kl_coef: float = 0.0,
) -> TRPOStep:
    """One natural-gradient step with a KL trust region on ``model``'s trainable parameters (module docstring).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(2, 3)
        >>> from cvft.strategies.preference.rollout import collect_rollout
        >>> rollout = collect_rollout(model, torch.randn(16, 2), torch.zeros(16, dtype=torch.long),
        ...                           lambda x, a, t, i: (a == t).float(), multi_label=False)
        >>> step = trpo_step(model, rollout, max_kl=0.01)
        >>> step.kl <= 0.01 and step.improvement > 0
        True
    """
    parameters = trainable_parameters(model)
    if not parameters:
        raise StrategyError("trpo: the model has no trainable parameters; combine trpo with a parameter strategy.")
    with eval_mode(model):
        objective, logits = _surrogate(model, rollout, kl_coef)
        grads = torch.autograd.grad(objective, parameters, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]
        g = parameters_to_vector(average_gradients(grads)).float()
        old_objective = float(mean_across_ranks(objective.detach()))
        if not torch.isfinite(g).all() or float(g.norm()) == 0.0:
            return TRPOStep(0.0, 0.0, 0.0, 0.0)

        # the Fisher matrix at theta_old: Hessian of KL(pi_old || pi_theta) at theta = theta_old
        kl = policy_kl(rollout.old_logits, logits, rollout.multi_label).mean()
        kl_grads = torch.autograd.grad(kl, parameters, create_graph=True, allow_unused=True)
        kl_grads = [torch.zeros_like(p) if k is None else k for p, k in zip(parameters, kl_grads, strict=True)]
        flat_kl_grad = torch.cat([k.reshape(-1) for k in kl_grads]).float()

        def fisher_vector(v: Tensor) -> Tensor:
            products = torch.autograd.grad(flat_kl_grad @ v, parameters, retain_graph=True, allow_unused=True)
            products = [torch.zeros_like(p) if h is None else h for p, h in zip(parameters, products, strict=True)]
            return parameters_to_vector(average_gradients(products)).float() + damping * v

        direction = conjugate_gradient(fisher_vector, g, cg_iterations)
        curvature = float(direction @ fisher_vector(direction))
        if not curvature > 0:
            return TRPOStep(0.0, 0.0, 0.0, 0.0)
        full_step = direction * (2 * max_kl / curvature) ** 0.5
        expected = float(g @ full_step)
        old_vector = parameters_to_vector(parameters).detach().clone()
        with torch.no_grad():
            for k in range(backtracks):
                fraction = 0.5**k
                vector_to_parameters((old_vector + fraction * full_step).to(old_vector.dtype), parameters)
                new_objective, new_logits = _surrogate(model, rollout, kl_coef)
                measured_kl = float(
                    mean_across_ranks(policy_kl(rollout.old_logits, new_logits, rollout.multi_label).mean())
                )
                improvement = float(mean_across_ranks(new_objective)) - old_objective
                if measured_kl <= max_kl and improvement > 0:
                    return TRPOStep(measured_kl, improvement, expected, fraction)
            vector_to_parameters(old_vector, parameters)
    return TRPOStep(0.0, 0.0, expected, 0.0)


@register_strategy
class TRPO(RolloutObjective):
    """TRPO on the trainable parameters (see the module docstring).

    Compared with supervised fine-tuning, the model maximises the expected reward of labels sampled from itself,
    each step a natural-gradient step that keeps ``KL(pi_old || pi_new) <= max_kl``. It replaces the supervised loss
    and ignores the learning rate (the trust region sets the step). The Fisher products cost a double backward: keep
    the trainable set small (``linear_probe``, ``lora``).

    Args:
        reward: See :class:`~cvft.strategies.preference.objective.PolicyObjective`.
        max_kl: The trust region ``delta`` on the mean ``KL(pi_old || pi_new)``.
        damping: Added to the Fisher matrix's diagonal in the conjugate-gradient solve.
        cg_iterations: Conjugate-gradient iterations.
        backtracks: Halvings of the step the line search tries.
        kl_coef: Weight of ``KL(pi || pi_ref)`` to the reference in the surrogate.
        normalize_advantages: Divide the advantages by their standard deviation over the batch.
        reference: The reference policy (``None``: the model as the fit starts).
        reference_weights: Base weights of a named ``reference``.

    Example:
        >>> TRPO(max_kl=0.02).steps_itself
        True
    """

    name = "trpo"

    def __init__(
        self,
        reward: RewardSpec = None,
        max_kl: float = 0.01,
        damping: float = 0.1,
        cg_iterations: int = 10,
        backtracks: int = 10,
        kl_coef: float = 0.0,
        normalize_advantages: bool = True,
        reference: ReferenceSpec = None,
        reference_weights: str | None = None,
    ) -> None:
        super().__init__(reward, kl_coef, reference, reference_weights, normalize_advantages=normalize_advantages)
        if not max_kl > 0:
            raise StrategyError(f"trpo: max_kl must be > 0 (0.001-0.05 is usual), got {max_kl}.")
        if not damping >= 0:
            raise StrategyError(f"trpo: damping must be >= 0, got {damping}.")
        if cg_iterations < 1 or backtracks < 1:
            raise StrategyError(f"trpo: cg_iterations and backtracks must be >= 1, got {cg_iterations}, {backtracks}.")
        self.max_kl = float(max_kl)
        self.damping = float(damping)
        self.cg_iterations = int(cg_iterations)
        self.backtracks = int(backtracks)

    def update(
        self, model: nn.Module, images: Tensor, rollout: Rollout, optimizer_step: Callable[[], None]
    ) -> dict[str, Tensor]:
        """Take one :func:`trpo_step` on the rollout; then ``optimizer_step()`` with no gradients (a count)."""
        step = trpo_step(model, rollout, self.max_kl, self.damping, self.cg_iterations, self.backtracks, self.kl_coef)
        for param in model.parameters():
            param.grad = None
        optimizer_step()
        return {
            "kl_old": torch.tensor(step.kl),
            "improvement": torch.tensor(step.improvement),
            "step_fraction": torch.tensor(step.step_fraction),
        }
