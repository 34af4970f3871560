"""The tests' one Trainer factory: a quiet, fast CPU Trainer (no logger, checkpoints, progress bar or summary).

``tests/`` is on ``sys.path`` (pytest puts the root ``conftest.py``'s folder there), so any test module imports it:
``from quiet_trainer import make_trainer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl

__all__ = ["QUIET", "make_trainer"]

#: The options that keep a test Trainer from writing or printing anything.
QUIET: dict[str, Any] = dict(
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
)


def make_trainer(max_epochs: int | None = 1, callbacks: Iterable[pl.Callback] = (), **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer without a sanity check; ``kwargs`` override any option."""
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, **QUIET, num_sanity_val_steps=0, max_epochs=max_epochs)
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)
