"""Distillation teachers from files ``cvft fit`` writes: a ``.ckpt`` or an adapter ``.safetensors``, or a timm name.

The ``distillation`` strategy (:mod:`cvft.strategies.distillation`) takes a loaded teacher network, or a string that
the installed :class:`~cvft.strategies.distillation.teacher.TeacherLoader` builds. Rebuilding a teacher from a cvft
checkpoint or adapter file takes :class:`~cvft.tasks.ImageClassifier`, which lives here, in the task layer, so this
module installs :class:`CvftTeacherLoader` when it is imported (``import cvft.tasks`` does). YAML and CLI teachers
(``teacher: runs/.../best.ckpt``, ``--teacher``) go through it. Files are read safely
(:func:`cvft.checkpoints.load_checkpoint`: ``weights_only``, URLs downloaded into cvft's cache first) and only when
the strategy needs them, so a distilled student reloads without its teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from safetensors import safe_open
from torch import nn

from cvft.adapter_files import ADAPTER_FORMAT, read_adapter
from cvft.checkpoints import download, is_url, load_checkpoint, weights_from_checkpoint
from cvft.errors import CvftError, StrategyError
from cvft.strategies.distillation.teacher import (
    freeze_teacher,
    is_teacher_file,
    load_timm_teacher,
    register_teacher_loader,
    teacher_loading_errors,
)
from cvft.tasks.classification import ImageClassifier

__all__ = ["TeacherKind", "CvftTeacherLoader", "teacher_kind", "check_teacher_file", "load_teacher"]

TeacherKind = Literal["timm", "checkpoint", "adapter"]


def teacher_kind(teacher: str) -> TeacherKind:
    """What ``teacher`` names: ``"checkpoint"``, ``"adapter"`` or ``"timm"``.

    A ``.ckpt`` file is a checkpoint written by ``cvft fit``, anything without a weights-file suffix a timm model name.
    A ``.safetensors`` file counts as an adapter only if its metadata says so; plain weight files are refused with
    the way to use them (a timm name plus ``teacher_weights``).

    Raises:
        StrategyError: ``teacher`` looks like a file (by its suffix) that does not exist, or is a plain weights file.

    Example:
        >>> teacher_kind("resnet50.a1_in1k"), teacher_kind("test_vit")
        ('timm', 'timm')
    """
    if not is_teacher_file(teacher):
        return "timm"
    path = Path(teacher)
    if not path.is_file():
        raise StrategyError(
            f"Teacher file {str(path)!r} does not exist (looked at {path.resolve()}). Pass a timm model name, the "
            "path of a .ckpt written by `cvft fit`, or of an adapter .safetensors written by it."
        )
    suffix = path.suffix.lower()
    if suffix == ".ckpt":
        return "checkpoint"
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as error:  # SafetensorError, OSError: not a safetensors file, truncated
            raise StrategyError(
                f"Teacher file {str(path)!r} is not a readable .safetensors file ({type(error).__name__}: {error}). "
                "Pass the adapter .safetensors written by `cvft fit`, a .ckpt, or a timm model name."
            ) from None
        if metadata.get("format") == ADAPTER_FORMAT:
            return "adapter"
    raise StrategyError(
        f"Teacher {str(path)!r} is a plain weights file, not a cvft checkpoint or adapter: pass the timm name of its "
        f"architecture as `teacher` and the file as `teacher_weights` (CLI: --teacher NAME --teacher_weights "
        f"{path})."
    )


def _local_copy(teacher: str) -> str:
    """A teacher given by ``http(s)://`` URL, downloaded into cvft's cache (read safely like any other file)."""
    return str(download(teacher)) if is_url(teacher) else teacher


def check_teacher_file(teacher: str) -> int | None:
    """Check a teacher file before training: readable, safe, a cvft checkpoint or adapter; return its class count.

    Reads only the file (no hub access, no model is built), so a distillation strategy can refuse a bad teacher
    when it is set up rather than at the first training step.

    Args:
        teacher: What :func:`load_teacher` takes.

    Returns:
        The number of classes the teacher predicts when its file says (``None`` for timm names and when unknown).

    Raises:
        StrategyError: The file is missing, unreadable, unsafe (pickled objects), or not a cvft checkpoint/adapter.
    """
    teacher = _local_copy(teacher)
    kind = teacher_kind(teacher)
    try:
        if kind == "checkpoint":
            hparams = load_checkpoint(teacher, require_lightning=True).get("hyper_parameters") or {}
            classes = hparams.get("num_classes")
            return int(classes) if isinstance(classes, int) else None
        if kind == "adapter":
            names = read_adapter(teacher)[1].class_names
            return len(names) if names else None
    except CvftError as error:
        raise StrategyError(f"Cannot use {teacher!r} as the distillation teacher: {error}") from None
    return None


def load_teacher(teacher: str, weights: str | None = None, pretrained: bool = True) -> nn.Module:
    """Build a teacher network (a timm model with its classifier), frozen and in eval mode, on the CPU.

    Args:
        teacher: A timm model name (with an optional pretrained tag), the path of a ``.ckpt`` written by
            ``cvft fit`` (rebuilt with :meth:`ImageClassifier.from_checkpoint
            <cvft.tasks.ImageClassifier.from_checkpoint>`, every weight from the file), or of a cvft adapter
            ``.safetensors`` (rebuilt with :meth:`ImageClassifier.from_adapter
            <cvft.tasks.ImageClassifier.from_adapter>` on the base weights below).
        weights: Base weights of a timm-name or adapter teacher: a local file or built-in source, as
            :func:`cvft.backbones.create_backbone` takes; it wins over ``pretrained``. Not used with a ``.ckpt``.
        pretrained: Take the base weights from the hub (timm's pretrained tag) when ``weights`` is not given.

    Returns:
        The teacher: a timm model with its classifier head, ``requires_grad=False`` everywhere, in eval mode.

    Raises:
        StrategyError: The teacher cannot be found or built, would start from random weights (a timm name or an
            adapter with neither ``weights`` nor ``pretrained``), or ``weights`` was given with a ``.ckpt``.

    Example:
        >>> import tempfile, timm, torch
        >>> from safetensors.torch import save_file
        >>> path = tempfile.mkdtemp() + "/resnet.safetensors"
        >>> save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
        >>> teacher = load_teacher("test_resnet", weights=path)
        >>> teacher.num_classes, teacher.training, any(p.requires_grad for p in teacher.parameters())
        (3, False, False)
    """
    teacher = _local_copy(teacher)
    kind = teacher_kind(teacher)
    pretrained = pretrained and weights is None
    if kind == "adapter" and not pretrained and weights is None:
        raise StrategyError(
            f"Adapter {teacher!r} holds only the tensors it trained, and neither base weights nor pretrained=True "
            "were given: it would sit on a randomly initialised backbone. Pass the base weights it was trained on "
            "(teacher_weights / reference_weights / the reward's weights), or pretrained=True for the hub's."
        )
    with teacher_loading_errors(teacher, kind):
        if kind == "timm":
            return load_timm_teacher(teacher, weights, pretrained)
        with weights_from_checkpoint():
            if kind == "checkpoint":
                if weights is not None:
                    raise StrategyError(
                        f"teacher_weights={weights!r} does not apply to the checkpoint teacher {teacher!r}: a "
                        ".ckpt holds every weight. Leave teacher_weights out."
                    )
                model = ImageClassifier.from_checkpoint(teacher).backbone
            else:
                model = ImageClassifier.from_adapter(teacher, pretrained=pretrained, weights=weights).backbone
    return freeze_teacher(model)


class CvftTeacherLoader:
    """The :class:`~cvft.strategies.distillation.teacher.TeacherLoader` for timm names and cvft's own files."""

    def check(self, teacher: str) -> int | None:
        """:func:`check_teacher_file`."""
        return check_teacher_file(teacher)

    def load(self, teacher: str, weights: str | None, pretrained: bool) -> nn.Module:
        """:func:`load_teacher`."""
        return load_teacher(teacher, weights, pretrained)


register_teacher_loader(CvftTeacherLoader())
