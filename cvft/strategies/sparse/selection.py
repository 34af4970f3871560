"""Which weight entries sparse fine-tuning updates: targets, budget, scores and top-k.

Scores, one per entry of every selectable tensor:

* ``magnitude`` (alias ``l1``): ``|w|`` of the pretrained weight.
* ``gradient``: ``sum_b |dL_b/dw|``, the absolute gradient of the mean task loss ``L_b`` of calibration batch
  ``b``, accumulated over the calibration batches.
* ``fisher``: ``(1/B) sum_b (dL_b/dw)^2``, the empirical diagonal Fisher information estimated from *batch*
  gradients (the mean-loss gradient of each batch, squared); not from per-sample gradients, which would need one
  backward pass per image.

The budget is ``round(fraction * selectable)`` entries (Python's ``round``) or an int count. ``scope="global"``
takes the top-``count`` scores over all selectable entries at once; ``scope="per_tensor"`` gives every tensor its
share of the count, proportional to its size (largest remainders), and takes the top scores within each tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.base import LossFn
from cvft.strategies.selectors import SELECTORS
from cvft.strategies.targets import candidate_layers, every_candidate, resolve_targets, selector_shortcuts

__all__ = [
    "CRITERIA",
    "SCOPES",
    "check_selection_options",
    "selectable_layers",
    "budget_count",
    "per_tensor_counts",
    "top_positions",
    "gradient_scores",
    "calibration_pair",
]

#: Criterion names and the score each one uses.
CRITERIA = {"magnitude": "magnitude", "l1": "magnitude", "gradient": "gradient", "fisher": "fisher"}
SCOPES = ("global", "per_tensor")


def _has_selectable_weight(module: nn.Module) -> bool:
    """A Linear or Conv2d layer with a non-empty weight of its own."""
    return (
        isinstance(module, (nn.Linear, nn.Conv2d))
        and isinstance(module.weight, nn.Parameter)
        and module.weight.numel() > 0
    )


def _is_wrapper(module: nn.Module) -> bool:
    """A layer wrapped by a strategy (LoRA, sparse ...): its insides are left alone."""
    return isinstance(getattr(module, "base", None), nn.Module)


_SHORTCUTS = {"all": every_candidate, **selector_shortcuts()}


def selectable_layers(model: nn.Module, targets: str | Sequence[str] = "all", method: str = "sparse") -> list[str]:
    r"""Names of the layers whose weights sparse tuning (and ``filter_select``) may update, in model order.

    Args:
        model: The model to search.
        targets: ``"all"`` (every Linear and Conv2d weight outside the classifier head), a named selector of
            :mod:`cvft.strategies.selectors` (``"attention"``, ``"pointwise"`` ...), or module names, weight
            names (``"blocks.0.attn.qkv.weight"``) or regexes full-matching either, alone or in a list.
        method: The strategy named in error messages (``filter_select`` resolves its targets here too).

    Raises:
        StrategyError: A target matches no candidate layer; the message lists the candidates.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit")
        >>> selectable_layers(model)[:2]
        ['patch_embed.proj', 'blocks.0.attn.qkv']
        >>> selectable_layers(model, [r"blocks\.[01]\.mlp\.fc\d", "blocks.5.attn.proj.weight"])
        ['blocks.0.mlp.fc1', 'blocks.0.mlp.fc2', 'blocks.1.mlp.fc1', 'blocks.1.mlp.fc2', 'blocks.5.attn.proj']
    """
    candidates = candidate_layers(model, _has_selectable_weight, _is_wrapper)
    what = f"Linear or Conv2d weight of {type(model).__name__} outside the classifier head"
    hint = f"Give 'all', a named selector ({', '.join(SELECTORS)}), module names, weight names or regexes."
    return resolve_targets(
        method, model, targets, candidates, _SHORTCUTS, description=what, hint=hint, weight_names=True
    )


def budget_count(budget: float | int, selectable: int) -> int:
    """Number of entries to update: ``round(budget * selectable)`` for a fraction, ``budget`` for an int.

    Raises:
        StrategyError: The count is below 1 or above ``selectable``.

    Example:
        >>> budget_count(0.01, 12345), budget_count(100, 12345)
        (123, 100)
    """
    count = budget if isinstance(budget, int) else round(budget * selectable)
    if count < 1:
        raise StrategyError(
            f"sparse: budget={budget!r} of {selectable} selectable entries selects nothing; raise the budget."
        )
    if count > selectable:
        raise StrategyError(
            f"sparse: budget={budget!r} exceeds the {selectable} selectable entries; give at most {selectable} "
            "or a fraction in (0, 1)."
        )
    return count


def per_tensor_counts(count: int, sizes: Sequence[int]) -> list[int]:
    """Split ``count`` over tensors in proportion to their ``sizes`` (largest remainders; ties to earlier tensors).

    Example:
        >>> per_tensor_counts(10, [50, 30, 20]), per_tensor_counts(2, [5, 5, 5])
        ([5, 3, 2], [1, 1, 0])
    """
    total = sum(sizes)
    exact = [count * n / total for n in sizes]
    counts = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: count - sum(counts)]:
        counts[i] += 1
    return counts


def top_positions(scores: Sequence[Tensor], count: int, scope: str) -> Tensor:
    """Flat positions (in the concatenation of ``scores``) of the ``count`` highest scores, sorted.

    Example:
        >>> scores = [torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.8, 0.2])]
        >>> top_positions(scores, 2, "global").tolist(), top_positions(scores, 2, "per_tensor").tolist()
        ([1, 3], [1, 3])
    """
    flat = [s.detach().flatten().float() for s in scores]
    if scope == "global":
        chosen = torch.cat(flat).topk(count, sorted=False).indices
    else:
        offset, parts = 0, []
        for score, k in zip(flat, per_tensor_counts(count, [s.numel() for s in flat]), strict=True):
            parts.append(score.topk(k, sorted=False).indices + offset)
            offset += score.numel()
        chosen = torch.cat(parts)
    return chosen.sort().values


def check_selection_options(
    method: str, criterion: str, criteria: Sequence[str], scope: str, scopes: Sequence[str], calibration_batches: int
) -> None:
    """Refuse a ``criterion`` or ``scope`` outside its choices, or ``calibration_batches`` that is not an int >= 1.

    What the selective strategies (``sparse``, ``filter_select``) check alike; ``method`` names the strategy in the
    error.

    Example:
        >>> from cvft.errors import StrategyError
        >>> try:
        ...     check_selection_options("sparse", "fisher", ["magnitude"], "global", ["global"], 8)
        ... except StrategyError as error:
        ...     print(error)
        sparse: unknown criterion 'fisher'; choose one of ['magnitude'].
    """
    if criterion not in criteria:
        raise StrategyError(f"{method}: unknown criterion {criterion!r}; choose one of {list(criteria)}.")
    if scope not in scopes:
        raise StrategyError(f"{method}: unknown scope {scope!r}; choose one of {list(scopes)}.")
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise StrategyError(f"{method}: calibration_batches must be an int >= 1, got {calibration_batches!r}.")


def calibration_pair(batch: object, method: str = "sparse") -> tuple[Tensor, Tensor]:
    """``(images, targets)`` of an ``(images, targets, ...)`` calibration batch; else an error naming ``method``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise StrategyError(
        f"{method}: calibration batches must be (images, targets, ...) tuples, got {type(batch).__name__}."
    )


def gradient_scores(
    model: nn.Module,
    weights: Sequence[Tensor],
    batches: Iterable[object],
    loss_fn: LossFn,
    num_batches: int,
    squared: bool,
) -> list[Tensor]:
    """Accumulated ``|grad|`` (``squared=False``: the sum) or mean squared gradient (``squared=True``) per entry.

    The model's forward runs as it is (put it in eval mode first); only ``weights`` get gradients, through
    :func:`torch.autograd.grad`, so no ``.grad`` attribute is touched. Batches go to the weights' device.

    Raises:
        StrategyError: ``batches`` yields no batch.
    """
    device = weights[0].device
    totals = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    seen = 0
    with torch.enable_grad():
        for batch in batches:
            if seen >= num_batches:
                break
            images, targets = calibration_pair(batch)
            loss = loss_fn(model(images.to(device)), targets.to(device))
            grads = torch.autograd.grad(loss, list(weights), allow_unused=True)
            for total, grad in zip(totals, grads, strict=True):
                if grad is not None:
                    total.add_(grad.float().square() if squared else grad.float().abs())
            seen += 1
    if seen == 0:
        raise StrategyError("sparse: the calibration data yielded no batch; pass a non-empty DataLoader.")
    return [total / seen for total in totals] if squared else totals
