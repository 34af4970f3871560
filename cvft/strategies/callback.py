"""Strategies as a Lightning ``Callback`` on any LightningModule, not only cvft's own."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies._ddp import LateGradientSync
from cvft.strategies.base import ADAPTER_BUFFERS_ATTR, LossFn, StrategyStack
from cvft.strategies.outputs import StepBatch
from cvft.strategies.param_groups import add_param_groups, split_param_groups_by_scale
from cvft.strategies.registry import StrategySpec, build_strategies

__all__ = ["AddedGroupOptions", "StrategyCallback", "find_backbone", "training_batches", "calibrate_before_fit"]


def find_backbone(pl_module: nn.Module, module_attr: str | None = None) -> nn.Module:
    """The sub-module strategies act on: ``module_attr`` if given, else the first timm model inside ``pl_module``.

    A timm model is recognised by its ``get_classifier()`` method; without one, the whole module is used.

    Raises:
        StrategyError: ``module_attr`` names no sub-module, or ``pl_module`` has no parameters yet.
    """
    too_late = (
        "The network must exist when the Trainer sets callbacks up: build it in __init__ or in configure_model, "
        "not in the LightningModule's setup hook (Lightning calls it after the callbacks' setup)."
    )
    if module_attr is not None:
        try:
            return pl_module.get_submodule(module_attr)
        except AttributeError:
            children = ", ".join(name for name, _ in pl_module.named_children())
            raise StrategyError(
                f"StrategyCallback(module_attr={module_attr!r}): {type(pl_module).__name__} has no such sub-module. "
                + (f"Its children are: {children}." if children else f"It has no sub-modules yet. {too_late}")
            ) from None
    for module in pl_module.modules():
        if callable(getattr(module, "get_classifier", None)) and module is not pl_module:
            return module
    if next(pl_module.parameters(), None) is None:
        raise StrategyError(f"{type(pl_module).__name__} has no parameters for the strategies to act on. {too_late}")
    return pl_module


def training_batches(trainer: pl.Trainer) -> Iterable[Any]:
    """The training DataLoader of the fit being set up (given to ``fit`` directly, or from a (data)module hook).

    Usable in ``setup`` hooks, before Lightning builds its own training loader. A collection of loaders gives its
    first one.

    Raises:
        StrategyError: The fit has no training data source.
    """
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is not None and source.is_defined():
        loader = source.dataloader()
    elif trainer.datamodule is not None:
        loader = trainer.datamodule.train_dataloader()
    else:
        loader = None
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)) and loader and not isinstance(loader[0], Tensor):
        loader = loader[0]
    if loader is None:
        raise StrategyError(
            "A strategy needs training batches to calibrate, but this fit has no training dataloader; pass "
            "train_dataloaders=... or a datamodule to Trainer.fit."
        )
    return loader


def _calibration_device(trainer: pl.Trainer) -> torch.device | None:
    """Where calibration runs: the root device of single-device and DDP runs, else ``None`` (stay put).

    Lightning moves the model to the root device right after ``setup`` anyway; sharded strategies place it themselves.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        return trainer.strategy.root_device
    return None


def calibrate_before_fit(
    trainer: pl.Trainer, pl_module: pl.LightningModule, backbone: nn.Module, stack: StrategyStack, loss_fn: LossFn
) -> bool:
    """Calibrate ``stack``'s data-dependent strategies on the fit's training batches, from a ``setup`` hook.

    Nothing happens when no strategy needs data or when the fit resumes from a checkpoint (``ckpt_path``): then the
    choices (e.g. sparse indices) are restored with the model's state dict, which Lightning loads right after
    ``setup``. Under DDP, every rank calibrates and then takes rank 0's choices (the buffers modules list in
    ``adapter_buffer_names``), so that all ranks train the same entries.

    Returns:
        Whether a calibration ran.
    """
    if not stack.needs_data or trainer.ckpt_path is not None:
        return False
    device = _calibration_device(trainer)
    if device is not None:
        pl_module.to(device)
    stack.calibrate(backbone, training_batches(trainer), loss_fn)
    if trainer.world_size > 1:
        _share_choices_of_rank_zero(trainer, backbone)
    return True


def _share_choices_of_rank_zero(trainer: pl.Trainer, backbone: nn.Module) -> None:
    with torch.no_grad():
        for module in backbone.modules():
            for name in getattr(module, ADAPTER_BUFFERS_ATTR, ()):
                buffer = getattr(module, name)
                buffer.copy_(trainer.strategy.broadcast(buffer.cpu(), src=0).to(buffer.device))


class StrategyCallback(pl.Callback):
    """Apply fine-tuning strategies to someone else's LightningModule.

    * ``setup``: strategies are set up on the backbone before the optimizer exists (modules injected, freezing);
      strategies that choose from data calibrate on the first training batches (not when resuming). A module that
      builds its network in Lightning's ``configure_model`` hook (which runs after every ``setup``) gets the
      strategies right after that hook instead, still before ``configure_optimizers``.
    * ``on_fit_start``: the groups of the optimizer that trains the backbone are split by the strategies'
      learning-rate scales.
    * ``on_train_epoch_start``: schedules run; parameters that became trainable and are missing from the optimizer
      are added to it as *named* param groups (``cvft/<layer group>/<decay>``), and per-group schedulers are extended.
    * Checkpoints record the added groups; on resume they are re-created before Lightning restores the optimizer
      state, so the optimizer and the unfreeze schedule continue exactly where they stopped.
    * Under DDP, gradients of parameters unfrozen after wrapping are averaged across ranks.

    Only one optimizer trains the backbone: the one that already holds backbone parameters, the only optimizer, or
    the one ``optimizer_index`` names. Other optimizers (an auxiliary network's, a discriminator's) are left alone,
    and so are parameters that another optimizer holds.

    Added groups follow the optimizer's group that holds the backbone's parameters (its base rate, its largest
    weight decay and its other options, see :func:`~cvft.strategies.param_groups.add_param_groups`), unless
    ``added_lr`` / ``added_weight_decay`` are given.

    Strategies that add loss terms need the module's help: call :meth:`loss_terms` in ``training_step``. Strategies
    that take their own steps (``ppo``, ``trpo``; :attr:`steps_itself`) need manual optimisation and a call to
    :meth:`optimisation_step` instead.

    Args:
        strategies: Names, ``{"name": ..., **kwargs}`` mappings or strategy instances, applied in order.
        module_attr: Attribute path of the backbone inside the LightningModule (``"model"``, ``"net.encoder"``).
            By default the first timm model found.
        calibration_loss: ``loss_fn(backbone(images), targets)`` for strategies that calibrate on data
            (cross-entropy by default).
        optimizer_index: Position, in the list ``configure_optimizers`` returns, of the optimizer that trains the
            backbone. Needed only when it is ambiguous: several optimizers hold backbone parameters, or none does
            and there are several.
        added_lr: Base learning rate of added param groups (times the strategies' scales and the running schedule's
            factor). ``None``: that of the group holding the backbone's parameters.
        added_weight_decay: Weight decay of added param groups (never on biases and norms). ``None``: the largest
            among the groups holding the backbone's parameters.

    Example:
        >>> import lightning.pytorch as pl, timm, torch
        >>> class MyModule(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = timm.create_model("test_resnet", num_classes=3)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)
        >>> callback = StrategyCallback([{"name": "gradual_unfreeze", "milestones": [1]}])
        >>> callback.setup(pl.Trainer(logger=False), MyModule(), "fit")
    """

    def __init__(
        self,
        strategies: StrategySpec | Iterable[StrategySpec],
        module_attr: str | None = None,
        calibration_loss: LossFn | None = None,
        optimizer_index: int | None = None,
        added_lr: float | None = None,
        added_weight_decay: float | None = None,
    ) -> None:
        self.added_groups = AddedGroupOptions(optimizer_index, added_lr, added_weight_decay)
        self.stack = StrategyStack(build_strategies(strategies))
        self.module_attr = module_attr
        self.calibration_loss = calibration_loss
        self._calibrated = False
        self._backbone: nn.Module | None = None
        self._target_index: int | None = None
        self._added_events: list[list[str]] = []
        self._restored_events: list[list[str]] = []
        self._restored_epoch: int | None = None
        self._grad_sync = LateGradientSync()

    @property
    def state_key(self) -> str:
        """Key in the checkpoint; includes the strategy names so several callbacks can coexist."""
        return f"StrategyCallback[{','.join(s.name for s in self.stack)}]"

    @property
    def backbone(self) -> nn.Module:
        """The module the strategies act on (available after ``setup``, or after ``configure_model``)."""
        if self._backbone is None:
            raise StrategyError("StrategyCallback has not been set up yet; it runs when the Trainer starts.")
        return self._backbone

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Set the strategies up on the backbone once, before optimizers exist; calibrate at the first fit.

        When the module overrides ``configure_model``, the network may not exist yet (Lightning calls that hook after
        every ``setup``): the set-up then runs right after it.
        """
        if self._backbone is not None:
            self._calibrate_once(trainer, pl_module, stage)
        elif is_overridden("configure_model", pl_module, pl.LightningModule):
            _run_after_configure_model(pl_module, lambda: self._set_up(trainer, pl_module, stage))
        else:
            self._set_up(trainer, pl_module, stage)

    def _set_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._backbone = find_backbone(pl_module, self.module_attr)
        self.stack.setup(self._backbone)
        if not is_overridden("configure_model", pl_module, pl.LightningModule):
            self._calibrate_once(trainer, pl_module, stage)
        # else: configure_model runs under Lightning's device / dtype contexts, no place to iterate a DataLoader;
        # calibration waits for on_fit_start (it changes buffers and values in place, not the optimizer's layout)

    def _calibrate_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not self._calibrated:
            self._calibrated = True
            loss_fn = self.calibration_loss or F.cross_entropy
            calibrate_before_fit(trainer, pl_module, self.backbone, self.stack, loss_fn)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Split optimizer groups by learning-rate scale and re-create groups added before a checkpoint."""
        self._calibrate_once(trainer, pl_module, "fit")
        self._grad_sync.capture(pl_module)
        self._target_index = self._backbone_optimizer_index(trainer.optimizers)
        if self._restored_events:
            self.stack.on_epoch_start(self.backbone, self._restored_epoch or 0)
        if self._target_index is not None:
            optimizer = trainer.optimizers[self._target_index]
            scales = self.stack.lr_scales(self.backbone)
            schedulers = self._schedulers(trainer, optimizer)
            if scales:
                split_param_groups_by_scale(optimizer, self.backbone, scales, schedulers)
            for names in self._restored_events:
                self._add_param_groups(trainer, optimizer, names, scales)
        self._added_events = [list(names) for names in self._restored_events]
        self._restored_events = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the strategies' schedules and give newly trainable parameters to the backbone's optimizer."""
        self.stack.on_epoch_start(self.backbone, trainer.current_epoch)
        if self._target_index is None:
            return
        optimizer = trainer.optimizers[self._target_index]
        trainable = [name for name, p in self.backbone.named_parameters() if p.requires_grad]
        added = self._add_param_groups(trainer, optimizer, trainable, self.stack.lr_scales(self.backbone))
        if added:
            self._added_events.append([n for group in added for n in _group_param_names(group, self.backbone)])

    def _add_param_groups(
        self, trainer: pl.Trainer, optimizer: Any, names: Iterable[str], scales: Mapping[str, float]
    ) -> list[dict[str, Any]]:
        """Add ``names`` to ``optimizer``, except those another optimizer holds (the module's own choice)."""
        elsewhere = {id(p) for other in trainer.optimizers if other is not optimizer for p in _parameters(other)}
        wanted = set(names)
        own = [n for n, p in self.backbone.named_parameters() if n in wanted and id(p) not in elsewhere]
        return add_param_groups(
            optimizer,
            self.backbone,
            own,
            lr=self.added_groups.lr,
            lr_scales=scales,
            schedulers=self._schedulers(trainer, optimizer),
            weight_decay=self.added_groups.weight_decay,
        )

    def _backbone_optimizer_index(self, optimizers: Sequence[Any]) -> int | None:
        """Position of the optimizer that trains the backbone (``None``: the module configured no optimizer)."""
        index = self.added_groups.optimizer_index
        if index is not None:
            if index >= len(optimizers):
                raise StrategyError(
                    f"StrategyCallback(optimizer_index={index}): configure_optimizers returned "
                    f"{len(optimizers)} optimizer(s). Pass the position of the optimizer that trains the backbone "
                    f"(0 to {len(optimizers) - 1})."
                )
            return index
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        holders = [i for i, opt in enumerate(optimizers) if any(id(p) in backbone_ids for p in _parameters(opt))]
        if len(holders) == 1:
            return holders[0]
        if not holders and len(optimizers) <= 1:
            return 0 if optimizers else None
        kinds = ", ".join(f"{i}: {type(opt).__name__}" for i, opt in enumerate(optimizers))
        problem = (
            f"optimizers {holders} all hold parameters of the backbone"
            if holders
            else "none of them holds parameters of the backbone"
        )
        raise StrategyError(
            f"StrategyCallback cannot tell which optimizer trains the backbone: configure_optimizers returned "
            f"{len(optimizers)} optimizers ({kinds}) and {problem}. Pass StrategyCallback(..., optimizer_index=i) "
            "with the position of the one that should receive the strategies' param groups."
        )

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Average gradients DDP does not know about (parameters unfrozen after wrapping)."""
        self._grad_sync.sync(pl_module)

    def loss_terms(self, batch: Any, outputs: Tensor) -> dict[str, Tensor]:
        """The strategies' extra loss terms for this batch; add their sum to your loss in ``training_step``."""
        return self.stack.loss_terms(self.backbone, batch, outputs)

    @property
    def steps_itself(self) -> bool:
        """Whether a strategy takes its own optimisation steps (``ppo``, ``trpo``): then optimise manually."""
        return self.stack.steps_itself

    def optimisation_step(
        self,
        images: Tensor,
        targets: Tensor | None,
        indices: Tensor | None,
        optimizer_step: Callable[[], None],
    ) -> dict[str, Tensor]:
        """One batch of a strategy that takes its own steps; call it from ``training_step``.

        Set ``self.automatic_optimization = False`` in your module (Lightning's manual optimisation).
        ``optimizer_step()`` must step your optimizer and zero its gradients; the strategy calls it after writing
        gradients. Returns scalars to log, keyed ``"<strategy>/<name>"``.
        """
        return self.stack.optimisation_step(self.backbone, StepBatch(images, targets, indices), optimizer_step)

    def state_dict(self) -> dict[str, Any]:
        """Added param groups (by parameter name, in order), the epoch and the strategies' own state."""
        return {"added_param_groups": self._added_events, "strategies": self.stack.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Remember what to re-create in ``on_fit_start``."""
        self._restored_events = [list(names) for names in state_dict.get("added_param_groups", [])]
        self.stack.load_state_dict(state_dict.get("strategies", {}))

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Remember the epoch the checkpoint was written in, to restore trainability before the optimizer."""
        self._restored_epoch = int(checkpoint.get("epoch", 0))

    @staticmethod
    def _schedulers(trainer: pl.Trainer, optimizer: Any) -> list[Any]:
        return [cfg.scheduler for cfg in trainer.lr_scheduler_configs if cfg.scheduler.optimizer is optimizer]


@dataclass(frozen=True)
class AddedGroupOptions:
    """Where :class:`StrategyCallback` adds the param groups of tensors its strategies make trainable, and how.

    Args:
        optimizer_index: Position of the optimizer that trains the backbone (``None``: found).
        lr: Base learning rate of the added groups (``None``: inherited).
        weight_decay: Their weight decay (``None``: inherited).

    Raises:
        StrategyError: A value out of range, naming the ``StrategyCallback`` argument.

    Example:
        >>> AddedGroupOptions(optimizer_index=0, lr=1e-3).weight_decay is None
        True
    """

    optimizer_index: int | None = None
    lr: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        index, lr, decay = self.optimizer_index, self.lr, self.weight_decay
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise StrategyError(
                f"StrategyCallback(optimizer_index={index!r}): pass the position (an integer >= 0) of the "
                "optimizer that trains the backbone in the list configure_optimizers returns, or None to find it."
            )
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise StrategyError(f"StrategyCallback(added_lr={lr!r}): pass a finite rate > 0, or None to inherit.")
        if decay is not None and not (math.isfinite(decay) and decay >= 0):
            raise StrategyError(
                f"StrategyCallback(added_weight_decay={decay!r}): pass a finite value >= 0, or None to inherit."
            )


def _parameters(optimizer: Any) -> Iterable[Tensor]:
    return (p for group in optimizer.param_groups for p in group["params"])


def _run_after_configure_model(pl_module: pl.LightningModule, then: Callable[[], None]) -> None:
    """Make ``pl_module``'s next ``configure_model`` call run ``then`` right after it (once).

    Lightning offers callbacks no hook between ``configure_model`` and ``configure_optimizers``, so the instance's
    method is wrapped until its first call (the class's method is back afterwards).
    """
    original = pl_module.configure_model

    @functools.wraps(original)
    def configure_model_then_strategies() -> None:
        try:
            original()
        finally:
            vars(pl_module).pop("configure_model", None)
        then()

    pl_module.configure_model = configure_model_then_strategies  # type: ignore[method-assign]


def _group_param_names(group: Mapping[str, Any], model: nn.Module) -> list[str]:
    ids = {id(p) for p in group["params"]}
    return [name for name, p in model.named_parameters() if id(p) in ids]
