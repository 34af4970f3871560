"""``compare.png``: the metric against trainable parameters and against training speed, Pareto fronts marked."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from cvft.compare.table import CompareTable

__all__ = ["pareto_front", "plot_comparison"]


def pareto_front(metric: Sequence[float], cost: Sequence[float], lower_cost_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats: higher ``metric`` and better ``cost`` (lower, or higher).

    A point is dominated when another is at least as good on both axes and strictly better on one. Points with a
    non-finite value are never on the front. The indices come sorted by cost (ascending), best metric first on ties.

    Args:
        metric: Higher is better.
        cost: Trainable parameters (lower is better) or images/s (``lower_cost_is_better=False``).
        lower_cost_is_better: Direction of ``cost``.

    Example:
        >>> pareto_front([0.90, 0.80, 0.70, 0.85], [1000, 10, 20, 500])
        [1, 3, 0]
        >>> pareto_front([0.90, 0.80, 0.70], [50.0, 200.0, 100.0], lower_cost_is_better=False)
        [0, 1]
    """
    sign = 1.0 if lower_cost_is_better else -1.0
    points = [
        (i, float(m), sign * float(c))
        for i, (m, c) in enumerate(zip(metric, cost, strict=True))
        if m is not None and c is not None and math.isfinite(m) and math.isfinite(c)
    ]
    front = []
    for i, m, c in points:
        dominated = any(m2 >= m and c2 <= c and (m2 > m or c2 < c) for j, m2, c2 in points if j != i)
        if not dominated:
            front.append((sign * c, -m, i))  # sorted by the cost itself, ascending
    return [i for _, _, i in sorted(front)]


def plot_comparison(table: CompareTable, path: str | Path, metric: str | None = None) -> Path:
    """Write ``path`` (PNG, atomically): ``metric`` vs trainable parameters (log x) and vs training images/s.

    Error bars are the standard deviation over seeds; the Pareto front of each panel (higher metric with fewer
    parameters; higher metric with more images/s) is drawn as a line through ringed points.

    Args:
        table: The comparison table.
        path: Where the PNG goes.
        metric: The metric on the y axis; the table's headline metric by default.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metric = metric or table.headline
    target = Path(path)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    if metric is None or f"{metric}_mean" not in table.columns:
        for axis in axes:
            axis.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=axis.transAxes)
            axis.set_axis_off()
    else:
        labels = table["strategy"]
        values = [_number(v) for v in table[f"{metric}_mean"]]
        errors = [0.0 if not math.isfinite(_number(v)) else _number(v) for v in table[f"{metric}_std"]]
        panels = (
            ("trainable_params", "trainable parameters (log scale)", True, True),
            ("images_per_s_mean", "train images/s (median step)", False, False),
        )
        for axis, (column, xlabel, log_x, lower_better) in zip(axes, panels, strict=True):
            xs = [_number(v) for v in table[column]]
            shown = [i for i in range(len(labels)) if math.isfinite(xs[i]) and math.isfinite(values[i])]
            for i in shown:
                axis.errorbar(xs[i], values[i], yerr=errors[i], fmt="o", capsize=3, color="tab:blue")
                axis.annotate(labels[i], (xs[i], values[i]), textcoords="offset points", xytext=(5, 5), fontsize=8)
            front = pareto_front(values, xs, lower_cost_is_better=lower_better)
            if front:
                axis.plot([xs[i] for i in front], [values[i] for i in front], "--", color="tab:red", lw=1,
                          label="Pareto front")  # fmt: skip
                axis.scatter([xs[i] for i in front], [values[i] for i in front], s=140, facecolors="none",
                             edgecolors="tab:red", zorder=3)  # fmt: skip
                axis.legend(loc="lower right", fontsize=8)
            if log_x and any(xs[i] > 0 for i in shown):
                axis.set_xscale("log")
            axis.set_xlabel(xlabel)
            axis.set_ylabel(f"{metric} (mean ± std over seeds)")
            axis.grid(alpha=0.3)
        axes[0].set_title(f"{metric} vs trainable parameters")
        axes[1].set_title(f"{metric} vs training speed")
    partial = target.with_name(f".{target.stem}.{os.getpid()}.tmp.png")
    figure.savefig(partial, dpi=120, format="png")
    plt.close(figure)
    os.replace(partial, target)
    return target


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan
