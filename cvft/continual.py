"""Fine-tune one backbone on a sequence of tasks and measure how much it forgets.

Setting: *task-incremental* learning with one head per task (Li & Hoiem's multi-head protocol). Tasks ``A, B, C``
each have their own label space and head; the shared backbone is fine-tuned task after task, and at test time the
task of an image is known, so it is classified by its own task's head. After training task ``i`` every task seen
so far is evaluated, giving the accuracy matrix ``R[i][j]`` (accuracy on task ``j`` after training task ``i``).

From ``R`` (``T`` tasks, last row ``T - 1``) the report gives:

* average accuracy ``mean_j R[T-1][j]``;
* forgetting of task ``j < T-1``: ``max_{k < T-1} R[k][j] - R[T-1][j]`` (Chaudhry et al., 2018), and its mean;
* backward transfer ``BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])`` (Lopez-Paz & Ranzato, 2017); negative values
  are forgetting.

Training is a plain loop (documented in :func:`run_continual`): AdamW, cross-entropy of the task's head, plus the
loss terms of the method's strategy; parameter strategies (``lora``, ``linear_probe``, ``layerwise_lr``) decide
what of the backbone trains.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cvft.adapter_files import adapter_state_dict
from cvft.backbones import create_backbone
from cvft.errors import StrategyError
from cvft.strategies.base import Strategy, StrategyStack
from cvft.strategies.continual import ContinualStrategy, MultiHeadNet
from cvft.strategies.outputs import StepOutputs
from cvft.strategies.registry import StrategySpec, build_strategies, build_strategy

__all__ = ["ContinualTask", "ContinualResult", "run_continual", "METHODS"]

#: Methods ``run_continual`` knows by name; any registered objective strategy (or a spec of one) also works.
METHODS = ("finetune", "l2sp", "ewc", "lwf", "adapter_per_task")


class ContinualTask(NamedTuple):
    """One task of a sequence: a name, ``(images, targets)`` loaders and its number of classes."""

    name: str
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int


@dataclass
class ContinualResult:
    """Accuracy matrix of a task sequence and the forgetting measures derived from it.

    Attributes:
        method: The method's name.
        task_names: Tasks in training order.
        accuracy: ``accuracy[i][j]`` = accuracy on task ``j`` after training task ``i`` (NaN for ``j > i``).

    Example:
        >>> nan = float("nan")
        >>> result = ContinualResult("finetune", ["A", "B"], [[0.9, nan], [0.6, 0.8]])
        >>> round(result.average_accuracy, 3), [round(f, 3) for f in result.forgetting], round(result.bwt, 3)
        (0.7, [0.3], -0.3)
    """

    method: str
    task_names: list[str]
    accuracy: list[list[float]] = field(default_factory=list)

    @property
    def final(self) -> list[float]:
        """Accuracy on every task after the last one, ``R[T-1][:]``."""
        return list(self.accuracy[-1])

    @property
    def average_accuracy(self) -> float:
        """Mean final accuracy over all tasks."""
        return sum(self.final) / len(self.final)

    @property
    def forgetting(self) -> list[float]:
        """Per earlier task ``j``: best accuracy before the last task minus the final accuracy."""
        last = len(self.accuracy) - 1
        return [max(self.accuracy[k][j] for k in range(j, last)) - self.accuracy[last][j] for j in range(last)]

    @property
    def average_forgetting(self) -> float:
        """Mean of :attr:`forgetting` (0 for a single task)."""
        values = self.forgetting
        return sum(values) / len(values) if values else 0.0

    @property
    def bwt(self) -> float:
        """Backward transfer ``mean_{j<T-1} (R[T-1][j] - R[j][j])``; negative means forgetting."""
        last = len(self.accuracy) - 1
        values = [self.accuracy[last][j] - self.accuracy[j][j] for j in range(last)]
        return sum(values) / len(values) if values else 0.0

    def table(self) -> str:
        """The matrix and the summary measures as aligned text."""
        width = max(8, *(len(name) + 2 for name in self.task_names))
        lines = [f"method: {self.method}", "after".ljust(width) + "".join(n.rjust(width) for n in self.task_names)]
        for name, row in zip(self.task_names, self.accuracy, strict=True):
            cells = "".join(("-" if math.isnan(v) else f"{v:.3f}").rjust(width) for v in row)
            lines.append(name.ljust(width) + cells)
        forgetting = "".join(f"{v:.3f}".rjust(width) for v in self.forgetting)
        lines.append("forget".ljust(width) + forgetting)
        lines.append(
            f"avg acc {self.average_accuracy:.3f}  avg forgetting {self.average_forgetting:.3f}  BWT {self.bwt:.3f}"
        )
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        """Write ``after_task, <task columns>`` rows, then forgetting and the summary, to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["after_task", *self.task_names])
            for name, row in zip(self.task_names, self.accuracy, strict=True):
                writer.writerow([name, *("" if math.isnan(v) else f"{v:.6f}" for v in row)])
            writer.writerow(["forgetting", *(f"{v:.6f}" for v in self.forgetting), ""])
            writer.writerow(["average_accuracy", f"{self.average_accuracy:.6f}"])
            writer.writerow(["average_forgetting", f"{self.average_forgetting:.6f}"])
            writer.writerow(["bwt", f"{self.bwt:.6f}"])
        return path


def _method_strategy(method: str | StrategySpec) -> tuple[str, Strategy | None]:
    if method in ("finetune", "sequential", None):
        return "finetune", None
    if method == "adapter_per_task":
        return "adapter_per_task", None
    strategy = build_strategy(method)
    if not isinstance(strategy, ContinualStrategy):
        raise StrategyError(
            f"run_continual: method {strategy.name!r} is not a continual objective; choose one of {', '.join(METHODS)} "
            "and put parameter strategies (lora, linear_probe) in `strategies=`."
        )
    return strategy.name, strategy


@torch.no_grad()
def _accuracy(net: MultiHeadNet, loader: DataLoader, device: torch.device) -> float:
    correct = total = 0
    for batch in loader:
        images, targets = batch[0].to(device), batch[1].to(device)
        correct += int((net(images).argmax(-1) == targets).sum())
        total += len(targets)
    return correct / max(total, 1)


def _optimizer(net: MultiHeadNet, stack: StrategyStack, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    scales = {f"backbone.{name}": scale for name, scale in stack.lr_scales(net.backbone).items()}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in net.named_parameters():  # every parameter: frozen ones get no gradient, cost nothing
        groups.setdefault(scales.get(name, 1.0), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr * scale} for scale, params in groups.items()], lr=lr, weight_decay=weight_decay
    )


def _copy_into(net: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)


def run_continual(
    backbone: str | nn.Module,
    tasks: Sequence[ContinualTask | tuple[str, DataLoader, DataLoader, int]],
    method: str | StrategySpec = "finetune",
    epochs: int = 1,
    lr: float = 1e-3,
    strategies: StrategySpec | Sequence[StrategySpec] | None = None,
    weight_decay: float = 0.0,
    pretrained: bool = False,
    weights: str | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    output_dir: str | Path | None = None,
    verbose: bool = True,
) -> ContinualResult:
    """Fine-tune a shared backbone on ``tasks`` in order (one head per task) and report forgetting.

    The loop, per task ``t``: set the active head to ``t``; the method's strategy hears
    :meth:`~cvft.strategies.continual.ContinualStrategy.begin_task`; a fresh AdamW (``lr``, ``weight_decay``,
    learning-rate scales of the parameter strategies) trains for ``epochs`` epochs on cross-entropy of head ``t``
    plus the strategy's loss terms (parameter strategies' ``on_epoch_start`` runs each epoch); then
    :meth:`~cvft.strategies.continual.ContinualStrategy.consolidate` runs on the task's training loader and every
    task seen so far is evaluated (eval mode, its own head) into ``R[t][:]``.

    Methods: ``"finetune"`` (plain sequential fine-tuning), ``"l2sp"``, ``"ewc"``, ``"lwf"`` or a spec with
    arguments (``{"name": "ewc", "lam": 1000}``), and ``"adapter_per_task"``: each task trains its own copy of the
    trainable tensors and updating BatchNorm statistics (a LoRA adapter by default; configure it with
    ``strategies=[{"name": "lora", "train_head": False, ...}]``) from the same initial values, and evaluation puts
    each task's copy back, so forgetting is zero by construction.

    Args:
        backbone: timm name (built with ``num_classes=0``) or a headless timm model.
        tasks: ``(name, train_loader, val_loader, num_classes)`` per task, in training order.
        method: See above.
        epochs: Epochs per task.
        lr: AdamW learning rate.
        strategies: Parameter strategies on the headless backbone (``None``: full fine-tuning); the task heads
            always train, so pass ``train_head=False`` to strategies that take it (``lora``).
        weight_decay: AdamW's decoupled weight decay.
        pretrained: Load timm's pretrained weights (when ``backbone`` is a name).
        weights: Local weights file or built-in source (when ``backbone`` is a name).
        backbone_kwargs: Extra ``timm.create_model`` arguments (``{"img_size": 32}``).
        device: Where to train.
        seed: Seed of the heads' initialisation (and everything random after it).
        output_dir: If given, write ``continual_<method>.csv`` there.
        verbose: Print the table.

    Returns:
        The :class:`ContinualResult`.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 2)
        >>> tasks = [(name, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8), 2) for name in "AB"]
        >>> result = run_continual("test_resnet", tasks, method="ewc", verbose=False)
        >>> len(result.accuracy), len(result.forgetting)
        (2, 1)
    """
    tasks = [ContinualTask(*task) for task in tasks]
    if not tasks:
        raise StrategyError("run_continual needs at least one task.")
    method_name, objective = _method_strategy(method)
    specs = build_strategies(strategies)
    if method_name == "adapter_per_task" and not specs:
        specs = build_strategies({"name": "lora", "train_head": False})
    parameter_stack = StrategyStack([s for s in specs if not s.objective])
    objectives = StrategyStack([s for s in specs if s.objective] + ([objective] if objective else []))

    device = torch.device(device)
    torch.manual_seed(seed)
    if isinstance(backbone, str):
        backbone = create_backbone(
            backbone, pretrained=pretrained, weights=weights, num_classes=0, **dict(backbone_kwargs or {})
        )
    net = MultiHeadNet(backbone, [task.num_classes for task in tasks]).to(device)
    parameter_stack.setup(net.backbone)
    objectives.setup(net)

    per_task = method_name == "adapter_per_task"
    initial_adapter = {k: v.clone() for k, v in adapter_state_dict(net.backbone).items()} if per_task else {}
    adapters: list[dict[str, Tensor]] = []

    nan = float("nan")
    result = ContinualResult(method_name, [task.name for task in tasks])
    for index, task in enumerate(tasks):
        net.active_task = index
        if per_task:
            _copy_into(net.backbone, initial_adapter)
        for strategy in objectives:
            if isinstance(strategy, ContinualStrategy):
                strategy.begin_task(net, index)
        optimizer = _optimizer(net, parameter_stack, lr, weight_decay)
        for epoch in range(epochs):
            parameter_stack.on_epoch_start(net.backbone, epoch)
            net.train()
            for batch in task.train_loader:
                images, targets = batch[0].to(device), batch[1].to(device)
                features = net.forward_features(images)
                logits = net.heads[index](features)
                loss = F.cross_entropy(logits, targets) * objectives.task_loss_weight
                outputs = StepOutputs(logits, images, targets, features)
                for term in objectives.loss_terms(net, batch, outputs).values():
                    loss = loss + term
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for strategy in objectives:
            if isinstance(strategy, ContinualStrategy):
                strategy.consolidate(net, task.train_loader, F.cross_entropy)
        if per_task:
            adapters.append({k: v.detach().clone() for k, v in adapter_state_dict(net.backbone).items()})

        net.eval()
        row = []
        for seen in range(index + 1):
            if per_task:
                _copy_into(net.backbone, adapters[seen])
            net.active_task = seen
            row.append(_accuracy(net, tasks[seen].val_loader, device))
        result.accuracy.append(row + [nan] * (len(tasks) - index - 1))

    if verbose:
        print(result.table())
    if output_dir is not None:
        result.to_csv(Path(output_dir) / f"continual_{method_name}.csv")
    return result
