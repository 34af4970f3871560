"""The ``supcon`` strategy: supervised contrastive fine-tuning, jointly with cross-entropy or on its own.

Plain supervised fine-tuning (the classifier's default) minimises cross-entropy on the labels. SupCon (Khosla et al.,
2020) instead pulls together the projected features of all images of a class - every augmented view included - and
pushes apart those of other classes, over the whole (global) batch. A small projection head maps the pooled features
to the space the loss acts on; it only exists during training (``model.cvft_aux``) and is dropped at export.

Two regimes:

* ``mode="joint"``: cross-entropy on both views plus ``weight`` times SupCon, in one run.
* ``mode="alone"``: SupCon only (the task loss gets weight 0), the paper's recipe: contrastive fine-tuning of the
  representation, then a linear probe on it as a second run (:func:`cvft.workflows.linear_probe_after_contrastive`).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from cvft._deprecation import moved_names
from cvft.errors import StrategyError
from cvft.strategies._modules import feature_width
from cvft.strategies.aux import add_aux_module, get_aux_module
from cvft.strategies.base import Strategy
from cvft.strategies.contrastive.distributed import distributed_supcon_loss
from cvft.strategies.outputs import StepOutputs
from cvft.strategies.registry import register_strategy

__all__ = ["SupCon", "projection_head", "PROJECTION_NAME"]

#: Name of the projection head under ``model.cvft_aux``.
PROJECTION_NAME = "supcon_projection"


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The SupCon projection MLP: ``Linear(in_dim, hidden_dim) - ReLU - Linear(hidden_dim, out_dim)``.

    Example:
        >>> import torch
        >>> projection_head(8, 8, 4)(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@register_strategy
class SupCon(Strategy):
    """Supervised contrastive fine-tuning (SupCon, L_out form) on two augmented views of every image.

    Compared with plain supervised fine-tuning (cross-entropy on the labels), SupCon shapes the representation
    directly: projections of same-class images attract and all others repel, with the negatives taken from the whole
    global batch (all processes under DDP). ``mode="joint"`` keeps the classifier's cross-entropy (on both views)
    and adds ``weight`` times SupCon; ``mode="alone"`` trains on SupCon only and is followed by a linear probe
    (:func:`cvft.workflows.linear_probe_after_contrastive`).

    This is an objective: it decides *what* the model learns from, not which parameters train. List parameter
    strategies (``linear_probe``, ``lora``, adapters ...) first and ``supcon`` after them; the projection head
    (``model.cvft_aux.supcon_projection``) always trains, whatever the parameter strategies froze. Data modules
    deliver two views per image because :attr:`num_views` is 2. Multi-label and soft (mixup) targets are refused.

    Args:
        mode: ``"joint"`` (cross-entropy + ``weight`` x SupCon) or ``"alone"`` (SupCon only, task-loss weight 0).
        weight: Weight of the SupCon term.
        temperature: Softmax temperature ``T`` of the loss.
        base_temperature: Multiply the loss by ``T / base_temperature`` as the reference code does; ``None`` (the
            default) uses ``T``, a factor of 1.
        hidden_dim: Hidden width of the projection MLP; ``None`` uses the feature width ``D``.
        out_dim: Output width of the projection MLP (the space the loss acts on).
        gather_distributed: Under ``torch.distributed`` contrast with every process's samples (the global batch).

    Example:
        >>> import timm
        >>> from cvft.strategies import apply_strategies
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> stack = apply_strategies(model, ["linear_probe", {"name": "supcon", "out_dim": 16}])
        >>> sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad})
        ['cvft_aux.supcon_projection.0', 'cvft_aux.supcon_projection.2', 'fc']
        >>> SupCon(mode="alone").task_loss_weight
        0.0
    """

    name = "supcon"
    objective = True
    needs_features = True
    num_views = 2

    def __init__(
        self,
        mode: Literal["joint", "alone"] = "joint",
        weight: float = 1.0,
        temperature: float = 0.1,
        base_temperature: float | None = None,
        hidden_dim: int | None = None,
        out_dim: int = 128,
        gather_distributed: bool = True,
    ) -> None:
        if mode not in ("joint", "alone"):
            raise StrategyError(
                f"supcon mode must be 'joint' (cross-entropy + SupCon) or 'alone' (SupCon only), got {mode!r}."
            )
        if not weight > 0:
            raise StrategyError(f"supcon weight must be > 0, got {weight}; leave 'supcon' out to train without it.")
        if not temperature > 0:
            raise StrategyError(f"supcon temperature must be > 0 (0.1 is typical), got {temperature}.")
        if base_temperature is not None and not base_temperature > 0:
            raise StrategyError(f"supcon base_temperature must be > 0 or None (= temperature), got {base_temperature}.")
        if hidden_dim is not None and hidden_dim < 1:
            raise StrategyError(f"supcon hidden_dim must be >= 1 or None (= feature width), got {hidden_dim}.")
        if out_dim < 1:
            raise StrategyError(f"supcon out_dim must be >= 1, got {out_dim}.")
        self.mode = mode
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.base_temperature = None if base_temperature is None else float(base_temperature)
        self.hidden_dim = hidden_dim
        self.out_dim = int(out_dim)
        self.gather_distributed = bool(gather_distributed)

    @property
    def task_loss_weight(self) -> float:  # type: ignore[override]
        """1.0 in ``joint`` mode, 0.0 in ``alone`` mode (SupCon only)."""
        return 0.0 if self.mode == "alone" else 1.0

    def setup(self, model: nn.Module) -> None:
        """Attach the projection head as ``model.cvft_aux.supcon_projection`` (trainable); nothing else changes."""
        dim = feature_width(model, needed_by="Strategy 'supcon'")
        head = add_aux_module(model, PROJECTION_NAME, projection_head(dim, self.hidden_dim or dim, self.out_dim))
        head.requires_grad_(True)

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """``{"contrastive": weight * SupCon}`` over the projected features of every view in the (global) batch."""
        head = get_aux_module(model, PROJECTION_NAME)
        if head is None:
            raise StrategyError("Strategy 'supcon' was not set up on this model: call setup(model) first.")
        if outputs.features is None:
            raise StrategyError(
                "Strategy 'supcon' needs the pooled features of the batch (outputs.features); the training step must "
                "compute them when a strategy sets needs_features (ImageClassifier does)."
            )
        if outputs.targets is None:
            raise StrategyError("Strategy 'supcon' needs labelled batches (images, targets); got no targets.")
        projections = head(outputs.features)
        loss = distributed_supcon_loss(
            projections, outputs.targets, self.temperature, self.base_temperature, gather=self.gather_distributed
        )
        return {"contrastive": self.weight * loss}


__getattr__ = moved_names(__name__, {"linear_probe_after_contrastive": "cvft.workflows"})
