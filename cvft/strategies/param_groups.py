"""Named optimizer parameter groups that follow layer groups, weight-decay rules and strategy learning-rate scales.

cvft's own modules register *every* parameter, frozen ones included, in groups named
``"<layer group>/<decay|no_decay>[@<scale>]"``. PyTorch optimizers skip parameters whose gradient is ``None``, so
frozen parameters cost nothing and are never decayed, and a later unfreeze needs no new param group: the optimizer
state of a resumed run has exactly the layout of the original one.

Optimizers that only hold the trainable parameters (typical in someone else's LightningModule) are grown with
:func:`add_param_groups` instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from cvft.backbones.layer_groups import layer_groups

__all__ = [
    "no_weight_decay_names",
    "build_param_groups",
    "add_param_groups",
    "split_param_groups_by_scale",
    "optimizer_parameter_ids",
]


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: biases, norm weights (all 1-d tensors) and timm's ``no_weight_decay()``.

    Example:
        >>> import timm
        >>> names = no_weight_decay_names(timm.create_model("test_vit"))
        >>> {"cls_token", "pos_embed", "blocks.0.norm1.weight", "head.bias"} <= names
        True
    """
    skip: set[str] = set()
    declared = getattr(model, "no_weight_decay", None)
    if callable(declared):
        skip = set(declared())
    return {name for name, p in model.named_parameters() if p.ndim <= 1 or name.endswith(".bias") or name in skip}


def _scale_suffix(scale: float) -> str:
    return "" if scale == 1.0 else f"@{scale:.4g}"


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_scales: Mapping[str, float] | None = None,
    include_frozen: bool = True,
    prefix: str = "",
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into named optimizer groups.

    Args:
        model: The backbone (a timm model or any ``nn.Module``).
        lr: Base learning rate; each group gets ``lr * scale``.
        weight_decay: Applied to groups named ``.../decay``; ``.../no_decay`` groups get 0.
        lr_scales: Multipliers by parameter name (from :meth:`cvft.strategies.StrategyStack.lr_scales`).
        include_frozen: Also register parameters that do not require gradients now (see module docstring).
        prefix: Prepended to parameter names in ``param_names`` (e.g. ``"backbone."`` inside a LightningModule).

    Returns:
        Dicts with ``params``, ``param_names``, ``name``, ``lr``, ``initial_lr``, ``lr_scale`` and
        ``weight_decay``, in stem-to-head order.

    Example:
        >>> import timm
        >>> groups = build_param_groups(timm.create_model("test_resnet", num_classes=3), lr=0.1, weight_decay=0.05)
        >>> [g["name"] for g in groups][-2:]
        ['fc/decay', 'fc/no_decay']
        >>> optimizer = torch.optim.AdamW(groups)
    """
    scales = lr_scales or {}
    no_decay = no_weight_decay_names(model)
    named = dict(model.named_parameters())
    result: dict[tuple[int, bool, float], dict[str, Any]] = {}
    for group in layer_groups(model):
        for name in group.parameter_names:
            param = named[name]
            if not include_frozen and not param.requires_grad:
                continue
            decay = name not in no_decay and weight_decay > 0
            scale = float(scales.get(name, 1.0))
            key = (group.index, decay, scale)
            if key not in result:
                result[key] = {
                    "name": f"{group.name}/{'decay' if decay else 'no_decay'}{_scale_suffix(scale)}",
                    "params": [],
                    "param_names": [],
                    "lr": lr * scale,
                    "initial_lr": lr * scale,
                    "lr_scale": scale,
                    "weight_decay": weight_decay if decay else 0.0,
                }
            result[key]["params"].append(param)
            result[key]["param_names"].append(prefix + name)
    return [result[key] for key in sorted(result, key=lambda k: (k[0], not k[1], k[2]))]


def optimizer_parameter_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """``id()`` of every parameter an optimizer already holds."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def add_param_groups(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    names: Iterable[str],
    lr: float | None = None,
    lr_scales: Mapping[str, float] | None = None,
    schedulers: Iterable[Any] = (),
    weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Add the named parameters that ``optimizer`` does not hold yet, as new named groups.

    Groups are split like :func:`build_param_groups` (layer group, decay, scale). Learning-rate schedulers that
    keep per-group lists (``base_lrs``, ``LambdaLR.lr_lambdas``) are extended so they keep working.

    New groups follow the *reference group*: the first group that holds parameters of ``model`` (the first group
    when none does). They copy its other options (betas, momentum, ...), and unless given explicitly:

    * their base rate is the reference group's ``initial_lr`` (or ``lr``) divided by its ``lr_scale``;
    * their weight decay is the largest one among the groups holding parameters of ``model`` (all groups when none
      does), so that a reference group without decay (biases) does not disable it; ``.../no_decay`` groups get 0.

    Groups of other modules in the same optimizer (an auxiliary network at its own rate) do not leak into them.

    Args:
        optimizer: An optimizer built on a subset of ``model``'s parameters.
        model: The module whose parameter ``names`` refer to.
        names: Parameters to make sure the optimizer holds.
        lr: Base rate of new groups (before strategy scales), instead of the reference group's. New groups start at
            this rate times the schedule factor the reference group is at now (its ``lr / initial_lr``), so they join
            a running schedule where it stands.
        lr_scales: Multipliers by parameter name.
        schedulers: Schedulers stepping ``optimizer``.
        weight_decay: Weight decay of the new ``.../decay`` groups, instead of the inherited one.

    Returns:
        The groups that were added (empty when the optimizer already held every parameter).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> optimizer = torch.optim.AdamW(
        ...     [{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 1.0}, {"params": model.fc.parameters()}],
        ...     lr=0.01,
        ...     weight_decay=0.05,
        ... )
        >>> added = add_param_groups(optimizer, model, ["layer4.0.conv1.weight"])
        >>> [(g["name"], g["lr"], g["weight_decay"]) for g in added]
        [('cvft/layer4.0/decay', 0.01, 0.05)]
    """
    wanted = set(names)
    held = optimizer_parameter_ids(optimizer)
    missing = {n for n, p in model.named_parameters() if n in wanted and id(p) not in held}
    if not missing:
        return []
    model_ids = {id(p) for p in model.parameters()}
    holding = [g for g in optimizer.param_groups if any(id(p) in model_ids for p in g["params"])]
    reference = (holding or optimizer.param_groups)[0]
    reference_initial = reference.get("initial_lr", reference["lr"])
    base_lr = lr if lr is not None else reference_initial / reference.get("lr_scale", 1.0)
    schedule_factor = reference["lr"] / reference_initial if reference_initial else 1.0
    if weight_decay is None:
        weight_decay = max(group.get("weight_decay", 0.0) for group in holding or optimizer.param_groups)
    candidates = build_param_groups(model, base_lr, weight_decay, lr_scales, include_frozen=True)
    template = {k: v for k, v in reference.items() if k not in {"params", "param_names", "lr", "initial_lr", "name"}}
    uses_names = "param_names" in reference
    added: list[dict[str, Any]] = []
    for group in candidates:
        keep = [(p, n) for p, n in zip(group["params"], group["param_names"], strict=True) if n in missing]
        if not keep:
            continue
        new_group = {**template, **group, "params": [p for p, _ in keep], "name": f"cvft/{group['name']}"}
        new_group["lr"] = group["initial_lr"] * schedule_factor
        if uses_names:
            new_group["param_names"] = [n for _, n in keep]
        else:
            new_group.pop("param_names")
        optimizer.add_param_group(new_group)
        added.append(new_group)
    for scheduler in schedulers:
        _extend_scheduler(scheduler, added)
    return added


def _extend_scheduler(scheduler: Any, added: list[dict[str, Any]]) -> None:
    base_lrs = getattr(scheduler, "base_lrs", None)
    if isinstance(base_lrs, list):
        base_lrs.extend(g["initial_lr"] for g in added)
    for attr in ("lr_lambdas", "_last_lr"):
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and values:
            source = values[0]
            values.extend(source if attr == "lr_lambdas" else g["lr"] for g in added)


def split_param_groups_by_scale(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    lr_scales: Mapping[str, float],
    schedulers: Iterable[Any] = (),
) -> None:
    """Split each optimizer group so that every part has one learning-rate scale, and scale its rate.

    Used on optimizers built by someone else (``torch.optim.AdamW(model.parameters())``): after the split, the
    parameters of ``model`` train at ``lr * lr_scales[name]``. Schedulers are rebuilt to match the new groups.
    The split is deterministic, so running it again on a resumed run gives the same layout.
    """
    scale_by_id = {id(p): float(lr_scales.get(name, 1.0)) for name, p in model.named_parameters()}
    old_groups = list(optimizer.param_groups)
    new_groups: list[dict[str, Any]] = []
    origin: list[int] = []
    for index, group in enumerate(old_groups):
        by_scale: dict[float, list[Any]] = {}
        for param in group["params"]:
            by_scale.setdefault(scale_by_id.get(id(param), 1.0), []).append(param)
        for scale, params in by_scale.items():
            base = group.get("initial_lr", group["lr"])
            part = {k: v for k, v in group.items() if k not in {"params", "param_names"}}
            part.update(params=params, lr=group["lr"] * scale, initial_lr=base * scale, lr_scale=scale)
            if "name" in group and len(by_scale) > 1:
                part["name"] = f"{group['name']}{_scale_suffix(scale)}"
            if "param_names" in group:
                names = {id(p): n for p, n in zip(group["params"], group["param_names"], strict=True)}
                part["param_names"] = [names[id(p)] for p in params]
            new_groups.append(part)
            origin.append(index)
    if len(new_groups) == len(old_groups):
        for group, part in zip(old_groups, new_groups, strict=True):
            group.update(lr=part["lr"], initial_lr=part["initial_lr"], lr_scale=part["lr_scale"])
    else:
        optimizer.param_groups.clear()
        for part in new_groups:
            optimizer.add_param_group(part)
    for scheduler in schedulers:
        if isinstance(getattr(scheduler, "base_lrs", None), list):
            scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if isinstance(lambdas, list) and len(lambdas) == len(old_groups) != len(new_groups):
            scheduler.lr_lambdas = [lambdas[i] for i in origin]
        if isinstance(getattr(scheduler, "_last_lr", None), list):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
