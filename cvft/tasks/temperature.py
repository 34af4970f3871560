"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") and the calibration error.

A classifier's confidences are often too high after fine-tuning. Temperature scaling divides every logit by one
scalar ``T > 0``, chosen to minimise the negative log-likelihood (NLL) of held-out (validation) labels. ``T`` does not
change the argmax (nor, for multi-label sigmoid outputs, which side of 0.5 a probability is on), so accuracy, F1 and
the predicted classes stay; only the probabilities move.

:func:`fit_temperature` finds ``T`` by bisection on the derivative of the NLL with respect to ``beta = 1 / T``: the
NLL is convex in ``beta`` (a log-sum-exp, or a softplus, of functions linear in ``beta``), so the derivative is
increasing and its root is the one minimum; the search runs in float64 on ``log beta`` over ``T`` in
``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` and is deterministic. Multi-label outputs get one ``T`` for every label, fitted
on the binary cross-entropy pooled over all (image, label) pairs (as the pooled multi-label ECE of
:mod:`cvft.medical.metrics`).

:func:`expected_calibration_error` (ECE) uses equal-width confidence bins (15 by default) and the l1 norm:
``sum_b |accuracy_b - confidence_b| * n_b / N``. Single-label: the top-1 probability against top-1 correctness;
multi-label: every (image, label) probability against the label. A confidence of exactly 1 joins the last bin.
:func:`calibrate_temperature` fits ``T`` and measures NLL and ECE before and after, as a :class:`TemperatureFit`.

Example:
    >>> generator = torch.Generator().manual_seed(0)
    >>> true_logits = torch.randn(2000, 4, generator=generator)
    >>> labels = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).squeeze(1)
    >>> fit = calibrate_temperature(3.0 * true_logits, labels)  # three times too confident
    >>> 2.8 < fit.temperature < 3.2, fit.nll_after < fit.nll_before, fit.ece_after < fit.ece_before
    (True, True, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from cvft.errors import CvftError

__all__ = [
    "ECE_BINS",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "TemperatureFit",
    "calibrate_temperature",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "reliability_bins",
    "scaled_probabilities",
]

ECE_BINS = 15
"""Equal-width confidence bins of the ECE (Guo et al. use 15)."""
MIN_TEMPERATURE = 0.01
"""Smallest temperature :func:`fit_temperature` returns."""
MAX_TEMPERATURE = 100.0
"""Largest temperature :func:`fit_temperature` returns."""

_BISECTION_STEPS = 80


def scaled_probabilities(logits: Tensor, temperature: float | Tensor = 1.0, multi_label: bool = False) -> Tensor:
    """``softmax(logits / T)``, or for multi-label ``sigmoid(logits / T)``.

    Example:
        >>> scaled_probabilities(torch.tensor([[2.0, 0.0]]), temperature=2.0)
        tensor([[0.7311, 0.2689]])
    """
    scaled = logits / temperature
    return scaled.sigmoid() if multi_label else scaled.softmax(-1)


def negative_log_likelihood(logits: Tensor, targets: Tensor, multi_label: bool = False) -> float:
    """Mean NLL of the labels: cross-entropy, or for multi-label the binary cross-entropy over every (image, label).

    Example:
        >>> round(negative_log_likelihood(torch.tensor([[0.0, 0.0]]), torch.tensor([1])), 4)  # log 2
        0.6931
    """
    logits = logits.detach().double()
    if multi_label:
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.double()))
    return float(torch.nn.functional.cross_entropy(logits, targets.long()))


def _nll_slope(beta: float, logits: Tensor, targets: Tensor, multi_label: bool) -> float:
    """Derivative of the mean NLL of ``beta * logits`` with respect to ``beta`` (increasing in ``beta``)."""
    if multi_label:  # d/dbeta [softplus(beta z) - y beta z] = (sigmoid(beta z) - y) z
        return float(((torch.sigmoid(beta * logits) - targets) * logits).mean())
    # d/dbeta [logsumexp(beta z) - beta z_y] = sum_k softmax(beta z)_k z_k - z_y
    expected = (torch.softmax(beta * logits, -1) * logits).sum(-1)
    return float((expected - logits.gather(1, targets[:, None]).squeeze(1)).mean())


def fit_temperature(logits: Tensor, targets: Tensor, multi_label: bool = False) -> float:
    """The temperature ``T`` in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` minimising the mean NLL of ``logits / T``.

    Args:
        logits: ``(N, C)`` logits of held-out images (the model's validation outputs).
        targets: ``(N,)`` class indices, or for multi-label ``(N, C)`` 0/1 labels.
        multi_label: Sigmoid outputs: one ``T`` for all labels, fitted on the pooled binary cross-entropy.

    Returns:
        The temperature; a bound when the minimum lies beyond it (e.g. ``MIN_TEMPERATURE`` when every validation
        image is classified correctly with a margin, where the NLL keeps falling as ``T`` shrinks).

    Raises:
        CvftError: No samples, or shapes that do not match.

    Example:
        >>> logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
        >>> T = fit_temperature(logits, torch.tensor([0, 0, 1, 1]))  # one in four wrong: less confident
        >>> round(T, 4), round(4.0 / T, 4) == round(math.log(3), 4)  # the optimum puts 3/4 on the argmax
        (3.641, True)
    """
    logits, targets = _checked(logits, targets, multi_label)
    low, high = math.log(1.0 / MAX_TEMPERATURE), math.log(1.0 / MIN_TEMPERATURE)  # log beta
    if _nll_slope(math.exp(low), logits, targets, multi_label) >= 0:
        return MAX_TEMPERATURE
    if _nll_slope(math.exp(high), logits, targets, multi_label) <= 0:
        return MIN_TEMPERATURE
    for _ in range(_BISECTION_STEPS):  # 80 halvings of ln(1e4) reach float64 resolution
        middle = (low + high) / 2
        if _nll_slope(math.exp(middle), logits, targets, multi_label) < 0:
            low = middle
        else:
            high = middle
    return 1.0 / math.exp((low + high) / 2)


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins: per bin the count, mean confidence and accuracy (``nan`` when empty)."""

    edges: list[float]
    counts: list[int]
    confidence: list[float]
    accuracy: list[float]

    @property
    def ece(self) -> float:
        """The count-weighted mean of ``|accuracy - confidence|`` over the filled bins."""
        total = sum(self.counts)
        gaps = (abs(a - c) * n for a, c, n in zip(self.accuracy, self.confidence, self.counts, strict=True) if n)
        return float(sum(gaps) / total) if total else math.nan


def reliability_bins(probs: Tensor, targets: Tensor, multi_label: bool = False, n_bins: int = ECE_BINS):
    """Bin the confidences: top-1 probability against correctness, or (multi-label) each probability against its label.

    Bin ``i`` holds ``i / n_bins <= confidence < (i + 1) / n_bins``; a confidence of exactly 1 joins the last bin.

    Example:
        >>> bins = reliability_bins(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), n_bins=2)
        >>> bins.counts, bins.accuracy, round(bins.ece, 4)  # one bin: |0.5 - (0.9 + 0.7) / 2|
        ([0, 2], [nan, 0.5], 0.3)
    """
    if n_bins < 1:
        raise CvftError(f"n_bins must be >= 1, got {n_bins}.")
    probs, targets = _checked(probs, targets, multi_label)
    if multi_label:
        confidence, correct = probs.reshape(-1), targets.reshape(-1)
    else:
        confidence, predicted = probs.max(-1)
        correct = (predicted == targets).double()
    index = (confidence * n_bins).floor().long().clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    sums = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    hits = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    filled = counts.clamp_min(1).double()
    empty = counts == 0
    return ReliabilityBins(
        edges=[i / n_bins for i in range(n_bins + 1)],
        counts=counts.tolist(),
        confidence=(sums / filled).masked_fill(empty, math.nan).tolist(),
        accuracy=(hits / filled).masked_fill(empty, math.nan).tolist(),
    )


def expected_calibration_error(
    probs: Tensor, targets: Tensor, multi_label: bool = False, n_bins: int = ECE_BINS
) -> float:
    """ECE of probabilities (see the module docstring): ``sum_b |accuracy_b - confidence_b| * n_b / N``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]])
        >>> round(expected_calibration_error(probs, torch.tensor([0, 1, 1])), 4)  # (0.1 + 0.8 + 0.4) / 3
        0.4333
    """
    return reliability_bins(probs, targets, multi_label, n_bins).ece


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and the calibration it gives on the data it was fitted on.

    Attributes:
        temperature: The fitted ``T``.
        samples: Number of images.
        nll_before: Mean NLL of the unscaled logits.
        nll_after: Mean NLL of ``logits / T``.
        ece_before: ECE of the unscaled probabilities.
        ece_after: ECE of the scaled probabilities.
        accuracy: Top-1 accuracy (multi-label: the fraction of labels on the right side of 0.5); ``T`` keeps it.
        n_bins: Bins of the ECE.
        bins_before: Reliability bins before scaling.
        bins_after: Reliability bins after scaling.
        epoch: Training epoch of the weights the logits came from (``None``: not recorded).
        step: Optimizer step of those weights (``None``: not recorded).
    """

    temperature: float
    samples: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    accuracy: float
    n_bins: int
    bins_before: ReliabilityBins = field(repr=False)
    bins_after: ReliabilityBins = field(repr=False)
    epoch: int | None = None
    step: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON: every field, the bins as dictionaries of lists."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the end of a fit.

        Example:
            >>> logits, labels = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]), torch.tensor([0, 1, 1])
            >>> calibrate_temperature(logits, labels).summary()  # two in three right: T = 4 / ln 2
            'Temperature scaling on 3 validation images: T 5.7708 | NLL 1.3515 -> 0.6365 | ECE (15 bins) 0.3153 -> 0.0000'
        """  # noqa: E501
        return (
            f"Temperature scaling on {self.samples} validation images: T {self.temperature:.4f} | "
            f"NLL {self.nll_before:.4f} -> {self.nll_after:.4f} | "
            f"ECE ({self.n_bins} bins) {self.ece_before:.4f} -> {self.ece_after:.4f}"
        )


def calibrate_temperature(
    logits: Tensor,
    targets: Tensor,
    multi_label: bool = False,
    n_bins: int = ECE_BINS,
    epoch: int | None = None,
    step: int | None = None,
) -> TemperatureFit:
    """Fit ``T`` (:func:`fit_temperature`) and measure NLL and ECE before and after scaling.

    Args:
        logits: ``(N, C)`` held-out logits.
        targets: ``(N,)`` class indices, or ``(N, C)`` 0/1 labels for multi-label.
        multi_label: Sigmoid outputs.
        n_bins: Bins of the ECE.
        epoch: Recorded in the result (the epoch of the weights).
        step: Recorded in the result (the optimizer step of the weights).
    """
    logits, targets = _checked(logits, targets, multi_label)
    temperature = fit_temperature(logits, targets, multi_label)
    before = scaled_probabilities(logits, 1.0, multi_label)
    after = scaled_probabilities(logits, temperature, multi_label)
    if multi_label:
        accuracy = float(((logits >= 0).double() == targets).double().mean())
    else:
        accuracy = float((logits.argmax(-1) == targets).double().mean())
    bins_before = reliability_bins(before, targets, multi_label, n_bins)
    bins_after = reliability_bins(after, targets, multi_label, n_bins)
    return TemperatureFit(
        temperature=temperature,
        samples=len(logits),
        nll_before=negative_log_likelihood(logits, targets, multi_label),
        nll_after=negative_log_likelihood(logits / temperature, targets, multi_label),
        ece_before=bins_before.ece,
        ece_after=bins_after.ece,
        accuracy=accuracy,
        n_bins=n_bins,
        bins_before=bins_before,
        bins_after=bins_after,
        epoch=epoch,
        step=step,
    )


def _checked(values: Tensor, targets: Tensor, multi_label: bool) -> tuple[Tensor, Tensor]:
    """float64 CPU values and targets (float64 0/1 for multi-label, int64 indices else), shapes checked."""
    values = torch.as_tensor(values).detach().double().cpu()
    targets = torch.as_tensor(targets).detach().cpu()
    expected = tuple(values.shape) if multi_label else tuple(values.shape[:1])
    if values.ndim != 2 or len(values) == 0 or tuple(targets.shape) != expected:
        raise CvftError(
            f"Temperature scaling needs (N, C) logits with N >= 1 and {'(N, C) 0/1 labels' if multi_label else '(N,)'}"
            f" targets, got {tuple(values.shape)} and {tuple(targets.shape)}."
        )
    return values, targets.double() if multi_label else targets.long()
