"""Lightning callbacks that write what people look at after training, and the EMA of the trained weights.

Example:
    >>> from cvft.callbacks import PredictionWriter, TrainingReport
    >>> TrainingReport().curves
    True
"""

from cvft.callbacks.checkpoint import RunCheckpoint
from cvft.callbacks.detection_predictions import DetectionPredictionWriter
from cvft.callbacks.ema import EMAWeightAveraging
from cvft.callbacks.prediction_file import PredictionFileWriter
from cvft.callbacks.predictions import PredictionWriter
from cvft.callbacks.report import TrainingReport, output_dir, plot_confusion_matrix, plot_learning_curves

__all__ = [
    "RunCheckpoint",
    "EMAWeightAveraging",
    "TrainingReport",
    "PredictionFileWriter",
    "PredictionWriter",
    "DetectionPredictionWriter",
    "output_dir",
    "plot_learning_curves",
    "plot_confusion_matrix",
]
