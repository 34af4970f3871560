"""The ``distillation`` strategy: learn from a frozen teacher's soft predictions (and features) as well as the labels.

Plain supervised fine-tuning (the classifier's default) minimises cross-entropy on the hard labels. Knowledge
distillation (Hinton et al., 2015) adds the teacher's softened class distribution as a target: the student learns
which wrong classes are *almost* right, which carries more information per image than a label and helps most when
labelled images are few. Optionally the student's pooled features are also pulled, through a learned projection,
towards the teacher's (FitNets-style hints).

    total = (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher_T || student_T) + feature_weight * MSE
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies._modules import feature_width
from cvft.strategies.aux import add_aux_module, get_aux_module
from cvft.strategies.base import Strategy
from cvft.strategies.distillation.loss import feature_distillation_loss, kd_loss
from cvft.strategies.distillation.teacher import freeze_teacher, teacher_loader
from cvft.strategies.outputs import StepOutputs, forward_with_features
from cvft.strategies.registry import register_strategy

__all__ = ["Distillation", "PROJECTION_NAME"]

_logger = logging.getLogger(__name__)

#: Name of the student-to-teacher feature projection under ``model.cvft_aux``.
PROJECTION_NAME = "distill_projection"

#: How the configuration records a teacher given as a loaded module (there is no file or name to record).
_MODULE_TEACHER = "module:"


@register_strategy
class Distillation(Strategy):
    """Teacher-student knowledge distillation: logit KD (Hinton et al., 2015) plus optional feature matching.

    Compared with plain supervised fine-tuning (cross-entropy on the labels), the student also matches a frozen
    teacher's temperature-softened predictions on the same images (every augmented view included): the loss is
    ``(1 - alpha) * CE + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``, and with ``feature_weight > 0`` plus
    ``feature_weight`` times the MSE between the student's pooled pre-logit features, mapped by a learned linear
    projection (``model.cvft_aux.distill_projection``, dropped at export) to the teacher's width, and the teacher's.

    This is an objective: it decides *what* the student learns from, not which parameters train. List parameter
    strategies (``linear_probe``, ``lora``, adapters ...) first and ``distillation`` after them; the projection
    always trains, whatever they froze.

    The teacher is kept *outside* the student's module tree (on this strategy object): it is not optimised, not saved
    in the student's checkpoints or adapter files, not wrapped by DDP, and Lightning's ``model.train()`` cannot
    reach it. It is frozen, always runs in eval mode under ``torch.no_grad``, and follows the images' device and
    dtype. A teacher named by a string is built by the installed teacher loader
    (:mod:`cvft.strategies.distillation.teacher`; :mod:`cvft.tasks.teachers` reads cvft's checkpoint and adapter
    files) at the first training step (at ``setup`` when features are distilled, since the projection's width depends
    on it), so a distilled student reloads for inference or export without its teacher.

    ``cache_logits=True`` computes the teacher's outputs once per dataset sample (by the indices the data module
    returns, see :attr:`needs_indices`) and keeps them on the CPU, outside checkpoints. It is exact only when the
    teacher's input is the same every epoch: with random augmentation the cache holds the teacher's answer for the
    *first* augmented version of each image. Without indices in the batch it warns once and runs the teacher.

    Args:
        teacher: The teacher network itself (an ``nn.Module`` with its classifier, frozen here in place; recorded
            in the configuration as ``"module:<class name>"`` and not saved with the student), or a timm model name,
            the path of a ``.ckpt`` written by ``cvft fit``, or of a cvft adapter ``.safetensors`` file. Its head must
            have as many classes as the student's when ``alpha > 0``.
        teacher_weights: Base weights of a timm-name or adapter teacher (a local file or built-in source, as in
            :func:`cvft.backbones.create_backbone`); wins over ``teacher_pretrained``.
        teacher_pretrained: Take the teacher's base weights from the hub when ``teacher_weights`` is not given.
        temperature: Softening temperature ``T`` of the logit term.
        alpha: Weight of the logit distillation term; the cross-entropy gets ``1 - alpha``. ``alpha=0`` with
            ``feature_weight > 0`` distils features only (then any teacher head will do).
        feature_weight: Weight of the feature term; 0 turns it off.
        cache_logits: Cache the teacher's outputs per dataset sample (see above).

    Example:
        >>> import tempfile, timm, torch
        >>> from safetensors.torch import save_file
        >>> from cvft.strategies import apply_strategies
        >>> weights = tempfile.mkdtemp() + "/teacher.safetensors"
        >>> save_file(timm.create_model("test_vit", num_classes=3).state_dict(), weights)
        >>> student = timm.create_model("test_resnet", num_classes=3)
        >>> stack = apply_strategies(
        ...     student,
        ...     ["linear_probe", {"name": "distillation", "teacher": "test_vit", "teacher_weights": weights,
        ...                       "feature_weight": 1.0}],
        ... )
        >>> sorted(n for n, p in student.named_parameters() if p.requires_grad)
        ['cvft_aux.distill_projection.bias', 'cvft_aux.distill_projection.weight', 'fc.bias', 'fc.weight']
        >>> stack.task_loss_weight
        0.5
    """

    name = "distillation"
    objective = True

    def __init__(
        self,
        teacher: str | nn.Module,
        teacher_weights: str | None = None,
        teacher_pretrained: bool = True,
        temperature: float = 4.0,
        alpha: float = 0.5,
        feature_weight: float = 0.0,
        cache_logits: bool = False,
    ) -> None:
        loaded = teacher if isinstance(teacher, nn.Module) else None
        if loaded is not None:
            teacher = f"{_MODULE_TEACHER}{type(loaded).__name__}"
        if not isinstance(teacher, str) or not teacher.strip():
            raise StrategyError(
                "distillation needs a teacher: a timm model name, a .ckpt from `cvft fit` or an adapter .safetensors "
                f"(got {teacher!r})."
            )
        if not temperature > 0:
            raise StrategyError(f"distillation temperature must be > 0 (1-8 is usual), got {temperature}.")
        if not 0.0 <= alpha <= 1.0:
            raise StrategyError(
                f"distillation alpha must be in [0, 1] (the KD weight; cross-entropy gets 1 - alpha), got {alpha}."
            )
        if not feature_weight >= 0:
            raise StrategyError(f"distillation feature_weight must be >= 0 (0 turns it off), got {feature_weight}.")
        if alpha == 0 and feature_weight == 0:
            raise StrategyError(
                "distillation with alpha=0 and feature_weight=0 distils nothing: set alpha > 0 (logits) and/or "
                "feature_weight > 0 (features), or leave 'distillation' out."
            )
        self.teacher = teacher
        self.teacher_weights = teacher_weights
        self.teacher_pretrained = bool(teacher_pretrained)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.feature_weight = float(feature_weight)
        self.cache_logits = bool(cache_logits)
        self._teacher: nn.Module | None = None if loaded is None else freeze_teacher(loaded)
        self._num_classes: int | None = None
        self._cache: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._warned_no_indices = False

    # ------------------------------------------------------------------ what the training step must provide
    @property
    def task_loss_weight(self) -> float:  # type: ignore[override]
        """``1 - alpha``: the cross-entropy's share next to the logit distillation term."""
        return 1.0 - self.alpha

    @property
    def needs_features(self) -> bool:  # type: ignore[override]
        """Whether the student's pooled features are needed (feature distillation on)."""
        return self.feature_weight > 0

    @property
    def needs_indices(self) -> bool:  # type: ignore[override]
        """Whether the data should return dataset indices (to cache the teacher's outputs per sample)."""
        return self.cache_logits

    # ------------------------------------------------------------------ teacher
    @property
    def teacher_model(self) -> nn.Module:
        """The frozen teacher (loaded on first access)."""
        if self._teacher is None:
            if self.teacher.startswith(_MODULE_TEACHER):
                raise StrategyError(
                    f"The distillation teacher was given as a loaded module ({self.teacher!r}), which is not saved "
                    "with the student: pass the module again as `teacher`, or name a timm model or a cvft file."
                )
            self._teacher = teacher_loader().load(self.teacher, self.teacher_weights, self.teacher_pretrained)
            self._check_classes()
        return self._teacher

    def _check_classes(self) -> None:
        if self._teacher is not None:
            self._check_class_count(getattr(self._teacher, "num_classes", None))

    def _check_class_count(self, teacher_classes: int | None) -> None:
        if self._num_classes is None or self.alpha == 0:
            return
        if teacher_classes != self._num_classes:
            raise StrategyError(
                f"Distillation teacher {self.teacher!r} predicts {teacher_classes} classes but the student "
                f"{self._num_classes}: logit distillation needs the same classes in the same order. Use a teacher "
                "fine-tuned on this dataset (its .ckpt or adapter file), or distil features only (alpha=0, "
                "feature_weight > 0)."
            )

    def setup(self, model: nn.Module) -> None:
        """Check the teacher's file and classes; with feature distillation, load the teacher and add the projection.

        A bad teacher file (missing, unreadable, unsafe, another class count) is refused here, before training.
        """
        self._num_classes = getattr(model, "num_classes", None)
        if self._teacher is None and not self.teacher.startswith(_MODULE_TEACHER):
            file_classes = teacher_loader().check(self.teacher)
            if file_classes is not None:
                self._check_class_count(file_classes)
        self._check_classes()
        if self.feature_weight > 0:
            width = functools.partial(
                feature_width, needed_by="Feature distillation", fix="Use feature_weight=0 (logit distillation only)."
            )
            projection = nn.Linear(width(model), width(self.teacher_model))
            add_aux_module(model, PROJECTION_NAME, projection).requires_grad_(True)

    @torch.no_grad()
    def _run_teacher(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        teacher = self.teacher_model
        reference = next(teacher.parameters(), None)
        dtype = images.dtype if images.is_floating_point() else None
        if reference is not None and (reference.device != images.device or (dtype and reference.dtype != dtype)):
            teacher.to(device=images.device, dtype=dtype)
        if teacher.training:  # someone called train() on it: BatchNorm statistics and dropout must stay fixed
            teacher.eval()
        if self.feature_weight > 0:
            return forward_with_features(teacher, images)
        return teacher(images), None

    def _teacher_outputs(self, outputs: StepOutputs) -> tuple[Tensor, Tensor | None]:
        """The teacher's logits (and features) for every row of ``outputs``, from the cache where possible."""
        if not self.cache_logits:
            return self._run_teacher(outputs.images)
        if outputs.indices is None:
            if not self._warned_no_indices:
                self._warned_no_indices = True
                warnings.warn(
                    "distillation cache_logits=True but the batches carry no dataset indices; running the teacher "
                    "on every batch. Use ImageFolderDataModule or return (image, target, index) from your dataset.",
                    stacklevel=2,
                )
            return self._run_teacher(outputs.images)
        views, size = outputs.num_views, outputs.batch_size
        keys = [int(i) for i in outputs.indices.tolist()]
        missing = [pos for pos, key in enumerate(keys) if key not in self._cache]
        if missing:
            images = outputs.per_view(outputs.images)[:, missing].flatten(0, 1)
            logits, features = self._run_teacher(images)
            logits = logits.float().cpu().reshape(views, len(missing), -1)
            if features is not None:
                features = features.float().cpu().reshape(views, len(missing), -1)
            for row, pos in enumerate(missing):
                sample_features = None if features is None else features[:, row].clone()
                self._cache[keys[pos]] = (logits[:, row].clone(), sample_features)
        entries = [self._cache[key] for key in keys]
        device = outputs.logits.device
        logits = torch.stack([e[0] for e in entries], dim=1).reshape(views * size, -1).to(device)
        features = None
        if self.feature_weight > 0:
            features = torch.stack([e[1] for e in entries], dim=1).reshape(views * size, -1).to(device)
        return logits, features

    # ------------------------------------------------------------------ loss
    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """``{"kd": alpha * KD}`` and, with ``feature_weight > 0``, ``{"feature": feature_weight * MSE}``."""
        teacher_logits, teacher_features = self._teacher_outputs(outputs)
        terms: dict[str, Tensor] = {}
        if self.alpha > 0:
            if teacher_logits.shape != outputs.logits.shape:
                raise StrategyError(
                    f"Distillation teacher {self.teacher!r} gives logits of shape {tuple(teacher_logits.shape)} for "
                    f"student logits of shape {tuple(outputs.logits.shape)}; the class counts must match."
                )
            terms["kd"] = self.alpha * kd_loss(outputs.logits, teacher_logits, self.temperature)
        if self.feature_weight > 0:
            projection = get_aux_module(model, PROJECTION_NAME)
            if projection is None or outputs.features is None:
                raise StrategyError(
                    "Feature distillation needs the student's features and its projection: set the strategy up on "
                    "the model (setup) and train through ImageClassifier or StrategyCallback, which pass features."
                )
            loss = feature_distillation_loss(outputs.features, teacher_features, projection)
            terms["feature"] = self.feature_weight * loss
        return terms

    def clear_cache(self) -> None:
        """Forget the cached teacher outputs (e.g. after changing the data)."""
        self._cache.clear()
