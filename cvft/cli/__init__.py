"""The ``cvft`` command: LightningCLI with cvft's tasks, data modules and sensible run outputs.

Examples::

    cvft fit --config configs/efficientnet_lite0_digits.yaml
    cvft fit --model.backbone vit_small_patch16_224.augreg_in21k --data.root my_images/ --trainer.max_epochs 5
    cvft predict --config runs/cvft/version_0/config.yaml --data.predict_root new_images/
        --ckpt_path runs/cvft/version_0/checkpoints/best.ckpt

Every fit writes, into ``<trainer.default_root_dir>/<run name>/version_<n>/``: ``checkpoints/`` (best and last),
``metrics.csv``, TensorBoard event files, ``learning_curves.png``, ``confusion_matrix.png`` and ``config.yaml``.
A config with the top-level key ``task: detection`` (or ``--task detection``) runs the detection CLI instead.

The package, from the bottom up (no module imports one above it):

* :mod:`cvft.cli.base`: what every command shares (:class:`RunCLI`: run folders, safe checkpoints, resuming; the
  fit summary and results);
* :mod:`cvft.cli.classification`: :class:`CvftCLI` and :class:`MedicalCLI`;
* :mod:`cvft.cli.detection`: :class:`DetectionCLI`;
* :mod:`cvft.cli.dispatch`: :func:`main`, which picks the CLI (or tool) a command line asks for.

``python -m cvft.cli ...`` is the same as ``cvft ...``.
"""

from cvft.cli.base import RunCLI, print_fit_results, read_checkpoint_hparams, run_summary
from cvft.cli.classification import CvftCLI, MedicalCLI, adapter_into_config, add_teacher, run_classification_cli
from cvft.cli.detection import DetectionCLI, run_detection_cli
from cvft.cli.dispatch import TASKS, find_task, main

__all__ = [
    "CvftCLI",
    "MedicalCLI",
    "DetectionCLI",
    "RunCLI",
    "main",
    "run_summary",
    "print_fit_results",
    "read_checkpoint_hparams",
    "add_teacher",
    "adapter_into_config",
    "find_task",
    "run_classification_cli",
    "run_detection_cli",
    "TASKS",
]
