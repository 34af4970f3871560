"""One fit of a comparison, run in a process of its own by :mod:`cvft.compare.runner`.

``python -m cvft.compare.worker <fit.json> fit --config base.yaml ... --model.strategies=[...] --seed_everything=0``
runs the fit through :func:`cvft.cli.main` with a :class:`~cvft.compare.probe.RunProbe` added to the callbacks,
then tests the best checkpoint when the data has a test split, and writes ``fit.json`` (atomically) with the
metrics, trainable parameters, images/s, peak memory and timings. A fit that fails exits with the fit's own exit
code (2 for a cvft error) and writes nothing, so its run stays to do.

Metrics come from the run itself, not from its printed output: the best value of the monitored metric from the
checkpoint callback; on the test split the metrics that ``trainer.test`` returns for the best checkpoint; on the
validation split (no test data) the ``metrics.csv`` row of the best epoch; medical AUROC, sensitivity and
specificity from the medical report (test: best checkpoint, at the operating point chosen on validation data;
validation: the report written when fit ends).
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the heavy imports: the process's start-up cost is measured from here

import csv  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from cvft.atomic import write_json_atomic  # noqa: E402

__all__ = ["MAIN_METRICS", "MEDICAL_METRICS", "HEADLINE_METRIC", "main_metrics", "best_row", "run_fit", "main"]

#: The metrics each task reports beside the monitored one (names as the task logs them, without the split).
MAIN_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("acc", "f1_macro", "auroc"),
    "medical": ("acc",),
    "detection": ("map", "map_50"),
}
#: Medical report summaries reported under the name on the left (binary: the positive class).
MEDICAL_METRICS: dict[str, str] = {
    "auroc": "auroc_macro",
    "sensitivity": "sensitivity_macro",
    "specificity": "specificity_macro",
}
#: The metric a comparison plots by default, per task.
HEADLINE_METRIC: dict[str, str] = {"classification": "acc", "medical": "auroc", "detection": "map"}

_CALLBACK = "--trainer.callbacks+=cvft.compare.probe.RunProbe"


def main_metrics(
    task: str, split: str, logged: dict[str, float], medical: dict[str, Any] | None = None
) -> dict[str, float]:
    """The task's main metrics of one split, keyed ``<split>/<name>``.

    Args:
        task: ``classification``, ``medical`` or ``detection``.
        split: ``test`` or ``val``.
        logged: Metrics as the task logged them (``test/acc`` ...); names not logged are left out.
        medical: The medical report's result for ``split`` (``auroc_macro`` ...), for ``task="medical"``.

    Example:
        >>> main_metrics("medical", "test", {"test/acc": 0.9, "test/loss": 0.3},
        ...              {"auroc_macro": 0.95, "sensitivity_macro": 0.8, "specificity_macro": 0.85})
        {'test/acc': 0.9, 'test/auroc': 0.95, 'test/sensitivity': 0.8, 'test/specificity': 0.85}
    """
    found = {
        f"{split}/{name}": float(logged[f"{split}/{name}"])
        for name in MAIN_METRICS[task]
        if f"{split}/{name}" in logged
    }
    if task == "medical" and medical:
        for name, key in MEDICAL_METRICS.items():
            value = medical.get(key)
            found[f"{split}/{name}"] = float(value) if value is not None else math.nan
    return found


def best_row(metrics_csv: str | Path, monitor: str, mode: str = "max") -> dict[str, float]:
    r"""The metrics logged at the step where ``monitor`` was best (the first such step, as the checkpoint keeps).

    Every row logged at that step is merged, so metrics written in separate rows of one step are all found.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = path.write_text("epoch,step,val/acc,val/f1_macro\n0,4,0.5,0.4\n1,9,0.75,0.7\n2,14,0.75,0.6\n")
        >>> best_row(path, "val/acc")
        {'epoch': 1.0, 'step': 9.0, 'val/acc': 0.75, 'val/f1_macro': 0.7}
    """
    with open(metrics_csv, newline="") as handle:
        rows = [
            {k: float(v) for k, v in row.items() if k and v not in ("", None) and _is_number(v)}
            for row in csv.DictReader(handle)
        ]
    scored = [row for row in rows if monitor in row and math.isfinite(row[monitor])]
    if not scored:
        return {}
    better = max if mode == "max" else min
    target = better(row[monitor] for row in scored)
    chosen = next(row for row in scored if row[monitor] == target)
    merged: dict[str, float] = {}
    for row in rows:
        if row.get("step") == chosen.get("step"):
            merged.update(row)
    merged.update(chosen)
    return merged


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _has_test_split(datamodule: Any) -> bool:
    """Whether the data module serves test data (cvft's modules raise a DatasetError when there is none)."""
    from cvft.errors import CvftError

    if datamodule is None or not hasattr(datamodule, "test_dataloader"):
        return False
    try:
        loader = datamodule.test_dataloader()
    except (CvftError, NotImplementedError):
        return False
    try:
        return len(loader) > 0
    except TypeError:
        return True


def _medical_result(trainer: Any, split: str) -> dict[str, Any] | None:
    from cvft.medical.report import MedicalReport

    for callback in trainer.callbacks:
        if isinstance(callback, MedicalReport) and callback.enabled:
            return callback.results.get(split)
    return None


def _metrics_csv(trainer: Any) -> Path | None:
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.log_dir) / "metrics.csv"
    return None


def _peak_memory_mb() -> tuple[float, float | None]:
    """Peak resident memory of this process (MiB) and, on GPU, CUDA's peak allocated memory (MiB)."""
    import torch

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20  # Linux: KiB, macOS: bytes
    cuda_mb = (
        torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return rss_mb, cuda_mb


def run_fit(result_path: str | Path, fit_args: list[str]) -> int:
    """Run one fit (and test) and write its ``fit.json``; return the process exit code.

    Args:
        result_path: Where ``fit.json`` goes.
        fit_args: ``cvft`` arguments starting with ``fit``.
    """
    from cvft.cli import find_task
    from cvft.cli import main as cvft_main
    from cvft.compare.probe import RunProbe
    from cvft.errors import CvftError

    imported = time.perf_counter()
    RunProbe.instances.clear()
    try:
        cvft_main([*fit_args, _CALLBACK])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        if code:
            return code
    probe = next((p for p in reversed(RunProbe.instances) if p.trainer is not None), None)
    if probe is None:
        print("cvft compare: error: the fit ran without the run probe, so nothing was measured.", file=sys.stderr)
        return 1
    trainer, task = probe.trainer, find_task(fit_args)
    checkpoint = trainer.checkpoint_callback
    monitor = getattr(checkpoint, "monitor", None) or "val/acc"
    best_score = getattr(checkpoint, "best_model_score", None)
    best_path = getattr(checkpoint, "best_model_path", "") or None
    try:
        if _has_test_split(trainer.datamodule):
            split = "test"
            logged = trainer.test(
                trainer.lightning_module, datamodule=trainer.datamodule, ckpt_path=best_path, verbose=False
            )
            logged = {k: float(v) for k, v in (logged[0] if logged else {}).items()}
        else:
            split = "val"
            metrics_csv = _metrics_csv(trainer)
            logged = best_row(metrics_csv, monitor, getattr(checkpoint, "mode", "max")) if metrics_csv else {}
    except CvftError as err:
        print(f"cvft compare: error: {err}", file=sys.stderr)
        return 2
    metrics = {monitor: float(best_score) if best_score is not None else logged.get(monitor, math.nan)}
    metrics.update(main_metrics(task, split, logged, _medical_result(trainer, split)))
    rss_mb, cuda_mb = _peak_memory_mb()
    finished = time.perf_counter()
    write_json_atomic(
        result_path,
        {
            "task": task,
            "split": split,
            "monitor": monitor,
            "headline": f"{split}/{HEADLINE_METRIC[task]}",
            "metrics": metrics,
            "trainable_params": probe.trainable_params,
            "total_params": probe.total_params,
            "images_per_s": probe.images_per_s,
            "train_steps_timed": len(probe.rates),
            "peak_rss_mb": rss_mb,
            "cuda_peak_mb": cuda_mb,
            "startup_s": imported - _STARTED,
            "fit_s": finished - imported,
            "run_folder": str(Path(trainer.log_dir or trainer.default_root_dir)),
            "best_checkpoint": best_path,
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cvft.compare.worker <fit.json> fit ...``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[1] != "fit":
        print("usage: python -m cvft.compare.worker <fit.json> fit [cvft fit arguments]", file=sys.stderr)
        return 2
    return run_fit(argv[0], argv[1:])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
