"""Medical-imaging evaluation: clinical metrics, ROC and reliability plots, a report callback and explanations.

Visual explanations (Grad-CAM, attention rollout, ``cvft explain``) live in :mod:`cvft.medical.explain`.

Example:
    >>> import torch
    >>> from cvft.medical import medical_metrics
    >>> medical_metrics(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]))["auroc_macro"]
    1.0
"""

from cvft.medical.metrics import MedicalMetrics, choose_threshold, flatten_metrics, medical_metrics, to_probabilities
from cvft.medical.plots import plot_confusion, plot_reliability_diagram, plot_roc_curves, reliability_bins
from cvft.medical.report import MedicalReport, collect_probabilities, write_metrics_table

__all__ = [
    "MedicalMetrics",
    "MedicalReport",
    "choose_threshold",
    "collect_probabilities",
    "flatten_metrics",
    "medical_metrics",
    "plot_confusion",
    "plot_reliability_diagram",
    "plot_roc_curves",
    "reliability_bins",
    "to_probabilities",
    "write_metrics_table",
]
