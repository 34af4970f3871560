"""Speed switches of a fit: the ``channels_last`` memory format and ``torch.compile`` of the backbone's forward.

:class:`SpeedSwitches` applies them when a Trainer sets the module up (every stage: fit, validate, test, predict),
after the task has built its network and injected its strategies, so injected modules (LoRA, adapters) are converted
and compiled too. Neither changes a number the model computes beyond floating-point rounding, nor a
``state_dict`` key.

* ``channels_last`` (:func:`use_channels_last`): the module's 4-D weights and every 4-D input of the backbone are
  stored NHWC. Convolutions run faster in that layout on GPUs with tensor cores (mixed precision) and on recent
  CPUs (oneDNN); a ViT has one convolution (the patch embedding), so it gains nothing. The checkpoint keeps the
  values; adapter files and exports are written contiguous.
* ``compile`` (:func:`compile_forward`): the backbone's ``__call__`` is compiled in place with
  :meth:`torch.nn.Module.compile`, so the module and its ``state_dict`` keys stay the uncompiled ones (no
  ``_orig_mod.`` prefix): checkpoints, adapter files, ``cvft predict`` and ``cvft export`` see the plain model.
  ``torch.compile`` compiles lazily, at the first forward; when that fails (no C++ compiler for the CPU backend, an
  operation the compiler does not support, a platform without ``torch.compile``), the call runs eagerly instead,
  with one warning naming the error and how to turn compiling off, and every later call runs eagerly. Only the
  backbone's forward is compiled: task heads, losses and the feature path strategies read
  (``forward_features``) run eagerly. A failure that shows only in the backward pass is not caught.

Example:
    >>> import timm, torch
    >>> model = timm.create_model("test_resnet", num_classes=3)
    >>> expected = model.eval()(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    >>> use_channels_last(model)
    >>> model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    True
    >>> logits = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    >>> torch.allclose(logits, expected, atol=1e-5)
    True
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

__all__ = [
    "COMPILE_MODES",
    "CompileFallbackWarning",
    "SpeedSwitches",
    "compile_failure_reason",
    "compile_forward",
    "use_channels_last",
]

_logger = logging.getLogger(__name__)

#: ``torch.compile`` modes (``None``: its default).
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: The ``torch.compile`` backend :class:`SpeedSwitches` uses (tests set ``"eager"`` to keep compiling fast).
COMPILE_BACKEND = "inductor"

_HOOK_ATTR = "_cvft_channels_last_hook"


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` could not compile the backbone; it runs eagerly."""


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: the first positional argument, a 4-D tensor, in the ``channels_last`` layout."""
    if args and isinstance(args[0], Tensor) and args[0].ndim == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def use_channels_last(module: nn.Module, inputs_of: nn.Module | None = None) -> None:
    """Store ``module``'s 4-D parameters and buffers ``channels_last``, and convert 4-D inputs of ``inputs_of``.

    The parameters stay the same objects (an optimizer built before keeps them). Idempotent.

    Args:
        module: The module to convert (a task converts itself: backbone, neck, heads).
        inputs_of: The module whose 4-D first input is converted on every call (default ``module``).
    """
    module.to(memory_format=torch.channels_last)
    target = module if inputs_of is None else inputs_of
    if getattr(target, _HOOK_ATTR, None) is None:
        setattr(target, _HOOK_ATTR, target.register_forward_pre_hook(_to_channels_last))


def compile_failure_reason(error: BaseException) -> str:
    """One line naming why compiling failed: the outer error's type and the innermost cause's type and first line.

    The cause is followed through ``__cause__`` and Dynamo's ``inner_exception`` (``BackendCompilerFailed``).

    Example:
        >>> try:
        ...     raise RuntimeError("compiling failed") from OSError("g++ missing")
        ... except RuntimeError as error:
        ...     compile_failure_reason(error)
        'RuntimeError <- OSError: g++ missing'
    """
    root = error
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
        root = inner
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    detail = f"{type(root).__name__}: {lines[0][:300]}" if lines else type(root).__name__
    return detail if root is error else f"{type(error).__name__} <- {detail}"


class _EagerFallback:
    """A compiled ``__call__`` that falls back to the eager one (for good) when compiling fails."""

    def __init__(self, module: nn.Module, compiled: Callable[..., Any], mode: str | None) -> None:
        self.module = module
        self.compiled = compiled
        self.mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:  # torch raises many kinds; a real error of the model also fails eagerly below
            output = self.module._call_impl(*args, **kwargs)
            self.module._compiled_call_impl = None
            warnings.warn(
                f"torch.compile could not compile the backbone {type(self.module).__name__} "
                f"({compile_failure_reason(error)}); it runs eagerly (uncompiled) from now on, with the same "
                "results. Set --model.compile false (compile=False) to skip compiling.",
                CompileFallbackWarning,
                stacklevel=2,
            )
            return output

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copy of the module (a teacher) runs eagerly


def compile_forward(module: nn.Module, mode: str | None = None, backend: str | None = None) -> bool:
    """Compile ``module``'s ``__call__`` in place, falling back to eager with one warning (module docstring).

    Args:
        module: The module whose forward is compiled; its ``state_dict`` keys do not change.
        mode: A ``torch.compile`` mode (:data:`COMPILE_MODES`); ``None``: the default.
        backend: A ``torch.compile`` backend; ``None``: :data:`COMPILE_BACKEND`.

    Returns:
        Whether the module is set to run compiled (compiling itself happens at its first call). Already compiled
        modules are left as they are.
    """
    if isinstance(module._compiled_call_impl, _EagerFallback):
        return True
    options: dict[str, Any] = {"backend": backend or COMPILE_BACKEND}
    if mode is not None and mode != "default":
        options["mode"] = mode
    try:
        compiled = torch.compile(module._call_impl, **options)
    except Exception as error:  # platforms and Python versions without torch.compile refuse here
        warnings.warn(
            f"torch.compile is not available here ({compile_failure_reason(error)}); the backbone runs eagerly. "
            "Set --model.compile false (compile=False) to skip compiling.",
            CompileFallbackWarning,
            stacklevel=2,
        )
        return False
    module._compiled_call_impl = _EagerFallback(module, compiled, mode)
    _logger.info("Backbone %s compiled with torch.compile(%s)", type(module).__name__, options)
    return True


class SpeedSwitches(pl.Callback):
    """Apply ``channels_last`` and ``compile`` to a task (``pl_module.backbone``) when a Trainer sets it up.

    Args:
        channels_last: Convert the whole module and the backbone's image inputs to ``torch.channels_last``.
        compile: Compile the backbone's forward (:func:`compile_forward`).
        compile_mode: The ``torch.compile`` mode.
    """

    def __init__(self, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None) -> None:
        self.channels_last = channels_last
        self.compile = compile
        self.compile_mode = compile_mode

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Convert and compile, after the task built its network and strategies (before Lightning moves it)."""
        backbone = pl_module.backbone
        if self.channels_last:
            use_channels_last(pl_module, inputs_of=backbone)
        if self.compile:
            compile_forward(backbone, self.compile_mode)
