"""A distillation teacher as the strategy sees it: a frozen network, given loaded or named for a loader to build.

The strategy reads no files itself. A teacher given as a string is built by the installed :class:`TeacherLoader`:

* by default :class:`TimmTeacherLoader`, for timm model names (base weights from ``teacher_weights``, a built-in
  source or the hub);
* :mod:`cvft.tasks.teachers` installs one that also reads what ``cvft fit`` writes (a ``.ckpt``, an adapter
  ``.safetensors``), files only the task layer can rebuild into a network. Importing :mod:`cvft.tasks` installs it.

Either way the result is frozen (:func:`freeze_teacher`) and kept outside the student.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from torch import nn

from cvft._deprecation import moved_names
from cvft.errors import CvftError, StrategyError
from cvft.strategies._modules import feature_width

__all__ = [
    "TeacherLoader",
    "TimmTeacherLoader",
    "register_teacher_loader",
    "teacher_loader",
    "load_timm_teacher",
    "teacher_loading_errors",
    "is_teacher_file",
    "freeze_teacher",
    "feature_width",
]

#: Suffixes that make a teacher string a file (a ``.ckpt``, or weights a loader may read) rather than a timm name.
TEACHER_FILE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors")


class TeacherLoader(Protocol):
    """Builds the teacher a string names; :func:`register_teacher_loader` installs one."""

    def check(self, teacher: str) -> int | None:
        """Refuse a bad teacher before training, reading files only (no model built, no hub access).

        Returns:
            The number of classes the teacher predicts when its file says, else ``None``.
        """

    def load(self, teacher: str, weights: str | None, pretrained: bool) -> nn.Module:
        """The teacher network with its classifier head, frozen and in eval mode (:func:`freeze_teacher`)."""


def is_teacher_file(teacher: str) -> bool:
    """Whether ``teacher`` names a file (by its suffix) rather than a timm model.

    Example:
        >>> is_teacher_file("resnet50.a1_in1k"), is_teacher_file("runs/cvft/version_0/checkpoints/last.ckpt")
        (False, True)
    """
    return Path(teacher).suffix.lower() in TEACHER_FILE_SUFFIXES


@contextmanager
def teacher_loading_errors(teacher: str, kind: str) -> Iterator[None]:
    """Report any failure to build ``teacher`` (of ``kind``) as a :class:`~cvft.errors.StrategyError` naming it."""
    try:
        yield
    except StrategyError:
        raise
    except (CvftError, OSError, KeyError, RuntimeError) as err:
        raise StrategyError(f"Cannot load the distillation teacher {teacher!r} ({kind}): {err}") from err


def load_timm_teacher(name: str, weights: str | None = None, pretrained: bool = True) -> nn.Module:
    """A timm model with its classifier as a teacher, frozen; refuses one that would start from random weights.

    Args:
        name: A timm model name, with an optional pretrained tag.
        weights: Base weights (a local file or built-in source, as :func:`cvft.backbones.create_backbone` takes);
            wins over ``pretrained``.
        pretrained: Take the weights from the hub when ``weights`` is not given.

    Raises:
        StrategyError: Neither ``weights`` nor ``pretrained``: a random teacher teaches nothing.
    """
    from cvft.backbones import create_backbone

    pretrained = pretrained and weights is None
    if not pretrained and weights is None:
        raise StrategyError(
            f"Teacher {name!r} would start from random weights, which teaches nothing: pass "
            "teacher_pretrained=True (hub weights) or teacher_weights=<file or built-in source>."
        )
    return freeze_teacher(create_backbone(name, pretrained=pretrained, weights=weights))


class TimmTeacherLoader:
    """The default :class:`TeacherLoader`: timm model names only; files need :mod:`cvft.tasks.teachers`.

    Example:
        >>> TimmTeacherLoader().check("test_vit") is None
        True
    """

    def check(self, teacher: str) -> int | None:
        """Refuse a file (no loader for cvft's files is installed); a timm name has no class count to read."""
        if is_teacher_file(teacher):
            raise StrategyError(
                f"Teacher {teacher!r} is a file, and cvft's checkpoint and adapter files are read by "
                "cvft.tasks.teachers: import cvft.tasks first (it installs that loader), or pass the loaded teacher "
                "nn.Module as `teacher`."
            )
        return None

    def load(self, teacher: str, weights: str | None, pretrained: bool) -> nn.Module:
        """The timm model ``teacher`` names (:func:`load_timm_teacher`)."""
        self.check(teacher)
        with teacher_loading_errors(teacher, "timm"):
            return load_timm_teacher(teacher, weights, pretrained)


_loader: TeacherLoader = TimmTeacherLoader()


def register_teacher_loader(loader: TeacherLoader) -> TeacherLoader:
    """Install ``loader`` for every teacher given as a string from now on; returns the one it replaces."""
    global _loader
    previous, _loader = _loader, loader
    return previous


def teacher_loader() -> TeacherLoader:
    """The installed :class:`TeacherLoader`."""
    return _loader


def freeze_teacher(model: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter and eval mode (BatchNorm statistics fixed, dropout off).

    Example:
        >>> import timm
        >>> teacher = freeze_teacher(timm.create_model("test_resnet", num_classes=3))
        >>> teacher.training, sum(p.requires_grad for p in teacher.parameters())
        (False, 0)
    """
    model.requires_grad_(False)
    return model.eval()


#: Reading cvft's files moved up to the task layer: deprecated aliases.
__getattr__ = moved_names(
    __name__,
    {name: "cvft.tasks.teachers" for name in ("TeacherKind", "teacher_kind", "check_teacher_file", "load_teacher")},
)
