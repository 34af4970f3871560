"""The strategy interface every fine-tuning method implements, and the stack that composes several of them.

A strategy acts on the *backbone* (the timm model, head included) at five moments:

1. :meth:`Strategy.setup` runs once, before any optimizer exists. It may inject modules (LoRA, adapters,
   prompts), freeze parameters and attach state.
2. :meth:`Strategy.lr_scales` tells the optimizer builder which parameters get a scaled learning rate.
3. :meth:`Strategy.on_epoch_start` runs at every training epoch start and may make more parameters trainable
   (gradual unfreezing). It must derive its decisions from ``epoch`` alone, so a resumed run behaves exactly
   like an uninterrupted one.
4. :meth:`Strategy.loss_terms` adds named terms to the task loss (distillation, contrastive, EWC). It receives a
   :class:`~cvft.strategies.outputs.StepOutputs` (logits, images, targets, and the pooled pre-logit features when
   :attr:`Strategy.needs_features` is set); :attr:`Strategy.task_loss_weight` scales the supervised task loss
   (0 trains on the strategy's terms alone, e.g. contrastive pre-fine-tuning).
5. :attr:`Strategy.num_views` asks the data side for extra augmented views of each batch.

Strategies whose choices depend on data (sparse tuning by gradient magnitude) set :attr:`Strategy.needs_data` and
implement :meth:`Strategy.calibrate`: it runs after ``setup`` and before the optimizer exists, on a few training
batches, under :func:`calibration_mode` (eval mode; modes, ``requires_grad`` flags and gradients restored after).

Strategies compose in the order given: each one sees the model as the previous ones left it.

Capability flags. What a strategy needs from the task that trains it is declared on its class (or as a property
of its arguments), never inferred from its name: :attr:`Strategy.needs_data` (calibration batches),
:attr:`Strategy.objective` (loss terms), :attr:`Strategy.num_views` (augmented views), :attr:`Strategy.needs_indices`
(dataset indices in the batches), :attr:`Strategy.needs_features` (pooled features in the step outputs),
:attr:`Strategy.keeps_feature_maps` (``forward_intermediates`` still works after set-up) and
:attr:`Strategy.trains_head_only` (the backbone's features stay fixed). Tasks check them with
:func:`cvft.strategies.support.check_supported`.

BatchNorm policy. Every parameter strategy (one that decides which parameters train: ``lora``, ``bitfit``,
``linear_probe`` ...) takes a ``bn`` option, handled here once: ``"train"`` (running statistics follow the new data;
affine weights train only where the strategy trains them), ``"frozen"`` (eval mode, pretrained statistics) or
``"adabn"`` (statistics re-estimated once on the training data in the calibrate step, then frozen). Give it in a
recipe or mapping (``{"name": "lora", "bn": "train"}``) or in Python with :meth:`Strategy.with_bn`. Each strategy
class has a measured :attr:`Strategy.default_bn`. In a :class:`StrategyStack` one policy holds for the whole model:
explicit settings (``bn``, or ``train_bn=True``, which means ``"train"``) must agree, otherwise the stack refuses;
without any, the default of the last strategy that has one applies. The stack hands the resolved policy to every
member that takes ``bn`` (their :attr:`Strategy.bn_policy`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

from torch import Tensor, nn

from cvft.strategies._freeze import BN_POLICIES, apply_bn_policy, check_bn_policy
from cvft.strategies.outputs import StepBatch, StepOutputs

__all__ = ["Strategy", "ParameterStrategy", "StrategyStack", "LossFn", "calibration_mode", "eval_mode"]

#: ``loss_fn(logits, targets) -> scalar loss``, as used by :meth:`Strategy.calibrate`.
LossFn = Callable[[Tensor, Tensor], Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration and give every sub-module its own train/eval mode back after.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> model[1].eval()  # a sub-module in its own mode
        Dropout(p=0.5, inplace=False)
        >>> with eval_mode(model):
        ...     print(model.training)
        False
        >>> model.training, model[1].training
        (True, False)
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a calibration pass and restore everything a calibration may touch afterwards.

    Restored on exit: the train/eval mode of every sub-module, every parameter's ``requires_grad`` flag and its
    ``.grad`` (the same tensor, or ``None``). Eval mode keeps BatchNorm statistics fixed and dropout off.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=3).train()
        >>> with calibration_mode(model):
        ...     _ = model.fc.weight.requires_grad_(False)
        ...     print(model.training)
        False
        >>> model.training, model.fc.weight.requires_grad
        (True, True)
    """
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        with eval_mode(model):
            yield model
    finally:
        for param, requires_grad, grad in params:
            param.requires_grad_(requires_grad)
            param.grad = grad


class Strategy:
    """Base class of all fine-tuning strategies.

    Subclasses set :attr:`name` (their registry name) and override the hooks they need; every hook has a
    do-nothing default. Configuration goes into typed ``__init__`` arguments, validated there, so that
    LightningCLI and YAML recipes can build strategies by name.

    Example:
        >>> import timm
        >>> class HeadOnly(Strategy):
        ...     name = "head_only_example"
        ...     def setup(self, model):
        ...         head = set(model.get_classifier().parameters())
        ...         for p in model.parameters():
        ...             p.requires_grad_(p in head)
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> HeadOnly().setup(model)
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
        291
    """

    name: ClassVar[str] = "strategy"
    #: Augmented views of each training image the strategy needs (contrastive methods ask for 2).
    num_views: ClassVar[int] = 1
    #: An objective changes what the model learns from (loss terms), not which parameters train.
    objective: ClassVar[bool] = False
    #: Whether :meth:`loss_terms` needs ``outputs.features`` (pooled pre-logit features of the training images).
    needs_features: ClassVar[bool] = False
    #: Weight of the supervised task loss; the stack multiplies the strategies' weights.
    task_loss_weight: float = 1.0
    #: Whether :meth:`calibrate` needs training batches (a subclass may make it a property of its arguments).
    needs_data: ClassVar[bool] = False
    #: Whether training batches must carry each sample's dataset index, ``(images, targets, indices)`` (e.g. to cache
    #: a teacher's outputs per sample; a subclass may make it a property of its arguments).
    needs_indices: ClassVar[bool] = False
    #: Whether the backbone's ``forward_intermediates`` (the multi-scale feature maps detection reads) still works
    #: after :meth:`setup`; ``False`` for strategies that change the blocks' token sequence (``vpt``).
    keeps_feature_maps: ClassVar[bool] = True
    #: Whether only the classifier head trains and the backbone's features stay fixed (``linear_probe``,
    #: ``classifier_only``), so that a classifier may train its head on cached features.
    trains_head_only: ClassVar[bool] = False
    #: Whether more backbone tensors become trainable during the fit (gradual unfreezing), so that an average of the
    #: tensors trainable at the start (EMA of weights) would miss them.
    unfreezes_during_fit: ClassVar[bool] = False
    #: Whether the strategy takes the ``bn`` option (parameter strategies and schedules that freeze).
    takes_bn: ClassVar[bool] = False
    #: BatchNorm policy used when ``bn`` is not given (see the module docstring); ``None``: no policy of its own
    #: (the stack's, else ``"frozen"``).
    default_bn: ClassVar[str | None] = None
    #: Learning rate a task uses for this strategy when none is given (``None``: no opinion; the task's default).
    #: Set only where measured; the README's "Strategy defaults" table says on which data.
    default_lr: ClassVar[float | None] = None
    #: Whether the objective takes its own optimisation steps on each training batch (:meth:`optimisation_step`:
    #: PPO's epochs over a rollout, TRPO's line search) instead of adding loss terms; the task then optimises manually.
    steps_itself: ClassVar[bool] = False
    #: Whether the training targets are preference pairs, ``(B, 3)`` rows ``[preferred, rejected, weight]`` (DPO, a
    #: Bradley-Terry reward model), instead of labels: the task then computes no supervised loss or train metrics.
    pair_targets: ClassVar[bool] = False

    def with_bn(self, bn: str) -> Strategy:
        """Set the BatchNorm policy (``"train"``, ``"frozen"`` or ``"adabn"``) and return the strategy.

        Raises:
            StrategyError: The strategy takes no BatchNorm policy, ``bn`` is not a policy, or it contradicts
                ``train_bn=True``.

        Example:
            >>> from cvft.strategies import LoRA
            >>> LoRA(rank=2).with_bn("frozen").bn_policy
            'frozen'
        """
        from cvft.errors import StrategyError

        if not self.takes_bn:
            raise StrategyError(
                f"{self.name}: takes no `bn` option (it does not decide which parameters train); set `bn` on the "
                "parameter strategy it is combined with."
            )
        check_bn_policy(self.name, bn)
        if getattr(self, "train_bn", False) and bn != "train":
            raise StrategyError(
                f"{self.name}: train_bn=True trains BatchNorm layers, which contradicts bn={bn!r}; drop one of them."
            )
        self.bn = bn
        return self

    @property
    def explicit_bn(self) -> str | None:
        """The BatchNorm policy the user asked for (``bn``, or ``"train"`` for ``train_bn=True``), else ``None``."""
        if "bn" in vars(self):
            return vars(self)["bn"]
        return "train" if getattr(self, "train_bn", False) else None

    @property
    def bn_policy(self) -> str:
        """The BatchNorm policy in force: explicit, else its stack's, else :attr:`default_bn`, else ``"frozen"``."""
        return self.explicit_bn or getattr(self, "_stack_bn", None) or self.default_bn or "frozen"

    def apply_bn_policy(self, model: nn.Module, only: set[str] | None = None) -> None:
        """Put ``model``'s BatchNorm layers under :attr:`bn_policy` (call at the end of :meth:`setup`)."""
        apply_bn_policy(model, self.bn_policy, only)

    def setup(self, model: nn.Module) -> None:
        """Prepare ``model`` before the optimizer is built: inject modules, freeze parameters."""

    def calibrate(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn) -> None:
        """Refine data-dependent choices on ``(images, targets)`` batches, after :meth:`setup`, before the optimizer.

        Only called when :attr:`needs_data` is true; ``loss_fn(logits, targets)`` is the task loss. The model is in
        :func:`calibration_mode` and on the device the batches must go to. It must not be called on a model whose
        strategy parameters were already trained (resumed runs restore the choices from the checkpoint instead).
        """

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        """Learning-rate multipliers by parameter name; parameters left out keep a scale of 1."""
        return {}

    def on_epoch_start(self, model: nn.Module, epoch: int) -> list[str]:
        """Update trainability for ``epoch`` (0-based); return the names of parameters that became trainable."""
        return []

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """Extra loss terms, by name, to add to the task loss for this training batch.

        ``outputs`` is a :class:`~cvft.strategies.outputs.StepOutputs`; ``batch`` is the data loader's batch as is.
        """
        return {}

    def optimisation_step(
        self, model: nn.Module, batch: StepBatch, optimizer_step: Callable[[], None]
    ) -> dict[str, Tensor]:
        """Train ``model`` on one batch with the strategy's own steps; return scalars to log, by name.

        Only called when :attr:`steps_itself` is set. ``batch`` is a :class:`~cvft.strategies.outputs.StepBatch`
        (images, targets, dataset indices). ``optimizer_step()`` applies the task's optimizer to the gradients the
        strategy wrote into ``.grad`` (and zeroes them); a strategy may also change the trainable parameters itself
        under ``torch.no_grad``.
        """
        raise NotImplementedError(f"{self.name} takes no optimisation steps of its own (steps_itself is False).")

    def config(self) -> dict[str, Any]:
        """The strategy's constructor arguments, for logs, checkpoints and adapter metadata."""
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (tensors or primitives only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({args})"


class ParameterStrategy(Strategy):
    """Base of the parameter strategies: they decide which parameters train, so they take the ``bn`` option.

    Their :attr:`~Strategy.default_bn` is ``"frozen"``, the long-standing behaviour, until a measurement shows
    better for a method, which then sets its own (``lora`` does; see the README's "Strategy defaults").
    """

    takes_bn = True
    default_bn = "frozen"  # not yet measured: the long-standing behaviour


class StrategyStack:
    """Several strategies applied in order, seen from outside as one.

    Learning-rate scales multiply, loss terms are collected under ``"<strategy name>/<term>"`` and the number of
    views is the largest any strategy asks for.

    Args:
        strategies: Strategy instances, applied in the given order.

    Example:
        >>> import timm
        >>> from cvft.strategies import build_strategy
        >>> stack = StrategyStack([build_strategy("linear_probe")])
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> stack.setup(model)
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['head.weight', 'head.bias']
    """

    #: Most training batches ``bn="adabn"`` reads to re-estimate BatchNorm statistics.
    adabn_batches: ClassVar[int] = 100

    def __init__(self, strategies: Iterable[Strategy] = ()) -> None:
        self.strategies: list[Strategy] = list(strategies)
        names = [s.name for s in self.strategies]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            from cvft.errors import StrategyError

            raise StrategyError(f"Strategy {duplicates[0]!r} is listed twice; give each strategy once.")
        self._check_objectives()
        self.bn_policy = self._resolve_bn()

    def _check_objectives(self) -> None:
        """Refuse objectives that cannot train together: one stepping itself with any other objective."""
        stepping = [s.name for s in self.strategies if s.steps_itself]
        others = [s.name for s in self.strategies if s.objective and not s.steps_itself]
        if stepping and (len(stepping) > 1 or others):
            from cvft.errors import StrategyError

            raise StrategyError(
                f"{stepping[0]} takes its own optimisation steps on each batch and cannot be combined with other "
                f"objectives ({', '.join(stepping[1:] + others)}); keep it with parameter strategies only "
                "(lora, linear_probe, full ...)."
            )
        pairs = [s.name for s in self.strategies if s.pair_targets]
        labels = [s.name for s in self.strategies if s.objective and not s.pair_targets]
        if pairs and labels:
            from cvft.errors import StrategyError

            raise StrategyError(
                f"{pairs[0]} trains on preference pairs but {labels[0]} on labelled images; train them in separate "
                "fits (the second starting from the first's checkpoint)."
            )

    def _resolve_bn(self) -> str | None:
        """One BatchNorm policy for the stack (see the module docstring), written into every member taking ``bn``."""
        members = [s for s in self.strategies if s.takes_bn]
        explicit = {s.name: s.explicit_bn for s in members if s.explicit_bn is not None}
        if len(set(explicit.values())) > 1:
            from cvft.errors import StrategyError

            listed = ", ".join(f"{name}: bn={bn!r}" for name, bn in explicit.items())
            raise StrategyError(
                f"Strategies in one stack ask for different BatchNorm policies ({listed}); BatchNorm statistics are "
                f"shared by the whole model, so give one `bn` (one of {', '.join(BN_POLICIES)}) or the same on each."
            )
        if explicit:
            policy: str | None = next(iter(explicit.values()))
        else:
            policy = next((s.default_bn for s in reversed(members) if s.default_bn is not None), None)
        if policy is not None:
            for strategy in members:  # private: configs (checkpoints, adapter metadata) keep what the user gave
                strategy._stack_bn = policy
        return policy

    def __iter__(self):
        return iter(self.strategies)

    def __len__(self) -> int:
        return len(self.strategies)

    @property
    def default_lr(self) -> float | None:
        """The smallest :attr:`Strategy.default_lr` of the members (``None`` when none has one)."""
        return min((s.default_lr for s in self.strategies if s.default_lr is not None), default=None)

    @property
    def num_views(self) -> int:
        """Largest number of views any strategy asks for."""
        return max((s.num_views for s in self.strategies), default=1)

    @property
    def needs_data(self) -> bool:
        """Whether any strategy needs calibration batches (``bn="adabn"`` does)."""
        return self.bn_policy == "adabn" or any(s.needs_data for s in self.strategies)

    @property
    def needs_indices(self) -> bool:
        """Whether any strategy needs the dataset index of each training sample in its batches."""
        return any(s.needs_indices for s in self.strategies)

    @property
    def steps_itself(self) -> bool:
        """Whether a member takes its own optimisation steps (the task must optimise manually)."""
        return any(s.steps_itself for s in self.strategies)

    @property
    def pair_targets(self) -> bool:
        """Whether the training targets are preference pairs (no supervised loss)."""
        return any(s.pair_targets for s in self.strategies)

    def optimisation_step(
        self, model: nn.Module, batch: StepBatch, optimizer_step: Callable[[], None]
    ) -> dict[str, Tensor]:
        """The self-stepping member's :meth:`Strategy.optimisation_step`, its scalars keyed ``"<strategy>/<name>"``."""
        for strategy in self.strategies:
            if strategy.steps_itself:
                stats = strategy.optimisation_step(model, batch, optimizer_step)
                return {f"{strategy.name}/{key}": value for key, value in stats.items()}
        raise NotImplementedError("No strategy of this stack takes its own optimisation steps.")

    def setup(self, model: nn.Module) -> None:
        """Run every strategy's :meth:`Strategy.setup`, in order."""
        for strategy in self.strategies:
            strategy.setup(model)

    def calibrate(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn) -> None:
        """Run :meth:`Strategy.calibrate` of every strategy that needs data, in order, under :func:`calibration_mode`.

        ``batches`` is iterated once per such strategy, so give a re-iterable (a DataLoader, a list) when several
        strategies calibrate. With ``bn="adabn"`` the BatchNorm statistics are first re-estimated on ``batches``
        (exact pooled moments over at most :attr:`adabn_batches` of them, see :func:`cvft.strategies.adabn`).
        """
        if self.bn_policy == "adabn":
            from cvft.strategies.domain.adabn import adabn

            adabn(model, batches, batches=self.adabn_batches)
        with calibration_mode(model):
            for strategy in self.strategies:
                if strategy.needs_data:
                    strategy.calibrate(model, batches, loss_fn)

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        """Product of all strategies' learning-rate scales, by parameter name."""
        scales: dict[str, float] = {}
        for strategy in self.strategies:
            for name, scale in strategy.lr_scales(model).items():
                scales[name] = scales.get(name, 1.0) * scale
        return scales

    def on_epoch_start(self, model: nn.Module, epoch: int) -> list[str]:
        """Run every strategy's epoch hook; return all newly trainable parameter names, in model order."""
        changed: set[str] = set()
        for strategy in self.strategies:
            changed.update(strategy.on_epoch_start(model, epoch))
        return [name for name, _ in model.named_parameters() if name in changed]

    @property
    def needs_features(self) -> bool:
        """Whether any strategy's loss terms need the pooled pre-logit features."""
        return any(s.needs_features for s in self.strategies)

    @property
    def task_loss_weight(self) -> float:
        """Product of the strategies' task-loss weights."""
        weight = 1.0
        for strategy in self.strategies:
            weight *= float(strategy.task_loss_weight)
        return weight

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs | Tensor) -> dict[str, Tensor]:
        """All strategies' loss terms, keyed ``"<strategy>/<term>"``; plain logits are wrapped with the batch."""
        if isinstance(outputs, Tensor):
            outputs = StepOutputs.from_batch(batch, outputs)
        terms: dict[str, Tensor] = {}
        for strategy in self.strategies:
            for key, value in strategy.loss_terms(model, batch, outputs).items():
                terms[f"{strategy.name}/{key}"] = value
        return terms

    def state_dict(self) -> dict[str, Any]:
        """Each strategy's state under its name."""
        return {s.name: s.state_dict() for s in self.strategies}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; strategies absent from ``state`` are left as they are."""
        for strategy in self.strategies:
            if strategy.name in state:
                strategy.load_state_dict(state[strategy.name])

    def config(self) -> list[dict[str, Any]]:
        """``[{"name": ..., **config}, ...]`` for logs and metadata."""
        return [{"name": s.name, **s.config()} for s in self.strategies]


#: A module lists buffer names under this attribute to have them saved in adapter files with the trained parameters
#: (state a strategy chose from data, such as the indices sparse tuning selected); see :mod:`cvft.adapter_files`.
ADAPTER_BUFFERS_ATTR = "adapter_buffer_names"
__all__ += ["ADAPTER_BUFFERS_ATTR"]

#: A module whose trained tensors may have another shape in an adapter file (a selection's size, e.g. the rows
#: ``filter_select`` chose with a global scope) defines a method of this name, ``fit_adapter_tensors(tensors)``;
#: :func:`cvft.adapter_files.load_adapter` calls it with the file's tensors under the module (prefix removed) before
#: checking shapes, so that the module can resize itself to them.
ADAPTER_FIT_ATTR = "fit_adapter_tensors"
__all__ += ["ADAPTER_FIT_ATTR"]
