"""What every ``cvft`` command shares: run folders, checkpoints that are read safely, and resuming a run in place.

:class:`RunCLI` is the LightningCLI base of the classification/medical CLI (:mod:`cvft.cli.classification`) and the
detection CLI (:mod:`cvft.cli.detection`):

* ``--checkpoint.*`` configures a :class:`~cvft.callbacks.RunCheckpoint` (best by the task's metric, and
  ``last.ckpt`` at the end of every epoch);
* the Trainer reads and writes checkpoints through :class:`~cvft.checkpoints.SafeCheckpointIO` (never unpickled,
  written atomically), and ``--weights_only false`` is refused;
* ``fit --ckpt_path last`` resumes the newest ``last.ckpt`` under ``--trainer.default_root_dir`` (or fails with a
  cvft error), and a resumed fit continues its run folder (:func:`cvft.runs.run_loggers`);
* outside ``fit``, ``--ckpt_path`` is read before anything is built, and the module is built without base weights;
  its hyper-parameters replace the command line's, except the task's ``inference_options`` (``--model.tta``) that
  the command line sets.
* ``fit --model.lr auto`` and ``fit --tune_batch_size`` run Lightning's finders before the fit, and ``cvft lr-find``
  runs only them (:mod:`cvft.cli.tuning`).

Both CLIs also report a fit the same way: :func:`run_summary` before it, :func:`print_fit_results` after it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Any, ClassVar

from jsonargparse import class_from_function
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from cvft import __version__
from cvft.callbacks import RunCheckpoint, output_dir
from cvft.checkpoints import SafeCheckpointIO, load_checkpoint, weights_from_checkpoint, with_legacy_hparams
from cvft.cli.tuning import LR_FIND, add_finder_arguments, fit_command, refuse_finders_on_resume, run_finders
from cvft.errors import ConfigError, CvftError
from cvft.runs import ResumePoint, resume_point, run_loggers
from cvft.tasks.hparams import Interval, check_hparams

__all__ = ["RunCLI", "cli_defaults", "read_checkpoint_hparams", "run_summary", "print_fit_results"]


def cli_defaults(description: str) -> dict[str, Any]:
    """The keyword arguments every ``cvft`` CLI is built with: runs under ``runs/``, ``config.yaml`` rewritten.

    Example:
        >>> cli_defaults("cvft: fine-tune.")["trainer_defaults"]
        {'default_root_dir': 'runs'}
    """
    return {
        "trainer_defaults": {"default_root_dir": "runs"},
        "save_config_kwargs": {"overwrite": True},
        "parser_kwargs": {"description": description},
    }


def read_checkpoint_hparams(path: str) -> dict[str, Any]:
    """The ``hyper_parameters`` of a Lightning checkpoint, read safely (:func:`cvft.checkpoints.load_checkpoint`).

    Raises:
        CheckpointError: The file is missing, unsafe, truncated or not a Lightning checkpoint.
    """
    return dict(load_checkpoint(path, require_lightning=True).get("hyper_parameters", {}))


def run_summary(model: Any, architecture: str) -> str:
    """One line saying what a fit trains: architecture, weights, classes, strategies, trainable parameters.

    Example:
        >>> from cvft.tasks import ImageClassifier
        >>> model = ImageClassifier("test_resnet", pretrained=False, num_classes=3, strategies=["linear_probe"])
        >>> run_summary(model, "test_resnet").split(" | ")[2:]
        ['3 classes', 'strategies: linear_probe', 'trainable parameters: 291 of 372,979']
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    strategies = ", ".join(s.name for s in model.strategy_stack) or "full (default)"
    return (
        f"cvft {__version__}: {architecture} | weights: {model.weights_source} | {model.num_classes} classes | "
        f"strategies: {strategies} | trainable parameters: {trainable:,} of {total:,}"
    )


def print_fit_results(trainer: Trainer, model: Any, metrics: dict[str, float]) -> None:
    """Print a fit's final validation ``metrics``, its best checkpoint, weights and outputs; save a strategy adapter.

    The adapter (``adapter.safetensors``, the trained tensors only) is written into the run folder when the model
    has strategies.
    """
    folder = output_dir(trainer)
    summary = " | ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
    print(f"Final validation: {summary}", flush=True)
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_score is not None:
        score = float(checkpoint.best_model_score)
        print(f"Best {checkpoint.monitor}: {score:.4f} ({checkpoint.best_model_path})", flush=True)
    print(f"Weights used: {model.weights_source}", flush=True)
    temperature_fit = getattr(model, "temperature_fit", None)
    if temperature_fit is not None:
        print(temperature_fit.summary(), flush=True)
    print(f"Learning rate: {model.hparams.lr:g} ({getattr(model, 'lr_origin', 'given as lr')})", flush=True)
    if len(model.strategy_stack):
        adapter = model.save_adapter(folder / "adapter.safetensors")
        print(f"Adapter (trained tensors only): {adapter}", flush=True)
    print(f"Outputs: {folder}", flush=True)


class RunCLI(LightningCLI):
    """LightningCLI base with cvft's run folders, safe checkpoint loading and in-place resuming (module docstring).

    Subclasses set :attr:`run_name` and :attr:`monitor`, and take what they need from a checkpoint outside ``fit``
    in :meth:`from_checkpoint_hparams`.
    """

    #: Run folders go to ``<default_root_dir>/<run_name>/version_<n>``.
    run_name: ClassVar[str] = "cvft"
    #: The metric ``best.ckpt`` is chosen by (higher is better).
    monitor: ClassVar[str] = "val/acc"

    #: Where ``fit --ckpt_path`` resumes from.
    resume: ResumePoint | None = None
    #: The ``hyper_parameters`` of ``--ckpt_path`` (any subcommand), ``None`` without one.
    checkpoint_hparams: dict[str, Any] | None = None
    #: The ``datamodule_hyper_parameters`` of ``--ckpt_path`` (empty without one or when it has none).
    checkpoint_data_hparams: dict[str, Any] = {}  # noqa: RUF012 (replaced, never mutated)

    #: The command line as given (``cvft lr-find`` prints the ``cvft fit`` line from it).
    argv: list[str] | None = None
    #: What the finders found before the fit (:func:`cvft.cli.tuning.run_finders`; ``None`` for one that did not run).
    found: tuple[Any, Any] = (None, None)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands, and ``lr-find``: the fit's options, the finders only (no Trainer method)."""
        return {**LightningCLI.subcommands(), LR_FIND: set()}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """LightningCLI's subcommands (each described by its Trainer method), then ``lr-find``."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        trainer_class = (
            self.trainer_class if isinstance(self.trainer_class, type) else class_from_function(self.trainer_class)
        )
        for name in self.subcommands():
            if name == LR_FIND:
                description = (
                    "Run the learning-rate finder (and --tune_batch_size) with the options of fit, print the "
                    "suggestion and the fit command that uses it, and write lr_find.csv / lr_find.png."
                )
            else:
                description = (inspect.getdoc(getattr(trainer_class, name)) or "").split("\n")[0]
            sub_kwargs = {**kwargs.get(name, {})}
            sub_kwargs.setdefault("description", description)
            sub_parser = self._prepare_subcommand_parser(trainer_class, name, **sub_kwargs)
            self._subcommand_parsers[name] = sub_parser
            subcommands.add_subcommand(name, sub_parser, help=description)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        if subcommand != LR_FIND:
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser = self.init_parser(**kwargs)
        self._add_arguments(parser)
        self._subcommand_method_arguments[subcommand] = []
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does, keeping the command line (:attr:`argv`)."""
        self.argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else None
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--checkpoint.*`` (best by :attr:`monitor`, ``last.ckpt`` every epoch) and the finders' options."""
        add_finder_arguments(parser)
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": self.monitor,
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Resolve and read ``--ckpt_path`` safely before anything is built or written; refuse unsafe loading.

        Replaces LightningCLI's own step, which reads the checkpoint to take the model's hyper-parameters from it:
        here the file is read once with :func:`cvft.checkpoints.load_checkpoint` (URLs downloaded first, ``"last"``
        resolved for ``fit``), and the Trainer is handed the local file.
        """
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.get("weights_only") is False:
            raise CvftError(
                "--weights_only false is refused: cvft never unpickles a checkpoint, since a crafted file can run "
                "code. Leave --weights_only out; checkpoints written by `cvft fit` load with weights_only=True."
            )
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        if subcommand == "fit":
            refuse_finders_on_resume(config)
        root = config.trainer.get("default_root_dir") or "runs"
        if subcommand != "fit" and str(ckpt_path) == "last":
            raise CvftError(f"--ckpt_path last resumes a fit; for {subcommand}, pass the checkpoint's path.")
        point = resume_point(str(ckpt_path), root, self.run_name)
        if point is None:  # Lightning's "hpc" / "registry": Lightning resolves them, SafeCheckpointIO reads them
            return
        config.ckpt_path = str(point.ckpt_path)
        if subcommand == "fit":
            self.resume = point
        self.checkpoint_hparams = point.hyper_parameters
        self.checkpoint_data_hparams = point.datamodule_hyper_parameters
        self._merge_model_hparams(point.hyper_parameters)

    def _merge_model_hparams(self, hparams: dict[str, Any]) -> None:
        """What LightningCLI does with a checkpoint's hyper-parameters: they become the model's configuration."""
        # The model class is fixed: private keys (``_class_path``, ``_instantiator``) would only let a file name a
        # class to import and instantiate, so they are dropped.
        hparams = {key: value for key, value in hparams.items() if not str(key).startswith("_")}
        if self.config.subcommand != "fit":
            for name in self._inference_options_given():
                hparams.pop(name, None)
        if not hparams:
            return
        hparams = with_legacy_hparams(self.model_class, hparams)  # options the checkpoint predates
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(
                "cvft: error: the checkpoint's hyper-parameters do not fit this command's model (a checkpoint of "
                "another task?). Pass a checkpoint written by the same kind of `cvft fit`.\n"
            )
            raise

    def _inference_options_given(self) -> list[str]:
        """The model's ``inference_options`` this command sets: named on the command line, or not the default."""
        model = self.config[self.config.subcommand].get("model")
        names = getattr(self.model_class, "inference_options", ())
        if model is None or not names:
            return []
        defaults = inspect.signature(self.model_class).parameters
        given = []
        for name in names:
            flag = f"--model.{name}"
            named = any(arg == flag or arg.startswith(f"{flag}=") for arg in self.argv or ())
            default = defaults[name].default if name in defaults else inspect.Parameter.empty
            if named or model.get(name, default) != default:
                given.append(name)
        return given

    def before_instantiate_classes(self) -> None:
        """Outside ``fit``, build the model without base weights (the checkpoint holds them) for its classes."""
        subcommand = self.config.get("subcommand")
        if subcommand in (None, "fit") or self.checkpoint_hparams is None:
            return
        config = self.config[subcommand]
        config.model.pretrained = False
        config.model.weights = None
        self.from_checkpoint_hparams(config, self.checkpoint_hparams)

    def from_checkpoint_hparams(self, config: Any, hparams: dict[str, Any]) -> None:
        """Outside ``fit``: take what the data needs (class names …) from the checkpoint's hyper-parameters."""

    def instantiate_classes(self) -> None:
        """Build the classes; a module whose weights come from ``--ckpt_path`` is built without the scratch warning."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if not config.get("ckpt_path"):
            super().instantiate_classes()
            return
        with weights_from_checkpoint():
            super().instantiate_classes()
        if subcommand != "fit":
            print(f"Weights: all from checkpoint {config.ckpt_path}", flush=True)

    def before_fit(self) -> None:
        """Say where a resumed fit continues from; run the finders asked for (``--model.lr auto``, ...)."""
        if self.resume is not None:
            print(
                f"Resuming from {self.resume.ckpt_path} (step {self.resume.global_step}): weights, optimizer, "
                f"schedule and strategy state come from it; outputs continue in {self.trainer.log_dir}.",
                flush=True,
            )
        subcommand = str(self.subcommand)
        self.found = run_finders(
            self.trainer,
            self.model,
            self.datamodule,
            self.config[subcommand],
            self.config_init[subcommand],
            always_lr=subcommand == LR_FIND,
        )

    def _run_subcommand(self, subcommand: str) -> None:
        """``lr-find``: what ``fit`` does before training, then the ``cvft fit`` line that trains with it."""
        if subcommand != LR_FIND:
            super()._run_subcommand(subcommand)
            return
        self.before_fit()
        rates, sizes = self.found
        if self.trainer.is_global_zero and self.argv is not None:
            command = fit_command(
                self.argv,
                rates.lr if rates is not None and rates.suggestion is not None else None,
                sizes.batch_size if sizes is not None else None,
            )
            print(f"Train with it: {command}", flush=True)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        check_hparams("Trainer", {k: config.get(k) for k in _TRAINER_RANGES}, _TRAINER_RANGES, "--trainer.")
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            config["plugins"] = [*plugins, SafeCheckpointIO()]
        if config.get("logger") in (None, True):
            config["logger"] = run_loggers(config.get("default_root_dir") or "runs", self.run_name, self.resume)
        try:
            return super()._instantiate_trainer(config, callbacks)
        except CvftError:
            raise
        except (MisconfigurationException, ValueError, TypeError) as error:
            _remove_empty_run_folders(config["logger"])
            raise ConfigError(
                f"Invalid Trainer option: {error} Fix the --trainer.* value (see `cvft fit --help`)."
            ) from None


#: Numeric Trainer options checked before a run folder is made (Lightning checks some only later, some never).
_TRAINER_RANGES = {
    "max_epochs": Interval(-1, integer=True, hint="-1 trains until max_steps or forever."),
    "min_epochs": Interval(0, integer=True),
    "max_steps": Interval(-1, integer=True, hint="-1 means no step limit."),
    "min_steps": Interval(0, integer=True),
    "accumulate_grad_batches": Interval(1, integer=True),
    "log_every_n_steps": Interval(1, integer=True),
    "check_val_every_n_epoch": Interval(1, integer=True),
    "num_sanity_val_steps": Interval(-1, integer=True, hint="-1 runs the whole validation set."),
    "gradient_clip_val": Interval(0.0),
}


def _remove_empty_run_folders(loggers: Any) -> None:
    """Undo the claim of a run folder that nothing was written into (the Trainer could not even be built)."""
    for logger in loggers if isinstance(loggers, list) else []:
        folder = getattr(logger, "log_dir", None)
        if folder and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
            with contextlib.suppress(OSError):  # the run name's folder too, when this was its only run
                os.rmdir(os.path.dirname(folder))
