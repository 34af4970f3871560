"""Lightning callbacks: what people look at after training, and the training toolbox (EMA, drop path, speed).

The toolbox callbacks are the EMA of the trained weights, the drop-path schedule and the speed switches.

Example:
    >>> from cvft.callbacks import PredictionWriter, TrainingReport
    >>> TrainingReport().curves
    True
"""

from cvft.callbacks.checkpoint import RunCheckpoint
from cvft.callbacks.detection_predictions import DetectionPredictionWriter
from cvft.callbacks.drop_path import DropPathSchedule
from cvft.callbacks.ema import EMAWeightAveraging
from cvft.callbacks.prediction_file import PredictionFileWriter
from cvft.callbacks.predictions import PredictionWriter
from cvft.callbacks.report import TrainingReport, output_dir, plot_confusion_matrix, plot_learning_curves
from cvft.callbacks.speed import CompileFallbackWarning, SpeedSwitches

__all__ = [
    "RunCheckpoint",
    "EMAWeightAveraging",
    "DropPathSchedule",
    "SpeedSwitches",
    "CompileFallbackWarning",
    "TrainingReport",
    "PredictionFileWriter",
    "PredictionWriter",
    "DetectionPredictionWriter",
    "output_dir",
    "plot_learning_curves",
    "plot_confusion_matrix",
]
