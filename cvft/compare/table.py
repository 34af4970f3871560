"""The comparison table: one row per strategy, metrics as mean ± std over seeds, cost columns beside them.

:func:`build_table` aggregates the runs' results (``result.json`` of each run) into a :class:`CompareTable`, a small
DataFrame-like class (pandas is not a dependency; :meth:`CompareTable.to_pandas` converts when it is installed).
Standard deviations are the sample standard deviation over seeds (``n - 1`` in the denominator); with one finished
seed there is none (``nan``, an empty cell).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cvft.atomic import write_text_atomic

__all__ = ["CompareTable", "build_table", "mean_std"]

#: Cost columns of every row, in order, after the metric columns.
COST_COLUMNS = (
    "trainable_params",
    "total_params",
    "trainable_share",
    "images_per_s_mean",
    "images_per_s_std",
    "peak_rss_mb",
    "cuda_peak_mb",
    "wall_s_mean",
    "wall_s_std",
)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite ``values`` (``nan`` where undefined).

    Example:
        >>> mean_std([0.5, 0.7, 0.9])
        (0.7, 0.2)
        >>> mean_std([0.5])
        (0.5, nan)
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan
    mean = statistics.fmean(finite)
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return round(mean, 12), round(std, 12) if math.isfinite(std) else std


class CompareTable:
    """Rows of a comparison as dicts, with the few DataFrame habits a caller needs.

    Attributes:
        rows: One dict per strategy, keys in :attr:`columns`.
        columns: Column names in order.
        metrics: The metric names (``val/acc``, ``test/acc`` ...) with ``_mean`` / ``_std`` columns.
        headline: The metric plotted and shown first (``test/acc``, ``test/auroc``, ``val/map`` ...).
        folder: The comparison's folder, when the table belongs to one.

    Example:
        >>> table = build_table([
        ...     {"label": "lora", "seed": 0, "metrics": {"val/acc": 0.8}, "trainable_params": 10, "total_params": 100},
        ...     {"label": "lora", "seed": 1, "metrics": {"val/acc": 0.9}, "trainable_params": 10, "total_params": 100},
        ... ])
        >>> table["strategy"], table["val/acc_mean"], table["trainable_share"]
        (['lora'], [0.85], [0.1])
        >>> table.to_markdown().splitlines()[2].split(" | ")[:3]
        ['| lora', '0.8500 ± 0.0707', '10']
    """

    def __init__(
        self,
        rows: list[dict[str, Any]],
        columns: list[str],
        metrics: list[str],
        headline: str | None = None,
        folder: Path | None = None,
    ) -> None:
        self.rows, self.columns, self.metrics = rows, columns, metrics
        self.headline = headline if headline is not None else (metrics[0] if metrics else None)
        self.folder = folder

    def __getitem__(self, column: str) -> list[Any]:
        """The values of one column, a row per strategy."""
        if column not in self.columns:
            raise KeyError(f"No column {column!r}; columns: {', '.join(self.columns)}.")
        return [row.get(column) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return self.to_markdown()

    def row(self, strategy: str) -> dict[str, Any]:
        """The row of one strategy (its label)."""
        for row in self.rows:
            if row["strategy"] == strategy:
                return row
        raise KeyError(f"No row {strategy!r}; strategies: {', '.join(self['strategy'])}.")

    def to_csv(self, path: str | Path | None = None) -> str:
        """The table as CSV (numbers unrounded, ``nan`` as an empty cell); written atomically when ``path`` is given."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({key: _csv_cell(row.get(key)) for key in self.columns})
        text = buffer.getvalue()
        if path is not None:
            write_text_atomic(path, text)
        return text

    def to_markdown(self, path: str | Path | None = None) -> str:
        """The table as GitHub markdown, metrics as ``mean ± std``; written atomically when ``path`` is given."""
        header = ["strategy", *self.metrics, "trainable params", "share", "train images/s", "peak RSS (MiB)"]
        if any(row.get("cuda_peak_mb") is not None and _finite(row.get("cuda_peak_mb")) for row in self.rows):
            header.append("CUDA peak (MiB)")
        header += ["wall (s)", "runs"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [row["strategy"]]
            cells += [_pm(row.get(f"{m}_mean"), row.get(f"{m}_std"), "{:.4f}") for m in self.metrics]
            cells += [
                _fmt(row.get("trainable_params"), "{:,.0f}"),
                _fmt(row.get("trainable_share"), "{:.2%}"),
                _pm(row.get("images_per_s_mean"), row.get("images_per_s_std"), "{:.0f}"),
                _fmt(row.get("peak_rss_mb"), "{:.0f}"),
            ]
            if "CUDA peak (MiB)" in header:
                cells.append(_fmt(row.get("cuda_peak_mb"), "{:.0f}"))
            cells.append(_pm(row.get("wall_s_mean"), row.get("wall_s_std"), "{:.1f}"))
            runs = f"{row['runs_ok']}/{row['runs']}"
            if row.get("failed_logs"):
                runs += f" (failed: {row['failed_logs']})"
            cells.append(runs)
            lines.append("| " + " | ".join(cells) + " |")
        text = "\n".join(lines) + "\n"
        if path is not None:
            write_text_atomic(path, text)
        return text

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` of the rows (needs pandas, which cvft does not depend on)."""
        try:
            import pandas
        except ImportError:
            raise ImportError("CompareTable.to_pandas needs pandas: pip install pandas (or use .rows).") from None
        return pandas.DataFrame(self.rows, columns=self.columns)


def build_table(
    results: Sequence[dict[str, Any]],
    failures: Sequence[dict[str, Any]] = (),
    order: Sequence[str] | None = None,
    headline: str | None = None,
    folder: Path | None = None,
) -> CompareTable:
    """Aggregate finished runs (and failed ones) into one row per strategy.

    Args:
        results: One dict per finished run: ``label``, ``seed``, ``metrics`` (``{name: value}``),
            ``trainable_params``, ``total_params``, and optionally ``images_per_s``, ``peak_rss_mb``,
            ``cuda_peak_mb``, ``wall_s``.
        failures: One dict per failed run: ``label``, ``seed``, ``log`` (its log file) and ``error``.
        order: Row order (labels); by default the order in which labels first appear.
        headline: The metric to show first; by default the first one of the results.
        folder: Recorded as :attr:`CompareTable.folder`.

    Returns:
        The table; a strategy whose runs all failed has a row with empty metrics and its logs.
    """
    labels = list(order) if order is not None else []
    for item in [*results, *failures]:
        if item["label"] not in labels:
            labels.append(item["label"])
    metrics: list[str] = []
    for result in results:
        for name in result.get("metrics", {}):
            if name not in metrics:
                metrics.append(name)
    if headline is None:
        headline = next((r["headline"] for r in results if r.get("headline") in metrics), None)
    if headline in metrics:
        metrics.remove(headline)
        metrics.insert(0, headline)
    columns = ["strategy", "runs", "runs_ok", "seeds"]
    for name in metrics:
        columns += [f"{name}_mean", f"{name}_std"]
    columns += [*COST_COLUMNS, "failed_logs", "error"]
    rows = []
    for label in labels:
        done = [r for r in results if r["label"] == label]
        failed = [f for f in failures if f["label"] == label]
        row: dict[str, Any] = {
            "strategy": label,
            "runs": len(done) + len(failed),
            "runs_ok": len(done),
            "seeds": " ".join(str(r["seed"]) for r in sorted(done, key=lambda r: r["seed"])),
        }
        for name in metrics:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([r.get("metrics", {}).get(name) for r in done])
        trainable = [r["trainable_params"] for r in done if r.get("trainable_params") is not None]
        total = [r["total_params"] for r in done if r.get("total_params")]
        row["trainable_params"] = max(trainable) if trainable else None
        row["total_params"] = max(total) if total else None
        row["trainable_share"] = row["trainable_params"] / row["total_params"] if trainable and total else math.nan
        row["images_per_s_mean"], row["images_per_s_std"] = mean_std([r.get("images_per_s") for r in done])
        row["peak_rss_mb"] = _max([r.get("peak_rss_mb") for r in done])
        row["cuda_peak_mb"] = _max([r.get("cuda_peak_mb") for r in done])
        row["wall_s_mean"], row["wall_s_std"] = mean_std([r.get("wall_s") for r in done])
        row["failed_logs"] = " ".join(str(f["log"]) for f in failed)
        row["error"] = next((str(f["error"]) for f in failed if f.get("error")), "")
        rows.append(row)
    return CompareTable(rows, columns, metrics, headline, folder)


def _max(values: Sequence[Any]) -> float:
    finite = [float(v) for v in values if _finite(v)]
    return max(finite) if finite else math.nan


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def _fmt(value: Any, form: str) -> str:
    return form.format(value) if _finite(value) else "–"


def _pm(mean: Any, std: Any, form: str) -> str:
    if not _finite(mean):
        return "–"
    return f"{form.format(mean)} ± {form.format(std)}" if _finite(std) else form.format(mean)
