"""The finders on the command line: ``--model.lr auto``, ``--tune_batch_size`` and ``cvft lr-find``.

Every ``cvft`` CLI (:class:`~cvft.cli.base.RunCLI`) takes, for ``fit`` and ``lr-find``:

* ``--model.lr auto``: before the fit, the learning-rate range test (:func:`cvft.tuning.find_learning_rate`), set up
  by ``--lr_finder.*`` (:class:`~cvft.tuning.LRFinderOptions`);
* ``--tune_batch_size power|binsearch``: before that, the batch-size finder (:func:`cvft.tuning.find_batch_size`), set
  up by ``--batch_size_finder.*`` (:class:`~cvft.tuning.BatchSizeFinderOptions`).

:func:`run_finders` runs them on the built Trainer, task and data, prints what they found, and writes the values into
the run's configuration, so ``config.yaml`` and the checkpoints hold numbers (a run replayed from ``config.yaml``
trains as this one did) and the curve goes to ``lr_find.csv`` / ``lr_find.png`` in the run folder. ``cvft lr-find``
runs only the finders and prints the ``cvft fit`` command line that trains with what they found
(:func:`fit_command`).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback

from cvft.errors import CvftError
from cvft.tasks.base import LR_AUTO
from cvft.tuning import (
    BatchSizeFinderOptions,
    BatchSizeResult,
    LRFinderOptions,
    LRFinderResult,
    find_batch_size,
    find_learning_rate,
)

__all__ = ["LR_FIND", "add_finder_arguments", "fit_command", "refuse_finders_on_resume", "run_finders"]

#: The subcommand that runs the finders only.
LR_FIND = "lr-find"

#: Options that only steer the finders (left out of the ``cvft fit`` line that ``lr-find`` prints).
_FINDER_OPTIONS = ("--lr_finder.", "--batch_size_finder.", "--tune_batch_size")


def add_finder_arguments(parser: LightningArgumentParser) -> None:
    """Add ``--lr_finder.*``, ``--tune_batch_size`` and ``--batch_size_finder.*``."""
    parser.add_class_arguments(LRFinderOptions, "lr_finder", help="The learning-rate finder (--model.lr auto).")
    parser.add_argument(
        "--tune_batch_size",
        type=Literal["power", "binsearch"] | None,
        default=None,
        help="Before the fit, find the largest batch size that trains (Lightning's batch-size finder: 'power' "
        "doubles it, 'binsearch' then bisects) and use it. On a CPU the search ends at "
        "--batch_size_finder.max_batch_size.",
    )
    parser.add_class_arguments(
        BatchSizeFinderOptions, "batch_size_finder", help="The batch-size finder (--tune_batch_size)."
    )


def refuse_finders_on_resume(config: Any) -> None:
    """Refuse ``--model.lr auto`` and ``--tune_batch_size`` on a fit resumed from ``--ckpt_path``.

    Raises:
        CvftError: Either finder is asked for together with ``--ckpt_path``.
    """
    if not config.get("ckpt_path"):
        return
    asked = [flag for flag, on in (
        ("--model.lr auto", config.model.get("lr") == LR_AUTO),
        ("--tune_batch_size", bool(config.get("tune_batch_size"))),
    ) if on]  # fmt: skip
    if asked:
        raise CvftError(
            f"{' and '.join(asked)} search from the initial weights, but --ckpt_path resumes a fit, which continues at "
            "the checkpoint's learning rate and batch size. Leave them out to resume, or start a new fit."
        )


def run_finders(
    trainer: Any, model: Any, datamodule: Any, config: Any, options: Any, always_lr: bool = False
) -> tuple[LRFinderResult | None, BatchSizeResult | None]:
    """Run the finders the configuration asks for, print what they found, and write it into ``config``.

    Args:
        trainer: The fit's Trainer.
        model: The task (``model.lr_search_pending`` for ``--model.lr auto``).
        datamodule: The fit's data.
        config: The subcommand's parsed configuration; ``model.lr``, ``data.batch_size`` and ``tune_batch_size``
            are replaced by the values found (so ``config.yaml`` records numbers).
        options: The subcommand's instantiated configuration (``lr_finder``, ``batch_size_finder``).
        always_lr: Run the learning-rate finder even without ``--model.lr auto`` (``cvft lr-find``).

    Returns:
        What the learning-rate and the batch-size finder found (``None`` for one that did not run).
    """
    hidden = (SaveConfigCallback,)  # the real fit writes config.yaml, with the values found
    rates, sizes = None, None
    mode = config.get("tune_batch_size")
    if mode:
        sizes = find_batch_size(trainer, model, datamodule, mode, options["batch_size_finder"], hidden)
        _print(trainer, sizes.summary())
        config.data.batch_size = sizes.batch_size
        config.tune_batch_size = None
    if model.lr_search_pending or always_lr:
        rates = find_learning_rate(trainer, model, datamodule, options["lr_finder"], hidden_callbacks=hidden)
        _print(trainer, rates.summary())
        config.model.lr = float(model.hparams.lr)
    return rates, sizes


def fit_command(argv: Sequence[str], lr: float | None = None, batch_size: int | None = None) -> str:
    """The ``cvft fit`` command line of an ``lr-find`` command line, training at what the finders found.

    The finders' own options are left out; ``--model.lr`` (and ``--data.batch_size`` when a batch size was found)
    are replaced, and come last so that they win over ``--config`` files.

    Example:
        >>> fit_command(["lr-find", "--config", "a.yaml", "--model.lr=auto", "--lr_finder.num_training", "50"], 0.003)
        'cvft fit --config a.yaml --model.lr 0.003'
    """
    replaced = {"--model.lr"} | ({"--data.batch_size"} if batch_size is not None else set())
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            if not arg.startswith("--"):
                continue
        name = arg.partition("=")[0]
        if name in replaced or name.startswith(_FINDER_OPTIONS):
            skip_value = "=" not in arg
            continue
        kept.append("fit" if arg == LR_FIND and "fit" not in kept else arg)
    if lr is not None:
        kept += ["--model.lr", f"{lr:.3g}"]
    if batch_size is not None:
        kept += ["--data.batch_size", str(batch_size)]
    return "cvft " + shlex.join(kept)


def _print(trainer: Any, text: str) -> None:
    if getattr(trainer, "is_global_zero", True):
        print(text, flush=True)
