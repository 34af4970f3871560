"""Weight-space regularisers against forgetting: L2-SP (pull towards the start) and EWC (Fisher-weighted pull)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvft.backbones.layer_groups import head_parameter_names
from cvft.errors import StrategyError
from cvft.strategies.base import LossFn, calibration_mode
from cvft.strategies.continual.base import ContinualStrategy, watched_parameters
from cvft.strategies.continual.multihead import active_head_parameter_names
from cvft.strategies.outputs import StepOutputs
from cvft.strategies.registry import register_strategy

__all__ = ["L2SP", "EWC", "diagonal_fisher"]


def _check_non_negative(strategy: str, **values: float) -> None:
    for key, value in values.items():
        if not value >= 0.0:
            raise StrategyError(f"{strategy}: {key} must be >= 0, got {value}.")


@register_strategy
class L2SP(ContinualStrategy):
    """L2-SP (Li, Grandvalet & Davoine, 2018): keep the shared weights near their starting point.

    Loss term ``alpha / 2 * sum ||w - w0||^2`` over the trainable parameters outside the classifier heads, where
    ``w0`` are the weights when :meth:`setup` ran (the pretrained / start-of-sequence weights), plus
    ``beta / 2 * ||head||^2`` over the head being trained (plain weight decay, as the paper does for the new head).
    Plain supervised fine-tuning is ``alpha = beta = 0``; compared with weight decay, which pulls towards zero and
    so forgets the pretrained solution, L2-SP pulls towards that solution. Parameters that start training later
    (gradual unfreezing) are anchored when they first train, which is still their starting value.

    Args:
        alpha: Strength of the pull of the shared weights towards ``w0``.
        beta: Weight decay of the head being trained (0 leaves it to the optimizer).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> l2sp = L2SP(alpha=0.1)
        >>> l2sp.setup(model)
        >>> with torch.no_grad():
        ...     _ = model.bn1.weight.add_(1.0)
        >>> outputs = StepOutputs(logits=torch.zeros(1, 3), images=torch.zeros(1, 3, 32, 32))
        >>> round(float(l2sp.loss_terms(model, None, outputs)["l2sp"]), 4), model.bn1.weight.numel()
        (1.6, 32)
    """

    name = "l2sp"

    def __init__(self, alpha: float = 0.01, beta: float = 0.0) -> None:
        _check_non_negative(self.name, alpha=alpha, beta=beta)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self._anchor: dict[str, Tensor] = {}

    def setup(self, model: nn.Module) -> None:
        """Store ``w0`` of every trainable parameter outside the heads."""
        heads = head_parameter_names(model)
        self._anchor = {name: p.detach().clone() for name, p in watched_parameters(model, heads)}

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """``{"l2sp": alpha/2 ||w - w0||^2 [, "head_decay": beta/2 ||head||^2]}``."""
        penalty = outputs.logits.new_zeros(())
        for name, param in watched_parameters(model, head_parameter_names(model)):
            anchor = self._anchor.get(name)
            if anchor is None:  # became trainable after setup: its value has not moved yet
                anchor = self._anchor[name] = param.detach().clone()
            penalty = penalty + (param - anchor).pow(2).sum()
        terms = {"l2sp": 0.5 * self.alpha * penalty}
        if self.beta > 0:
            current = active_head_parameter_names(model)
            decay = sum((p.pow(2).sum() for n, p in model.named_parameters() if n in current and p.requires_grad), 0.0)
            terms["head_decay"] = 0.5 * self.beta * decay
        return terms

    def state_dict(self) -> dict[str, Any]:
        """The anchor ``w0`` by parameter name."""
        return {"anchor": dict(self._anchor)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the anchor."""
        self._anchor = {name: tensor.clone() for name, tensor in state.get("anchor", {}).items()}


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, ...]],
    names: Iterable[str],
    loss_fn: LossFn = F.cross_entropy,
    kind: Literal["sampled", "expected", "empirical"] = "sampled",
    max_batches: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher information ``E_x E_y[(d log p(y|x) / d w)^2]`` of the named parameters, per sample.

    ``-log p(y|x)`` is ``loss_fn(logits_i, y)`` on one sample's logits (cross-entropy: a softmax classifier).
    Gradients are per sample (one backward per sample, or per sample and class for ``"expected"``); squaring a
    batch gradient instead would give a biased, much smaller estimate. Runs in eval mode (BatchNorm statistics
    fixed, samples independent), leaving gradients and modes as they were.

    Args:
        model: Maps images to logits (a :class:`MultiHeadNet` uses its active head).
        batches: ``(images, targets, ...)`` batches of the task.
        names: Parameters to compute the Fisher of.
        loss_fn: ``loss_fn(logits, targets)``, the negative log-likelihood.
        kind: ``"sampled"``: ``y`` drawn from the model's ``p(y|x)`` (the true Fisher, one sample, as in
            Kirkpatrick et al.); ``"expected"``: the exact expectation over classes,
            ``sum_y p(y|x) (d log p(y|x)/dw)^2``; ``"empirical"``: ``y`` the label (the empirical Fisher).
        max_batches: Use at most this many batches.
        generator: Random generator for ``"sampled"``.

    Returns:
        ``{name: F}``, each of the parameter's shape, averaged over samples.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 3)
        >>> batches = [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))]
        >>> fisher = diagonal_fisher(model, batches, ["weight"], kind="expected")
        >>> fisher["weight"].shape
        torch.Size([3, 2])
    """
    params = dict(model.named_parameters())
    names = list(names)
    fisher = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in names}
    wanted = [params[name] for name in names]
    count = 0
    with calibration_mode(model), torch.enable_grad():
        for batch in islice(batches, max_batches):
            device = wanted[0].device if wanted else None
            images, labels = batch[0].to(device), batch[1].to(device)
            logits = model(images)
            for i in range(len(images)):
                row = logits[i : i + 1]
                if kind == "empirical":
                    choices = [(labels[i : i + 1], 1.0)]
                elif kind == "sampled":
                    probs = row.detach().float().softmax(-1).cpu()
                    choices = [(torch.multinomial(probs, 1, generator=generator)[0].to(row.device), 1.0)]
                else:
                    probs = row.detach().float().softmax(-1)[0]
                    choices = [(torch.tensor([c], device=row.device), float(probs[c])) for c in range(row.shape[1])]
                for target, weight in choices:
                    grads = torch.autograd.grad(loss_fn(row, target), wanted, retain_graph=True, allow_unused=True)
                    for name, grad in zip(names, grads, strict=True):
                        if grad is not None:
                            fisher[name] += weight * grad.detach().float().pow(2)
                count += 1
    return {name: value / max(count, 1) for name, value in fisher.items()}


@register_strategy
class EWC(ContinualStrategy):
    """Elastic Weight Consolidation (Kirkpatrick et al., 2017): a Fisher-weighted pull towards earlier solutions.

    After each task, :meth:`consolidate` estimates the diagonal Fisher ``F`` of the trainable parameters on
    ``fisher_batches`` batches of that task (:func:`diagonal_fisher`; by default the *true* Fisher with ``y``
    sampled from the model, per-sample gradients) and stores the weights ``w*``. While later tasks train the loss
    gains ``lam / 2 * sum F (w - w*)^2``. Over several tasks the Fisher is accumulated online,
    ``F <- gamma * F + F_task``, with the latest ``w*`` as anchor (``gamma = 1``: the sum of the tasks' Fishers,
    the single-penalty form of Kirkpatrick et al.'s per-task penalties; ``gamma < 1``: online EWC of Schwarz et
    al., 2018). Before the first consolidation the term is zero, i.e. plain supervised fine-tuning; afterwards,
    parameters important to earlier tasks move less.

    Args:
        lam: Penalty strength ``lambda``.
        fisher_batches: Batches of the finished task to estimate the Fisher on.
        fisher: ``"sampled"``, ``"expected"`` (exact over classes) or ``"empirical"`` (labels); see
            :func:`diagonal_fisher`.
        gamma: Decay of the accumulated Fisher at each new consolidation, in ``[0, 1]``.
        seed: Seed of the label sampling.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 3)
        >>> ewc = EWC(lam=1.0, fisher="expected")
        >>> ewc.consolidate(model, [(torch.randn(8, 2), torch.zeros(8, dtype=torch.long))], F.cross_entropy)
        >>> outputs = StepOutputs(logits=torch.zeros(1, 3), images=torch.zeros(1, 2))
        >>> float(ewc.loss_terms(model, None, outputs)["ewc"])
        0.0
    """

    name = "ewc"

    def __init__(
        self,
        lam: float = 100.0,
        fisher_batches: int = 8,
        fisher: Literal["sampled", "expected", "empirical"] = "sampled",
        gamma: float = 1.0,
        seed: int = 0,
    ) -> None:
        _check_non_negative(self.name, lam=lam)
        if fisher not in ("sampled", "expected", "empirical"):
            raise StrategyError(f"ewc: fisher must be 'sampled', 'expected' or 'empirical', got {fisher!r}.")
        if fisher_batches < 1:
            raise StrategyError(f"ewc: fisher_batches must be >= 1, got {fisher_batches}.")
        if not 0.0 <= gamma <= 1.0:
            raise StrategyError(f"ewc: gamma must be in [0, 1], got {gamma}.")
        self.lam = float(lam)
        self.fisher_batches = int(fisher_batches)
        self.fisher = fisher
        self.gamma = float(gamma)
        self.seed = int(seed)
        self._fisher: dict[str, Tensor] = {}
        self._anchor: dict[str, Tensor] = {}
        self._tasks = 0

    def consolidate(self, model: nn.Module, batches: Iterable[tuple[Tensor, ...]], loss_fn: LossFn) -> None:
        """Add the finished task's Fisher to the accumulated one and anchor at the current weights."""
        names = [name for name, _ in watched_parameters(model)]
        generator = torch.Generator().manual_seed(self.seed + self._tasks)
        new = diagonal_fisher(model, batches, names, loss_fn, self.fisher, self.fisher_batches, generator)
        for name, value in new.items():
            old = self._fisher.get(name)
            self._fisher[name] = value if old is None else self.gamma * old + value
        params = dict(model.named_parameters())
        self._anchor = {name: params[name].detach().clone() for name in self._fisher}
        self._tasks += 1

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """``{"ewc": lam/2 sum F (w - w*)^2}`` (zero before the first consolidation)."""
        penalty = outputs.logits.new_zeros(())
        for name, param in watched_parameters(model):
            fisher = self._fisher.get(name)
            if fisher is not None:
                penalty = penalty + (fisher * (param - self._anchor[name]).pow(2)).sum()
        return {"ewc": 0.5 * self.lam * penalty}

    def state_dict(self) -> dict[str, Any]:
        """Accumulated Fisher, anchor and the number of consolidated tasks."""
        return {"fisher": dict(self._fisher), "anchor": dict(self._anchor), "tasks": self._tasks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._fisher = {k: v.clone() for k, v in state.get("fisher", {}).items()}
        self._anchor = {k: v.clone() for k, v in state.get("anchor", {}).items()}
        self._tasks = int(state.get("tasks", 0))
