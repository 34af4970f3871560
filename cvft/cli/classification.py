"""``cvft fit|validate|test|predict`` for image classification: :class:`CvftCLI` and its medical form.

:class:`CvftCLI` is the LightningCLI for :class:`~cvft.tasks.ImageClassifier` on image-folder data;
:class:`MedicalCLI` the same on :class:`~cvft.data.MedicalImageDataModule` with the medical report on. ``cvft``
(:mod:`cvft.cli.dispatch`) runs one of them through :func:`run_classification_cli` unless the command line asks for
another task.

Every fit writes, into ``<trainer.default_root_dir>/<run name>/version_<n>/``: ``checkpoints/`` (best and last),
``metrics.csv``, TensorBoard event files, ``learning_curves.png``, ``confusion_matrix.png`` and ``config.yaml``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from lightning.pytorch.cli import LightningArgumentParser

from cvft.callbacks import PredictionWriter, TrainingReport
from cvft.cli.base import RunCLI, cli_defaults, print_fit_results, run_summary
from cvft.cli.tuning import LR_FIND
from cvft.data import ImageFolderDataModule
from cvft.data.user_pipeline import load_user_pipeline
from cvft.errors import CvftError
from cvft.medical.report import MedicalReport
from cvft.tasks import ImageClassifier

__all__ = [
    "CvftCLI",
    "MedicalCLI",
    "add_teacher",
    "adapter_into_config",
    "run_classification_cli",
    "saved_eval_transform_into_config",
]

_logger = logging.getLogger(__name__)


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


def saved_eval_transform_into_config(config: Any, data_hparams: dict[str, Any]) -> None:
    """Outside fit: evaluate with the ``eval_transform`` the checkpoint's run trained with (its serialised pipeline).

    The checkpoint records the pipeline itself (``datamodule_hyper_parameters``), not the file it was read from, so
    ``predict`` / ``test`` with ``--ckpt_path`` preprocess exactly as validation did during the fit, with or without
    the run's ``config.yaml``, even if the file changed since. A different ``--data.eval_transform`` is replaced by
    the saved one, with a warning. Nothing changes when the run used cvft's own evaluation pipeline.
    """
    saved = data_hparams.get("eval_transform")
    if not saved or "eval_transform" not in config.data:
        return
    given = config.data.get("eval_transform")
    if given is not None and _serialised(given) != _serialised(saved):
        _logger.warning(
            "--data.eval_transform differs from the evaluation pipeline saved in the checkpoint; using the saved "
            "one, which the run was validated with. To evaluate with another pipeline, build the DataModule in Python."
        )
    config.data.eval_transform = saved


def _serialised(spec: Any) -> Any:
    """The saved form of a pipeline option (``None`` when it cannot be loaded or is a Python callable)."""
    try:
        pipeline = load_user_pipeline(spec, "eval_transform")
    except CvftError:
        return None
    return pipeline.serialised if pipeline is not None else None


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
        if subcommand not in (None, "fit", LR_FIND):
            adapter_into_config(config)
        super().before_instantiate_classes()

    def from_checkpoint_hparams(self, config: Any, hparams: dict[str, Any]) -> None:
        """Outside fit, the class names and the evaluation pipeline the run trained with come from the checkpoint."""
        if config.data.get("class_names") is None and hparams.get("class_names"):
            config.data.class_names = list(hparams["class_names"])
        saved_eval_transform_into_config(config, self.checkpoint_data_hparams)

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


def run_classification_cli(
    args: list[str] | None = None, task: Literal["classification", "medical"] = "classification", run: bool = True
) -> CvftCLI:
    """Build (and by default run) the classification CLI of ``task`` with cvft's defaults; ``cvft`` calls this.

    Args:
        args: Command-line arguments (``sys.argv[1:]`` when None).
        task: ``"classification"`` (:class:`CvftCLI` on image folders) or ``"medical"`` (:class:`MedicalCLI`).
        run: Run the subcommand; ``False`` only instantiates (then ``args`` has no subcommand).

    Returns:
        The CLI, with ``model``, ``datamodule`` and ``trainer``.
    """
    if task == "medical":
        from cvft.data import MedicalImageDataModule

        cli_class, data_class = MedicalCLI, MedicalImageDataModule
    else:
        cli_class, data_class = CvftCLI, ImageFolderDataModule
    description = "cvft: fine-tune timm backbones on your images."
    return cli_class(ImageClassifier, data_class, args=args, run=run, **cli_defaults(description))
