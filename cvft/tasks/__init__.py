"""Lightning task modules, each a :class:`FineTuningModule` with its own head, loss, steps and metrics.

Example:
    >>> from cvft.tasks import ImageClassifier
    >>> ImageClassifier("test_resnet", pretrained=False, num_classes=2).num_classes
    2
"""

from cvft.tasks.base import FineTuningModule
from cvft.tasks.classification import ImageClassifier
from cvft.tasks.detection import ObjectDetector
from cvft.tasks.multitask import MultiTaskClassifier
from cvft.tasks.schedules import WarmupCosine
from cvft.tasks.teachers import load_teacher  # and installs the teacher loader that reads cvft's files

__all__ = [
    "FineTuningModule",
    "ImageClassifier",
    "MultiTaskClassifier",
    "ObjectDetector",
    "WarmupCosine",
    "load_teacher",
]
