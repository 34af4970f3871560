"""Multi-task classification: one shared timm backbone, one linear head per named task.

Batches are *homogeneous*: each holds images of one task, as the dict
``{"images": Tensor (B, C, H, W), "targets": Tensor, "task": str}`` that
:class:`~cvft.data.multitask.MultiTaskDataModule` produces. Single-label targets are class indices ``(B,)``,
multi-label targets are 0/1 matrices ``(B, num_classes)``. A task name (rather than an index) keeps batches
self-describing, and the dict keeps the third place of a tuple batch free for dataset indices as elsewhere in cvft.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from cvft.errors import ConfigError, CvftError
from cvft.strategies.support import TaskSupport
from cvft.tasks.base import FineTuningModule, head_param_groups
from cvft.tasks.classification import label_metrics, metric_inputs
from cvft.tasks.schedules import check_optimizer
from cvft.tasks.task_weighting import build_task_weighting

__all__ = ["MultiTaskClassifier", "check_tasks"]

_TASK_KEYS = ("num_classes", "multi_label", "label_smoothing", "class_names")
_TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_tasks(tasks: Any) -> dict[str, dict[str, Any]]:
    """Validate a task specification and return it normalised (primitives only, every key present).

    Each task is ``{"num_classes": int, "multi_label": bool = False, "label_smoothing": float = 0.0,
    "class_names": list[str] | None = None}``; names are letters, digits, ``_`` and ``-`` (they appear in metric
    names such as ``val/<task>/acc``).

    Example:
        >>> check_tasks({"shape": {"num_classes": 3}})["shape"]
        {'num_classes': 3, 'multi_label': False, 'label_smoothing': 0.0, 'class_names': ['0', '1', '2']}
    """
    if not isinstance(tasks, dict) or not tasks:
        raise CvftError(
            'tasks must be a non-empty dict of task name -> spec, e.g. {"shape": {"num_classes": 3}, '
            f'"colours": {{"num_classes": 4, "multi_label": True}}}}; got {tasks!r}.'
        )
    reserved = set(dir(nn.ModuleDict()))
    result: dict[str, dict[str, Any]] = {}
    for name, spec in tasks.items():
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or name in reserved:
            raise CvftError(
                f"Task name {name!r} is not allowed: use letters, digits, '_' and '-', and not a reserved name "
                "such as 'keys' or 'items'."
            )
        if not isinstance(spec, dict):
            raise CvftError(f"Task {name!r}: the spec must be a dict such as {{'num_classes': 3}}, got {spec!r}.")
        unknown = sorted(set(spec) - set(_TASK_KEYS))
        if unknown:
            raise CvftError(f"Task {name!r}: unknown keys {unknown}; allowed keys are {list(_TASK_KEYS)}.")
        class_names = spec.get("class_names")
        num_classes = spec.get("num_classes", len(class_names) if class_names is not None else None)
        multi_label = spec.get("multi_label", False)
        smoothing = spec.get("label_smoothing", 0.0)
        if not isinstance(multi_label, bool):
            raise CvftError(f"Task {name!r}: multi_label must be true or false, got {multi_label!r}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(
                f"Task {name!r}: num_classes must be an integer >= 2 (multi-label metrics need two labels too), got "
                f"{num_classes!r}. A single yes/no label is a two-class single-label task: num_classes=2."
            )
        if class_names is not None and len(class_names) != num_classes:
            raise CvftError(f"Task {name!r}: {len(class_names)} class_names for num_classes={num_classes}.")
        if not isinstance(smoothing, int | float) or not 0.0 <= smoothing < 1.0:
            raise CvftError(f"Task {name!r}: label_smoothing must be in [0, 1), got {smoothing!r}.")
        if multi_label and smoothing:
            raise CvftError(f"Task {name!r}: label_smoothing applies to single-label tasks only.")
        names = class_names if class_names is not None else range(num_classes)
        result[name] = {
            "num_classes": num_classes,
            "multi_label": multi_label,
            "label_smoothing": float(smoothing),
            "class_names": [str(c) for c in names],
        }
    return result


def _task_metrics(spec: dict[str, Any], prefix: str) -> MetricCollection:
    return label_metrics(spec["num_classes"], spec["multi_label"], prefix)


class MultiTaskClassifier(FineTuningModule):
    """Fine-tune one timm backbone for several classification tasks at once, one linear head per task.

    The backbone is created with ``num_classes=0`` and returns pooled features; ``heads[task]`` maps them to the
    task's logits. Per task the loss is cross-entropy (optional label smoothing) or, for multi-label tasks, binary
    cross-entropy; :mod:`cvft.tasks.task_weighting` combines them (``weighting``, ``loss_weights``).

    Parameter strategies (``linear_probe``, ``lora``, adapters, ...) act on the shared backbone, by the same names as
    for :class:`~cvft.tasks.ImageClassifier`, set up by :func:`~cvft.strategies.headless.setup_headless`: every
    strategy runs unchanged, "train the head" becomes a no-op, the task heads always train, and ``layerwise_lr``
    decays from the heads down exactly as it does for :class:`~cvft.tasks.ImageClassifier`. Strategies that calibrate on
    data (``sparse``) or add loss terms (objectives) assume a single task and are refused.

    Under DDP a step trains one task's head (the same task on every rank with
    :class:`~cvft.data.multitask.MultiTaskDataModule`), so the other heads get no gradient: use
    ``Trainer(strategy="ddp_find_unused_parameters_true", use_distributed_sampler=False)``. The result equals one
    process whose batches are the union of the ranks' batches.

    The options every task shares (``pretrained``, ``weights``, ``strategies`` for the backbone, the optimiser and
    schedule, the training toolbox; weight decay never applies to the uncertainty parameters) and ``drop_rate``
    (here on the pooled features before the task heads), ``compile`` and ``compile_mode`` are documented on
    :class:`~cvft.tasks.base.FineTuningModule`, which handles them.

    Args:
        tasks: Task name -> ``{"num_classes": int, "multi_label": bool, "label_smoothing": float,
            "class_names": list[str]}`` (see :func:`check_tasks`).
        backbone: timm model name, with an optional pretrained tag.
        weighting: ``"equal"``, ``"fixed"`` (with ``loss_weights``) or ``"uncertainty"`` (learned; Kendall et al.).
            ``None``: ``"fixed"`` when ``loss_weights`` is given, else ``"equal"``.
        loss_weights: Fixed weight by task (tasks left out weigh 1).
        lr: Peak learning rate of the backbone (times the strategies' scales), the heads and the weighting.
            ``"auto"``: Lightning's learning-rate finder picks it before the fit
            (:func:`cvft.tuning.find_learning_rate`), 3e-4 when it cannot suggest one.
        head_lr_scale: Learning-rate multiplier of the task heads and of the uncertainty parameters.
        **kwargs: The options every task shares, forwarded to :class:`~cvft.tasks.base.FineTuningModule`.

    Example:
        >>> import torch
        >>> tasks = {"shape": {"num_classes": 3}, "colours": {"num_classes": 4, "multi_label": True}}
        >>> model = MultiTaskClassifier(tasks, "test_resnet", pretrained=False, strategies=["linear_probe"])
        >>> {task: tuple(logits.shape) for task, logits in model(torch.randn(2, 3, 32, 32)).items()}
        {'shape': (2, 3), 'colours': (2, 4)}
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)
        ['heads.colours.bias', 'heads.colours.weight', 'heads.shape.bias', 'heads.shape.weight']
    """

    strategy_support = TaskSupport("MultiTaskClassifier")

    def __init__(
        self,
        tasks: dict[str, dict[str, Any]],
        backbone: str = "vit_small_patch16_224.augreg_in21k",
        *,
        weighting: Literal["equal", "fixed", "uncertainty"] | None = None,
        loss_weights: dict[str, float] | None = None,
        lr: float | Literal["auto"] = 3e-4,
        head_lr_scale: float = 1.0,
        drop_rate: float | None = None,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        tasks = check_tasks(tasks)
        self.save_task_hparams(ignore=["tasks"], check=("head_lr_scale",))
        self.hparams["tasks"] = tasks  # primitives only, so checkpoints load with weights_only
        check_optimizer(self.hparams.optimizer)
        self.build_strategy_stack()
        self.weighting = build_task_weighting(list(tasks), weighting, loss_weights)

        self.backbone = self.create_task_backbone(0)
        self.setup_strategies(headless=True)
        self.num_features = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)

        self.tasks = tasks
        self.heads = nn.ModuleDict(
            {name: nn.Linear(self.num_features, spec["num_classes"]) for name, spec in tasks.items()}
        )
        self.train_metrics = nn.ModuleDict({t: _task_metrics(s, f"train/{t}/") for t, s in tasks.items()})
        self.val_metrics = nn.ModuleDict({t: _task_metrics(s, f"val/{t}/") for t, s in tasks.items()})
        self.test_metrics = nn.ModuleDict({t: _task_metrics(s, f"test/{t}/") for t, s in tasks.items()})
        self.val_losses = nn.ModuleDict({t: MeanMetric() for t in tasks})
        self.test_losses = nn.ModuleDict({t: MeanMetric() for t in tasks})

    # ------------------------------------------------------------------ forward and loss
    def forward(self, images: Tensor, task: str | None = None) -> Tensor | dict[str, Tensor]:
        """Logits of ``task`` ``(batch, num_classes)``, or of every task as a dict when ``task`` is ``None``."""
        features = self.backbone(images)
        if task is not None:
            return self.heads[self._check_task(task)](features)
        return {name: head(features) for name, head in self.heads.items()}

    def task_loss(self, task: str, logits: Tensor, targets: Tensor) -> Tensor:
        """Unweighted loss of ``task``: cross-entropy (label smoothing) or, multi-label, binary cross-entropy."""
        spec = self.tasks[task]
        if spec["multi_label"]:
            return nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
        return nn.functional.cross_entropy(logits, targets, label_smoothing=spec["label_smoothing"])

    def _check_task(self, task: str) -> str:
        if task not in self.tasks:
            raise CvftError(f"Unknown task {task!r}; this model has tasks {list(self.tasks)}.")
        return task

    def _unpack(self, batch: Any) -> tuple[str, Tensor, Tensor]:
        if not isinstance(batch, dict) or not {"images", "targets", "task"} <= set(batch):
            raise CvftError(
                "MultiTaskClassifier expects batches {'images': ..., 'targets': ..., 'task': <task name>} of one "
                "task each, as MultiTaskDataModule makes them."
            )
        task = batch["task"]
        if isinstance(task, list | tuple):  # a collate that kept one name per sample
            if len(set(task)) != 1:
                raise CvftError(f"A batch mixes tasks {sorted(set(task))}; every batch must hold one task.")
            task = task[0]
        return self._check_task(task), batch["images"], batch["targets"]

    def _metric_inputs(self, task: str, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return metric_inputs(logits, targets, self.tasks[task]["multi_label"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The weighted loss of the batch's task; logs ``train/<task>/loss`` (unweighted) and ``train/loss``."""
        task, images, targets = self._unpack(batch)
        logits = self(images, task)
        size = len(images)
        task_loss = self.task_loss(task, logits, targets)
        loss = self.weighting(task, task_loss)
        self.log(f"train/{task}/loss", task_loss, on_epoch=True, on_step=False, batch_size=size)
        self.log(f"train/{task}/weight", self.weighting.weight(task), on_epoch=True, on_step=False, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, on_step=True, batch_size=size)
        metrics = self.train_metrics[task]
        metrics.update(*self._metric_inputs(task, logits.detach(), targets))
        self.log_dict(metrics, on_epoch=True, on_step=False, batch_size=size)
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> Tensor:
        task, images, targets = self._unpack(batch)
        logits = self(images, task)
        loss = self.task_loss(task, logits, targets)
        losses = self.val_losses if stage == "val" else self.test_losses
        losses[task].update(loss, weight=len(images))
        metrics = (self.val_metrics if stage == "val" else self.test_metrics)[task]
        metrics.update(*self._metric_inputs(task, logits, targets))
        self.log_dict(metrics, prog_bar=False, batch_size=len(images), add_dataloader_idx=False)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Loss and metrics of the batch's task (one val dataloader per task, or one mixing homogeneous batches)."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Test loss and metrics of the batch's task."""
        return self._evaluate(batch, "test")

    def _log_losses(self, losses: nn.ModuleDict, stage: str) -> None:
        values = []
        for task, metric in losses.items():
            if metric.update_called:
                value = metric.compute()
                values.append(value)
                self.log(f"{stage}/{task}/loss", value)
            metric.reset()
        if values:  # the unweighted mean over tasks, for checkpoint selection
            self.log(f"{stage}/loss", torch.stack(values).mean(), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<task>/loss`` and their mean ``val/loss``."""
        self._log_losses(self.val_losses, "val")

    def on_test_epoch_end(self) -> None:
        """Log ``test/<task>/loss`` and their mean ``test/loss``."""
        self._log_losses(self.test_losses, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Probabilities of every task (softmax, or sigmoid for multi-label ones), by task name."""
        images = batch["images"] if isinstance(batch, dict) else batch[0]
        return {
            task: logits.sigmoid() if self.tasks[task]["multi_label"] else logits.softmax(-1)
            for task, logits in self(images).items()
        }

    # ------------------------------------------------------------------ optimizer
    def param_groups(self) -> list[dict[str, Any]]:
        """Named optimizer groups: the backbone's (layer group x decay x strategy scale), heads, weighting."""
        hp = self.hparams
        heads = [(f"heads.{name}", p) for name, p in self.heads.named_parameters()]
        weighting = [(f"weighting.{name}", p) for name, p in self.weighting.named_parameters()]
        no_decay = {name for name, p in heads if p.ndim <= 1} | {name for name, _ in weighting}
        head_groups = head_param_groups("heads", heads + weighting, no_decay, hp.lr, hp.weight_decay, hp.head_lr_scale)
        return super().param_groups() + head_groups
