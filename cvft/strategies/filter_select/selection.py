"""Which output rows (conv filters, Linear output features) ``filter_select`` trains: scores, counts and top-k.

A *row* of a weight is ``weight[i]``: filter ``i`` of a convolution (``in_channels / groups x kh x kw`` entries) or
output feature ``i`` of a Linear layer (``in_features`` entries). Scores, one per row:

* ``l1``: ``sum |w|`` over the row of the pretrained weight (the filter's L1 norm, Li et al. 2017).
* ``bn_scale``: ``|gamma_i|`` of the BatchNorm layer that *directly* follows the convolution, i.e. whose input is
  the convolution's output tensor itself (found with forward hooks on one dummy image; Liu et al. 2017,
  "network slimming"). A targeted layer that no BatchNorm directly follows is refused, with its name: mixing
  ``|gamma|`` with another score in one ranking would compare unrelated scales.
* ``taylor``: ``sum_b |sum_row w * dL_b/dw|``, the first-order Taylor estimate of the loss change when the row is
  removed, accumulated over the calibration batches ``b`` (``L_b``: the mean task loss of batch ``b``; Molchanov et
  al. 2017/2019, weight form, biases left out).

Counts: ``scope="per_layer"`` trains ``max(1, round(k * rows))`` rows of every targeted layer (Python's ``round``);
``scope="global"`` trains ``max(1, round(k * total_rows))`` rows over all targeted layers at once, ranked by their
raw scores, so that a layer may get none. Ties go to the lower row index, then the earlier layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies._freeze import is_batchnorm
from cvft.strategies.base import LossFn, eval_mode
from cvft.strategies.sparse.selection import calibration_pair, selectable_layers

__all__ = [
    "CRITERIA",
    "SCOPES",
    "filter_layers",
    "row_count",
    "l1_scores",
    "bn_scale_scores",
    "taylor_scores",
    "top_rows",
]

CRITERIA = ("l1", "bn_scale", "taylor")
SCOPES = ("per_layer", "global")


def filter_layers(model: nn.Module, targets: str | Sequence[str] = "all") -> list[str]:
    r"""Names of the Linear and Conv2d layers whose rows ``filter_select`` may train, in model order.

    Targets as for sparse tuning (:func:`cvft.strategies.sparse.selection.selectable_layers`): ``"all"`` (every
    Linear and Conv2d layer outside the head), a named selector, module or weight names, or regexes.

    Example:
        >>> import timm
        >>> filter_layers(timm.create_model("test_resnet"), r"layer1\.0\.conv\d")
        ['layer1.0.conv1', 'layer1.0.conv2']
    """
    return selectable_layers(model, targets, method="filter_select")


def row_count(k: float, rows: int) -> int:
    """Rows to train out of ``rows``: ``max(1, round(k * rows))``, at most ``rows``.

    Example:
        >>> row_count(0.25, 64), row_count(0.01, 8), row_count(1.0, 8)
        (16, 1, 8)
    """
    return min(rows, max(1, round(k * rows)))


def l1_scores(weights: Sequence[Tensor]) -> list[Tensor]:
    """``sum |w|`` over each output row of each weight (float32).

    Example:
        >>> l1_scores([torch.tensor([[1.0, -2.0], [0.5, 0.0]])])[0].tolist()
        [3.0, 0.5]
    """
    return [w.detach().float().abs().flatten(1).sum(dim=1) for w in weights]


def _dummy_input(model: nn.Module, first: nn.Module) -> Tensor:
    """One random image with the first layer's channels, of a ViT's ``patch_embed.img_size``, else the input size.

    The input size is ``pretrained_cfg["input_size"]``, else 224 px.
    """
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[-2:]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    return first.weight.new_zeros(1, channels, height, width).normal_()


@torch.no_grad()
def bn_scale_scores(model: nn.Module, names: Sequence[str]) -> list[Tensor]:
    """``|gamma|`` of the BatchNorm whose input is each named layer's output, one score per output row.

    Runs one forward pass of a random image in eval mode (train/eval modes restored, running statistics untouched).

    Raises:
        StrategyError: A named layer is not directly followed by an affine BatchNorm of matching width.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet")
        >>> scores = bn_scale_scores(model, ["layer1.0.conv1"])
        >>> torch.equal(scores[0], model.layer1[0].bn1.weight.abs())
        True
    """
    layers = {name: model.get_submodule(name) for name in names}
    if not any(is_batchnorm(m) for m in model.modules()):
        raise StrategyError(
            "filter_select: criterion='bn_scale' ranks filters by the |gamma| of the BatchNorm that follows them, but "
            f"{type(model).__name__} has no BatchNorm layer; choose criterion='l1' or 'taylor'."
        )
    # id of an output tensor -> (the layer that produced it, the tensor, held so that its id is not reused)
    producers: dict[int, tuple[str, Tensor]] = {}
    followers: dict[str, nn.Module] = {}
    handles = []

    def record_output(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            producers[id(output)] = (name, output)

        return hook

    def find_producer(module: nn.Module, args: tuple) -> None:
        produced = producers.get(id(args[0])) if args else None
        if produced is not None and produced[1] is args[0] and produced[0] not in followers:
            followers[produced[0]] = module

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(record_output(name)))
    for module in model.modules():
        if is_batchnorm(module):
            handles.append(module.register_forward_pre_hook(find_producer))
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    try:
        with eval_mode(model):
            model(_dummy_input(model, first))
    finally:
        for handle in handles:
            handle.remove()
    scores, missing = [], []
    for name, layer in layers.items():
        norm = followers.get(name)
        rows = layer.weight.shape[0]
        if norm is None or norm.weight is None or norm.weight.numel() != rows:
            missing.append(name)
            continue
        scores.append(norm.weight.detach().float().abs())
    if missing:
        listed = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise StrategyError(
            "filter_select: criterion='bn_scale' ranks a layer's filters by the |gamma| of the BatchNorm that directly "
            f"follows it, but no affine BatchNorm of matching width directly follows {listed}. Restrict `targets` to "
            "convolutions followed by BatchNorm, or choose criterion='l1' or 'taylor'."
        )
    return scores


def taylor_scores(
    model: nn.Module, weights: Sequence[Tensor], batches: Iterable[object], loss_fn: LossFn, num_batches: int
) -> list[Tensor]:
    """``sum_b |sum_row w * dL_b/dw|`` per output row of each weight, over the first ``num_batches`` batches.

    The model's forward runs as it is (put it in eval mode first); only ``weights`` get gradients, through
    :func:`torch.autograd.grad`. Under ``torch.distributed`` the scores are summed over the ranks, so that every
    rank selects the same rows.

    Raises:
        StrategyError: ``batches`` yields no batch.
    """
    device = weights[0].device
    totals = [torch.zeros(w.shape[0], dtype=torch.float32, device=device) for w in weights]
    seen = 0
    with torch.enable_grad():
        for batch in batches:
            if seen >= num_batches:
                break
            images, targets = calibration_pair(batch, "filter_select")
            loss = loss_fn(model(images.to(device)), targets.to(device))
            grads = torch.autograd.grad(loss, list(weights), allow_unused=True)
            for total, weight, grad in zip(totals, weights, grads, strict=True):
                if grad is not None:
                    total.add_((weight.detach().float() * grad.float()).flatten(1).sum(dim=1).abs())
            seen += 1
    if seen == 0:
        raise StrategyError("filter_select: the calibration data yielded no batch; pass a non-empty DataLoader.")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for total in totals:
            dist.all_reduce(total)
    return totals


def _top(scores: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest scores; ties to the lower index (stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def top_rows(scores: Sequence[Tensor], k: float, scope: str) -> list[Tensor]:
    """The selected rows of each layer (sorted indices) for the fraction ``k`` and ``scope``.

    Example:
        >>> scores = [torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([0.8, 0.2])]
        >>> [r.tolist() for r in top_rows(scores, 0.5, "per_layer")]
        [[1, 2], [0]]
        >>> [r.tolist() for r in top_rows(scores, 0.5, "global")]
        [[1, 2], [0]]
        >>> [r.tolist() for r in top_rows(scores, 0.34, "global")]
        [[1], [0]]
    """
    flat = [s.detach().flatten().float() for s in scores]
    if scope == "per_layer":
        return [_top(s, row_count(k, s.numel())).sort().values for s in flat]
    sizes = [s.numel() for s in flat]
    chosen = _top(torch.cat([s.to(flat[0].device) for s in flat]), row_count(k, sum(sizes)))
    rows, offset = [], 0
    for size, score in zip(sizes, flat, strict=True):
        inside = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
        rows.append(inside.sort().values.to(score.device))
        offset += size
    return rows
