"""The ``cvft`` command: LightningCLI with cvft's classifier, image-folder data and sensible run outputs.

Examples::

    cvft fit --config configs/efficientnet_lite0_digits.yaml
    cvft fit --model.backbone vit_small_patch16_224.augreg_in21k --data.root my_images/ --trainer.max_epochs 5
    cvft predict --config runs/cvft/version_0/config.yaml --data.predict_root new_images/
        --ckpt_path runs/cvft/version_0/checkpoints/best.ckpt

Every fit writes, into ``<trainer.default_root_dir>/<run name>/version_<n>/``: ``checkpoints/`` (best and last),
``metrics.csv``, TensorBoard event files, ``learning_curves.png``, ``confusion_matrix.png`` and ``config.yaml``.
A config with the top-level key ``task: detection`` (or ``--task detection``) runs :mod:`cvft.cli_detection` instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from cvft import __version__
from cvft.callbacks import PredictionWriter, TrainingReport, output_dir
from cvft.cli_base import RunCLI, read_checkpoint_hparams
from cvft.data import ImageFolderDataModule
from cvft.errors import CvftError
from cvft.medical.report import MedicalReport
from cvft.tasks import ImageClassifier

__all__ = [
    "CvftCLI",
    "MedicalCLI",
    "main",
    "run_summary",
    "print_fit_results",
    "read_checkpoint_hparams",
    "add_teacher",
    "adapter_into_config",
    "find_task",
    "TASKS",
]

_logger = logging.getLogger("cvft")

TASKS = ("classification", "detection", "medical")
_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _task_in_config(path: str) -> str | None:
    """The top-level ``task:`` of a YAML config file (or of its subcommand section), None when it names none."""
    import yaml

    file = Path(path)
    if not file.is_file():
        return None  # LightningCLI reports the missing file (or parses an inline YAML string)
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return None  # LightningCLI reports the syntax error with its position
    if not isinstance(config, dict):
        return None
    sections = [config] + [config[name] for name in _SUBCOMMANDS if isinstance(config.get(name), dict)]
    found = [section["task"] for section in sections if "task" in section]
    return str(found[-1]) if found else None


def find_task(argv: list[str]) -> str:
    """The task a ``cvft`` command line asks for: ``--task``, else the last ``task:`` of its ``--config`` files.

    Args:
        argv: The arguments after ``cvft`` (``["fit", "--config", "x.yaml", ...]``).

    Returns:
        One of :data:`TASKS`; ``"classification"`` when nothing names a task.

    Raises:
        CvftError: The task named is not one of :data:`TASKS`.

    Example:
        >>> find_task(["fit", "--data.root", "images/"]), find_task(["predict", "--task=detection"])
        ('classification', 'detection')
    """
    task, source = None, None
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if not equals:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if name == "--task":
            task, source = value, "--task"
        elif name in ("--config", "-c") and source != "--task":  # --task wins wherever it stands
            from_file = _task_in_config(value)
            if from_file is not None:
                task, source = from_file, value
    if task is None:
        return "classification"
    if task not in TASKS:
        raise CvftError(
            f"Unknown task {task!r} (from {source}); choose one of {', '.join(TASKS)} "
            "(set it with `task: detection` at the top of the config file or with --task)."
        )
    return task


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
    if len(model.strategy_stack):
        adapter = model.save_adapter(folder / "adapter.safetensors")
        print(f"Adapter (trained tensors only): {adapter}", flush=True)
    print(f"Outputs: {folder}", flush=True)


def add_teacher(config: Any) -> None:
    """Append ``{"name": "distillation", "teacher": ...}`` to ``config.model.strategies`` for ``--teacher``.

    Nothing changes without ``--teacher`` or when the strategies already list ``distillation`` (a saved
    ``config.yaml`` holds both). Strategies given as a comma-separated string become a list.
    """
    teacher = config.get("teacher")
    if not teacher:
        return
    strategies = config.model.get("strategies")
    if isinstance(strategies, str):
        strategies = [part.strip() for part in strategies.split(",") if part.strip()]
    elif strategies is None:
        strategies = []
    elif not isinstance(strategies, list):
        strategies = [strategies]
    names = [spec if isinstance(spec, str) else dict(spec).get("name") for spec in strategies]
    if "distillation" in names:
        return
    spec: dict[str, Any] = {"name": "distillation", "teacher": teacher}
    if config.get("teacher_weights"):
        spec["teacher_weights"] = config.teacher_weights
    config.model.strategies = [*strategies, spec]


def adapter_into_config(config: Any) -> None:
    """Take backbone, strategies and class names from ``--model.adapter``'s metadata where the config lacks them.

    An adapter file records what it was trained with, so ``cvft predict --model.adapter adapter.safetensors``
    needs only the base weights (``--model.weights`` or the hub). Strategies the config names are kept (the adapter
    then checks that they match).
    """
    adapter = config.model.get("adapter")
    if not adapter:
        return
    from cvft.adapter_files import read_adapter

    info = read_adapter(adapter)[1]
    if config.model.get("backbone") != info.backbone:
        config.model.backbone = info.backbone
        if "backbone" in config.data:
            config.data.backbone = info.backbone
    if not config.model.get("strategies"):
        config.model.strategies = info.strategies
    if config.data.get("class_names") is None and info.class_names:
        config.data.class_names = info.class_names


class CvftCLI(RunCLI):
    """LightningCLI wired for cvft.

    * ``model.backbone`` is passed on to ``data.backbone`` (so preprocessing follows the backbone's pretrained
      config), ``data.multi_label`` to ``model.multi_label`` and ``data.channels`` to ``model.in_chans``;
      ``num_classes`` and ``class_names`` come from the data once it is instantiated.
    * Callbacks always present and configurable: ``--checkpoint.*`` (best by ``val/acc`` and last),
      ``--report.*`` (learning-curve and confusion-matrix PNGs), ``--predictions.*`` (predictions CSV),
      ``--medical_report.*`` (ROC curves, reliability diagram, clinical metrics; off until ``enabled: true``).
    * Without ``--trainer.logger``, metrics go to CSV and TensorBoard in the same run folder.
    """

    #: The ``--task`` this CLI runs (its saved ``config.yaml`` names it, so the config round-trips).
    task: ClassVar[str] = "classification"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link model and data arguments and add cvft's callbacks."""
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("data.multi_label", "model.multi_label")
        parser.link_arguments("data.channels", "model.in_chans")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(TrainingReport, "report")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(MedicalReport, "medical_report")  # ROC, calibration: --medical_report.enabled
        parser.set_defaults({"medical_report.enabled": False})
        parser.add_argument(
            "--task",
            type=Literal[self.task],  # type: ignore[valid-type]
            default=self.task,
            help="What to train; `cvft` picks the CLI from it (`--task detection` trains an object detector, "
            "`--task medical` a classifier on MedicalImageDataModule with the medical report on).",
        )
        parser.add_argument(
            "--teacher",
            type=str | None,
            default=None,
            help="Distil from this teacher: a timm model name, a .ckpt from `cvft fit` or an adapter .safetensors "
            "(adds the 'distillation' strategy to model.strategies unless it is listed already).",
        )
        parser.add_argument(
            "--teacher_weights",
            type=str | None,
            default=None,
            help="Base weights of a timm-name or adapter teacher (a local file or built-in source).",
        )

    def before_instantiate_classes(self) -> None:
        """Add ``--teacher`` to the strategies, the adapter's strategies and classes, then read ``--ckpt_path``."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        add_teacher(config)
        if subcommand not in (None, "fit"):
            adapter_into_config(config)
        super().before_instantiate_classes()

    def from_checkpoint_hparams(self, config: Any, hparams: dict[str, Any]) -> None:
        """Outside fit, the class names come from the checkpoint."""
        if config.data.get("class_names") is None and hparams.get("class_names"):
            config.data.class_names = list(hparams["class_names"])

    def before_fit(self) -> None:
        """Say which weights the run starts from and how many parameters train (and where a resumed run continues)."""
        print(run_summary(self.model, self.model.hparams.backbone), flush=True)
        super().before_fit()

    def after_fit(self) -> None:
        """Print the final validation metrics and where the outputs are."""
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
            print_fit_results(self.trainer, self.model, metrics)

    def after_predict(self) -> None:
        """Print where the predictions went."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionWriter) and callback.path is not None:
                print(f"Predictions: {callback.path}", flush=True)


class MedicalCLI(CvftCLI):
    """:class:`CvftCLI` on :class:`~cvft.data.MedicalImageDataModule` (DICOM, NIfTI, 16-bit PNG/TIFF, MedMNIST).

    Chosen by ``task: medical`` in a config (``configs/medical/``) or ``--task medical``. The medical report
    (``--medical_report.*``: per-class AUROC, sensitivity/specificity at the operating point, ECE, ROC curves and a
    reliability diagram) is on by default. ``best.ckpt`` is chosen by validation AUROC (threshold-free; validation
    accuracy of a small, imbalanced set ties at the majority-class rate, and the first tie wins).
    """

    task: ClassVar[str] = "medical"
    monitor: ClassVar[str] = "val/auroc"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """CvftCLI's arguments, with the medical report enabled."""
        super().add_arguments_to_parser(parser)
        parser.set_defaults({"medical_report.enabled": True})


#: Sub-commands that are not LightningCLI runs: name -> module whose ``main(argv)`` runs them.
_TOOLS = {"export": "cvft.export", "compare": "cvft.compare.cli", "explain": "cvft.medical.explain_cli"}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``cvft`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in _TOOLS:
        import importlib

        tool = importlib.import_module(_TOOLS[argv[0]])
        try:
            raise SystemExit(tool.main(argv[1:]))
        except CvftError as err:
            print(f"cvft {argv[0]}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    try:
        task = find_task(argv)
        if task == "detection":
            from cvft.cli_detection import run_detection_cli

            run_detection_cli(args)
            return
        if task == "medical":
            from cvft.data import MedicalImageDataModule

            cli_class, data_class = MedicalCLI, MedicalImageDataModule
        else:
            cli_class, data_class = CvftCLI, ImageFolderDataModule
        cli_class(
            ImageClassifier,
            data_class,
            args=args,
            trainer_defaults={"default_root_dir": "runs"},
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": "cvft: fine-tune timm backbones on your images."},
        )
    except CvftError as err:
        print(f"cvft: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
