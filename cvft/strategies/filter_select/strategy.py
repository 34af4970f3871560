"""The ``filter_select`` strategy (structured selective fine-tuning of whole filters), its merge and inspection."""

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
from cvft.strategies.filter_select.layer import FilterDeltaLayer
from cvft.strategies.filter_select.selection import (
    CRITERIA,
    SCOPES,
    bn_scale_scores,
    filter_layers,
    l1_scores,
    taylor_scores,
    top_rows,
)
from cvft.strategies.registry import register_strategy
from cvft.strategies.sparse.selection import check_selection_options
from cvft.strategies.targets import check_targets

__all__ = ["FilterSelect", "filter_select_layers", "filter_selection", "merge_filter_select"]

_logger = logging.getLogger(__name__)


def filter_select_layers(model: nn.Module) -> dict[str, FilterDeltaLayer]:
    """Every :class:`FilterDeltaLayer` of ``model``, by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FilterDeltaLayer)}


def filter_selection(model: nn.Module) -> dict[str, Tensor]:
    """The trained rows of each targeted weight: ``"<layer>.weight"`` -> sorted output-row indices.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> FilterSelect(k=0.25, targets="layer1.0.conv1").setup(model)
        >>> chosen = filter_selection(model)["layer1.0.conv1.weight"]
        >>> l1 = model.layer1[0].conv1.base.weight.abs().sum(dim=(1, 2, 3))
        >>> torch.equal(chosen, l1.topk(chosen.numel()).indices.sort().values)
        True
    """
    return {f"{name}.weight": layer.rows for name, layer in filter_select_layers(model).items()}


@torch.no_grad()
def merge_filter_select(model: nn.Module) -> nn.Module:
    """Fold the row deltas into the base weights (and biases) and put the original layers back, in place.

    The result computes exactly what the model with row deltas did and has the original state-dict keys.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=3).eval()
        >>> keys = list(model.state_dict())
        >>> FilterSelect(k=0.1).setup(model)
        >>> _ = [p.data.normal_(0, 0.01) for p in model.parameters() if p.requires_grad]  # as if trained
        >>> images = torch.randn(2, 3, 32, 32)
        >>> tuned = model(images)
        >>> merged = merge_filter_select(model)
        >>> list(merged.state_dict()) == keys, torch.allclose(merged(images), tuned, atol=1e-5)
        (True, True)
    """
    put_merged_back(model, filter_select_layers(model))
    return model


@register_strategy
class FilterSelect(ParameterStrategy):
    r"""Structured selective fine-tuning: train whole output rows (conv filters, Linear output features) of the weights.

    Each targeted layer is wrapped in a :class:`~cvft.strategies.filter_select.layer.FilterDeltaLayer`: its weight
    stays frozen, and a trainable ``delta`` of shape ``(selected rows, *row shape)`` is added to the selected rows,
    whose indices the layer keeps in its ``rows`` buffer. The model starts out unchanged, rows outside the selection
    never move (weight decay included), adapter files hold ``delta`` and ``rows`` per layer (plus the head), and
    :func:`merge_filter_select` folds the deltas in, giving back the plain layers. A whole filter is cheap to store
    (an index and a row) and to apply (one ``index_add``), unlike the scattered entries of ``sparse``.

    Biases of the selected rows stay frozen by default: the method selects filters of the weight, and in CNNs a
    BatchNorm follows most convolutions, which then have no bias. ``train_bias=True`` adds a ``bias_delta`` (one
    entry per selected row) to the layers that have a bias.

    ``taylor`` looks at data: it selects by ``l1`` at :meth:`setup`, so that the shapes exist, and selects again in
    :meth:`calibrate` on ``calibration_batches`` training batches (cvft runs it in ``ImageClassifier`` and
    ``StrategyCallback`` fits; :func:`~cvft.strategies.apply_strategies` needs ``calibration_data=``). With
    ``scope="global"`` the number of rows of each layer depends on the scores; the deltas are resized in place, and
    state dicts and adapter files of another selection resize them on loading. See
    :mod:`cvft.strategies.filter_select.selection` for the exact scores and counts.

    Args:
        k: Fraction of the output rows to train, in (0, 1]: of each targeted layer (``per_layer``, at least one row
            each) or of all targeted layers together (``global``).
        criterion: ``"l1"`` (largest filter L1 norm), ``"bn_scale"`` (largest ``|gamma|`` of the BatchNorm directly
            after the layer; every targeted layer needs one) or ``"taylor"`` (largest first-order Taylor importance
            ``sum_b |sum_row w * grad|`` on calibration batches).
        scope: ``"per_layer"``: the top ``k`` rows of every layer; ``"global"``: the top ``k`` of all rows at once.
        targets: Layers whose rows may train: ``"all"`` (every Linear and Conv2d outside the head), a named selector
            (``"pointwise"``, ``"attention"`` ...), or module names, weight names or regexes, alone or in a list.
        calibration_batches: Batches ``taylor`` looks at.
        train_bias: Also train the biases of the selected rows (where the layer has a bias).
        train_head: Also train the classifier head (fully, outside the budget).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> FilterSelect(k=0.25, targets=r"layer1\.0\.conv\d").setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)
        ['fc.bias', 'fc.weight', 'layer1.0.conv1.delta', 'layer1.0.conv2.delta']
        >>> tuple(model.layer1[0].conv1.delta.shape), model.layer1[0].conv1.base.weight.shape[0]
        ((8, 32, 3, 3), 32)
    """

    name = "filter_select"

    def __init__(
        self,
        k: float = 0.1,
        criterion: Literal["l1", "bn_scale", "taylor"] = "l1",
        scope: Literal["per_layer", "global"] = "per_layer",
        targets: str | list[str] = "all",
        calibration_batches: int = 8,
        train_bias: bool = False,
        train_head: bool = True,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k <= 1.0:
            raise StrategyError(
                f"filter_select: k is the fraction of output rows (filters) to train and must be in (0, 1], got "
                f"{k!r}; e.g. k=0.1 trains the top 10% of the filters."
            )
        check_selection_options("filter_select", criterion, CRITERIA, scope, SCOPES, calibration_batches)
        self.k = float(k)
        self.criterion = criterion
        self.scope = scope
        self.targets = check_targets("filter_select", targets, hint="'all', a named selector or module names / regexes")
        self.calibration_batches = calibration_batches
        self.train_bias = bool(train_bias)
        self.train_head = bool(train_head)

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        """Whether the criterion looks at data (``taylor``)."""
        return self.criterion == "taylor"

    def setup(self, model: nn.Module) -> None:
        """Score the targeted layers' rows (``l1`` for ``taylor`` until calibrated), wrap them and train the deltas."""
        if filter_select_layers(model):
            raise StrategyError(f"filter_select: {type(model).__name__} already has row deltas; set it up once.")
        head = require_head(model, "filter_select", self.train_head)
        names = filter_layers(model, self.targets)
        layers = [model.get_submodule(name) for name in names]
        if self.criterion == "bn_scale":
            scores = bn_scale_scores(model, names)
        else:
            scores = l1_scores([layer.weight for layer in layers])
        trainable = set(head)
        for name, layer, rows in zip(names, layers, top_rows(scores, self.k, self.scope), strict=True):
            wrapper = FilterDeltaLayer(layer, rows, train_bias=self.train_bias)
            set_submodule(model, name, wrapper)
            trainable |= {f"{name}.{param}" for param, _ in wrapper.named_parameters(recurse=False)}
        set_trainable(model, trainable)
        self.apply_bn_policy(model)

    def calibrate(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn) -> None:
        """Select again by ``taylor`` on the first ``calibration_batches`` batches; the deltas restart at zero.

        A selection whose deltas were already trained (a model loaded from a checkpoint) is kept, with a warning.
        Run it in eval mode (:func:`~cvft.strategies.base.calibration_mode`); the base weights get gradients through
        ``torch.autograd.grad`` only, and their ``requires_grad`` flags are restored.

        Raises:
            StrategyError: The model has no row deltas (``setup`` did not run) or the data yields no batch.
        """
        if not self.needs_data:
            return
        layers = list(filter_select_layers(model).values())
        if not layers:
            raise StrategyError(f"{type(model).__name__} has no row deltas; set the 'filter_select' strategy up first.")
        if any(bool(p.detach().ne(0).any()) for layer in layers for p in layer.parameters(recurse=False)):
            _logger.warning(
                "filter_select: the row deltas are already trained; keeping their selection (no calibration)."
            )
            return
        weights = [layer.base.weight for layer in layers]
        with temporarily_trainable(weights):
            scores = taylor_scores(model, weights, batches, loss_fn, self.calibration_batches)
        for layer, rows in zip(layers, top_rows(scores, self.k, self.scope), strict=True):
            layer.select(rows)
