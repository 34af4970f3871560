"""``cvft fit --task detection``: the LightningCLI for :class:`~cvft.tasks.ObjectDetector` on detection data.

``cvft`` picks this CLI when the command line says ``--task detection`` or a ``--config`` file has the top-level
key ``task: detection`` (every recipe in ``configs/detection/`` does)::

    python datasets/make_detection_shapes.py data/shapes_detection
    cvft fit --config configs/detection/fcos_shapes.yaml
    cvft predict --config runs/detection/version_0/config.yaml --data.predict_root new_images/
        --ckpt_path runs/detection/version_0/checkpoints/best.ckpt --predictions.draw true

A fit writes, into ``<trainer.default_root_dir>/detection/version_<n>/``: ``checkpoints/`` (best by ``val/map``
and last), ``metrics.csv``, TensorBoard event files, ``learning_curves.png``, ``config.yaml`` and, when strategies
are used, ``adapter.safetensors``. ``cvft predict`` writes ``predictions.json`` (boxes in original-image pixels).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from lightning.pytorch.cli import LightningArgumentParser

from cvft.callbacks import DetectionPredictionWriter, TrainingReport
from cvft.cli.base import RunCLI, cli_defaults, print_fit_results, run_summary

__all__ = ["DetectionCLI", "run_detection_cli"]


class DetectionCLI(RunCLI):
    """LightningCLI wired for object detection.

    * ``num_classes``, ``class_names`` and ``category_ids`` (the original dataset ids of the classes) come from the
      data module once it is instantiated; ``data.image_size`` is passed on to ``model.image_size`` (the data owns
      the resize, the detector only has to know it so it does not resize again).
    * Callbacks always present and configurable: ``--checkpoint.*`` (best by ``val/map`` and last), ``--report.*``
      (learning curves), ``--predictions.*`` (``predictions.json``, ``--predictions.draw true`` for PNGs).
    * Without ``--trainer.logger``, metrics go to CSV and TensorBoard in the same run folder.
    * With ``--ckpt_path`` outside ``fit``, the classes come from the checkpoint and no pretrained weights load.

    Example:
        >>> [name for name in ("before_fit", "after_fit", "after_predict") if hasattr(DetectionCLI, name)]
        ['before_fit', 'after_fit', 'after_predict']
    """

    run_name: ClassVar[str] = "detection"
    monitor: ClassVar[str] = "val/map"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link data into the model and add the detection callbacks and ``--task``."""
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.category_ids", "model.category_ids", apply_on="instantiate")
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(TrainingReport, "report")
        parser.set_defaults({"report.confusion": False})
        parser.add_lightning_class_args(DetectionPredictionWriter, "predictions")
        parser.add_argument(
            "--task",
            type=Literal["detection"],
            default="detection",
            help="What to train; `cvft` picks the CLI from it (leave out or `classification` for image labels).",
        )

    def from_checkpoint_hparams(self, config: Any, hparams: dict[str, Any]) -> None:
        """Outside fit, the classes and their dataset ids come from the checkpoint."""
        for key in ("class_names", "category_ids"):
            if key in config.data and config.data.get(key) is None and hparams.get(key) is not None:
                config.data[key] = list(hparams[key])

    def before_fit(self) -> None:
        """Say which weights the run starts from and how many parameters train."""
        hparams = self.model.hparams
        print(run_summary(self.model, f"{hparams.head} detector on {hparams.backbone}"), flush=True)
        super().before_fit()

    def after_fit(self) -> None:
        """Print the final validation mAP, where the outputs are, and save the adapter of a strategy run."""
        if self.trainer.is_global_zero:
            metrics = {
                k: float(v)
                for k, v in self.trainer.callback_metrics.items()
                if k.startswith("val/") and not k.startswith("val/ap/") and v.numel() == 1
            }
            print_fit_results(self.trainer, self.model, metrics)

    def after_predict(self) -> None:
        """Print where the predictions (and drawings) went."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, DetectionPredictionWriter) and callback.path is not None:
                print(f"Predictions: {callback.path}", flush=True)
                if callback.drawings:
                    print(f"Drawn: {len(callback.drawings)} images in {callback.drawings[0].parent}", flush=True)


def run_detection_cli(args: list[str] | None = None, run: bool = True) -> DetectionCLI:
    """Build (and by default run) the detection CLI with cvft's defaults; ``cvft`` calls this for detection.

    Args:
        args: Command-line arguments (``sys.argv[1:]`` when None).
        run: Run the subcommand; ``False`` only instantiates (then ``args`` has no subcommand).

    Returns:
        The CLI, with ``model``, ``datamodule`` and ``trainer``.
    """
    from cvft.data.detection import DetectionDataModule
    from cvft.tasks.detection import ObjectDetector

    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # its INFO prints every COCO summary table

    description = "cvft: fine-tune timm backbones as object detectors."
    return DetectionCLI(ObjectDetector, DetectionDataModule, args=args, run=run, **cli_defaults(description))
