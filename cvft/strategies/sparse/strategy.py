"""The ``sparse`` strategy (selective fine-tuning of a budget of weight entries), its merge and inspection helpers."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies._freeze import require_head, set_trainable, temporarily_trainable
from cvft.strategies._modules import put_merged_back, set_submodule
from cvft.strategies.base import LossFn, ParameterStrategy
from cvft.strategies.registry import register_strategy
from cvft.strategies.sparse.layer import SparseDelta, SparseDeltaLayer
from cvft.strategies.sparse.selection import (
    CRITERIA,
    SCOPES,
    budget_count,
    check_selection_options,
    gradient_scores,
    selectable_layers,
    top_positions,
)
from cvft.strategies.targets import check_targets

__all__ = ["SPARSE_DELTA_ATTR", "SparseFineTune", "sparse_layers", "sparse_selection", "merge_sparse"]

_logger = logging.getLogger(__name__)

#: Attribute of the model root holding its :class:`SparseDelta` (parameter ``sparse_delta.values``).
SPARSE_DELTA_ATTR = "sparse_delta"


def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLayer]:
    """Every :class:`SparseDeltaLayer` of ``model``, by module name, in the order of their tensors."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SparseDeltaLayer)}
    return dict(sorted(layers.items(), key=lambda item: item[1].position))


def _owner(model: nn.Module) -> SparseDelta:
    owner = getattr(model, SPARSE_DELTA_ATTR, None)
    if not isinstance(owner, SparseDelta):
        raise StrategyError(f"{type(model).__name__} has no sparse update; set the 'sparse' strategy up first.")
    return owner


def sparse_selection(model: nn.Module) -> dict[str, Tensor]:
    """The updated entries of each selectable weight: ``"<layer>.weight"`` -> sorted flat indices into that weight.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> SparseFineTune(budget=10, targets="layer1.0.conv1").setup(model)
        >>> chosen = sparse_selection(model)["layer1.0.conv1.weight"]
        >>> reference = model.layer1[0].conv1.base.weight.abs().flatten().topk(10).indices
        >>> torch.equal(chosen, reference.sort().values)
        True
    """
    owner = _owner(model)
    return {f"{name}.weight": owner.local_indices(layer.position) for name, layer in sparse_layers(model).items()}


@torch.no_grad()
def merge_sparse(model: nn.Module) -> nn.Module:
    """Fold the sparse update into the base weights and remove the wrappers and ``model.sparse_delta``, in place.

    The result computes exactly what the sparse model did and has the original state-dict keys.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> keys = list(model.state_dict())
        >>> SparseFineTune(budget=0.01).setup(model)
        >>> list(merge_sparse(model).state_dict()) == keys
        True
    """
    put_merged_back(model, sparse_layers(model))
    if isinstance(getattr(model, SPARSE_DELTA_ATTR, None), SparseDelta):
        delattr(model, SPARSE_DELTA_ATTR)
    return model


@register_strategy
class SparseFineTune(ParameterStrategy):
    """Selective fine-tuning: train only a budget of entries of the base weights, chosen by a criterion.

    The frozen weights get a sparse additive update held as one flat pair, ``sparse_delta.values`` (trainable,
    zero at the start) at ``sparse_delta.indices`` (see :mod:`cvft.strategies.sparse.layer`): the model starts out
    unchanged, only the selected entries of the effective weights ever move (weight decay included, since the base
    weights are frozen), adapter files hold the values and their indices only, and :func:`merge_sparse` folds the
    update in. The classifier head trains fully (``train_head``) and is not part of the budget. There is no dense
    gradient-mask mode: decoupled weight decay moves every entry of a trainable tensor, so masking gradients alone
    would not keep the unselected entries fixed.

    Data criteria (``gradient``, ``fisher``) select by magnitude at :meth:`setup`, so that the shapes exist, and
    select again in :meth:`calibrate`, on ``calibration_batches`` training batches. cvft runs that calibration for
    you in ``ImageClassifier`` and ``StrategyCallback`` fits; :func:`~cvft.strategies.apply_strategies` needs
    ``calibration_data=``. See :mod:`cvft.strategies.sparse.selection` for the exact scores.

    Args:
        budget: Entries to train: a fraction in (0, 1) of the selectable entries (``round(budget * selectable)``),
            or an int count.
        criterion: ``"magnitude"`` (largest ``|w|``; alias ``"l1"``), ``"gradient"`` (largest accumulated
            ``|grad|`` of the task loss) or ``"fisher"`` (largest mean squared batch gradient).
        scope: ``"global"``: one top-k over all selectable entries; ``"per_tensor"``: every tensor gets the same
            fraction of its entries (the count split in proportion to sizes).
        targets: Selectable weights: ``"all"`` (every Linear and Conv2d weight outside the head) or module names,
            weight names or regexes, alone or in a list.
        calibration_batches: Batches the data criteria look at.
        train_head: Also train the classifier head (fully, outside the budget).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> SparseFineTune(budget=0.01).setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)
        ['head.bias', 'head.weight', 'sparse_delta.values']
    """

    name = "sparse"

    def __init__(
        self,
        budget: float | int = 0.01,
        criterion: Literal["magnitude", "l1", "gradient", "fisher"] = "magnitude",
        scope: Literal["global", "per_tensor"] = "global",
        targets: str | list[str] = "all",
        calibration_batches: int = 8,
        train_head: bool = True,
    ) -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise StrategyError(f"sparse: budget must be a fraction in (0, 1) or an int count, got {budget!r}.")
        if isinstance(budget, int) and budget < 1:
            raise StrategyError(f"sparse: an int budget counts entries and must be >= 1, got {budget}.")
        if isinstance(budget, float) and not 0.0 < budget < 1.0:
            raise StrategyError(
                f"sparse: a fractional budget must be in (0, 1), got {budget}; give an int for a count of entries."
            )
        check_selection_options("sparse", criterion, sorted(CRITERIA), scope, SCOPES, calibration_batches)
        targets = check_targets("sparse", targets, hint="'all' or module names / regexes")
        self.budget = budget
        self.criterion = criterion
        self.scope = scope
        self.targets = targets
        self.calibration_batches = calibration_batches
        self.train_head = bool(train_head)

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        """Whether the criterion looks at data (``gradient``, ``fisher``)."""
        return CRITERIA[self.criterion] != "magnitude"

    def setup(self, model: nn.Module) -> None:
        """Wrap the selectable layers, select by magnitude and train ``sparse_delta.values`` (and the head)."""
        if hasattr(model, SPARSE_DELTA_ATTR):
            raise StrategyError(f"sparse: {type(model).__name__} already has a `{SPARSE_DELTA_ATTR}`; set up once.")
        head = require_head(model, "sparse", self.train_head)
        names = selectable_layers(model, self.targets)
        weights = [model.get_submodule(name).weight for name in names]
        count = budget_count(self.budget, sum(w.numel() for w in weights))
        owner = SparseDelta([w.numel() for w in weights], count, dtype=weights[0].dtype, device=weights[0].device)
        owner.select(top_positions([w.abs() for w in weights], count, self.scope))
        setattr(model, SPARSE_DELTA_ATTR, owner)
        for position, name in enumerate(names):
            set_submodule(model, name, SparseDeltaLayer(model.get_submodule(name), owner, position))
        set_trainable(model, set(head) | {f"{SPARSE_DELTA_ATTR}.values"})
        self.apply_bn_policy(model)

    def calibrate(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn) -> None:
        """Select again by the data criterion, on the first ``calibration_batches`` batches; values restart at 0.

        A selection whose values were already trained (a model loaded from a checkpoint) is kept, with a warning.
        Run it in eval mode (:func:`~cvft.strategies.base.calibration_mode`); the base weights get gradients
        through ``torch.autograd.grad`` only, and their ``requires_grad`` flags are restored.
        """
        if not self.needs_data:
            return
        owner = _owner(model)
        if bool(owner.values.detach().ne(0).any()):
            _logger.warning("sparse: the sparse update is already trained; keeping its selection (no calibration).")
            return
        weights = [layer.base.weight for layer in sparse_layers(model).values()]
        with temporarily_trainable(weights):
            scores = gradient_scores(
                model, weights, batches, loss_fn, self.calibration_batches, squared=CRITERIA[self.criterion] == "fisher"
            )
        owner.select(top_positions(scores, owner.values.numel(), self.scope))
