"""The ``preference_pairs`` option of the labelled DataModules: which preference pairs the training split becomes.

Two forms (checked by :func:`check_preference_pairs` when the DataModule is built):

* a CSV path: ``path,preferred,rejected[,weight]`` rows (:func:`~cvft.data.preference.read_preference_csv`), image
  paths relative to the CSV's folder or to the DataModule's ``root``, labels as class names or indices (multi-label
  sets as ``cat;dog``);
* a generator spec, pairs drawn from the labelled training split: ``{from: labels}``
  (:func:`~cvft.data.preference.pairs_from_labels`) or ``{from: cost_matrix, cost_matrix: [[...]]}``
  (:func:`~cvft.data.preference.pairs_from_cost_matrix`, single-label), each with an optional ``seed`` (default: the
  DataModule's).

:func:`read_pairs` turns the option into pairs once the classes are known.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cvft.data.preference import PreferencePair, pairs_from_cost_matrix, pairs_from_labels, read_preference_csv
from cvft.errors import DatasetError

__all__ = ["PreferencePairsSpec", "GENERATORS", "check_preference_pairs", "read_pairs"]

#: The option's value: a CSV path, a generator mapping, or ``None`` (train on the labels).
PreferencePairsSpec = str | Path | Mapping[str, Any] | None

#: Values of ``preference_pairs: {from: ...}``.
GENERATORS: tuple[str, ...] = ("labels", "cost_matrix")

_KEYS = {"from", "cost_matrix", "seed"}
_FORMS = (
    "Give preference_pairs as a CSV path (--data.preference_pairs pairs.csv, rows path,preferred,rejected[,weight]) "
    "or a generator: {from: labels} or {from: cost_matrix, cost_matrix: [[...]]}, with an optional seed."
)
_MAX_LISTED = 5


def check_preference_pairs(spec: PreferencePairsSpec, multi_label: bool = False, files: bool = True) -> None:
    """Refuse a ``preference_pairs`` value that cannot work, before any data is read.

    Args:
        spec: The option's value.
        multi_label: The data is multi-label (no cost-matrix generator).
        files: Check that a CSV file exists too (a DataModule checks it when the training split is built, so that
            ``cvft test`` / ``predict`` with a run's config work after the CSV moved).

    Raises:
        DatasetError: The CSV file is missing, or the generator spec has an unknown form, key or value (a cost
            matrix that is not square, or one with multi-label data), naming the fix.

    Example:
        >>> check_preference_pairs({"from": "cost_matrix", "cost_matrix": [[0, 1], [5, 0]], "seed": 1})
        >>> check_preference_pairs({"from": "votes"})
        Traceback (most recent call last):
        ...
        cvft.errors.DatasetError: preference_pairs: unknown generator from='votes'; choose labels or cost_matrix. ...
    """
    if spec is None:
        return
    if isinstance(spec, str | Path):
        if files and not Path(spec).is_file():
            raise DatasetError(f"preference_pairs: the CSV file {spec} does not exist. {_FORMS}")
        return
    if not isinstance(spec, Mapping):
        raise DatasetError(f"preference_pairs: got {spec!r}. {_FORMS}")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        hint = " (a CSV path goes alone, not inside the mapping)" if {"csv", "path"} & set(unknown) else ""
        raise DatasetError(f"preference_pairs: unknown key(s) {', '.join(unknown)}{hint}. {_FORMS}")
    source = spec.get("from")
    if source not in GENERATORS:
        raise DatasetError(
            f"preference_pairs: unknown generator from={source!r}; choose {' or '.join(GENERATORS)}. {_FORMS}"
        )
    seed = spec.get("seed")
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise DatasetError(f"preference_pairs: seed must be an integer, got {seed!r}.")
    if source == "labels":
        if "cost_matrix" in spec:
            raise DatasetError("preference_pairs: cost_matrix goes with from: cost_matrix, not from: labels.")
        return
    if multi_label:
        raise DatasetError(
            "preference_pairs: from: cost_matrix is for single-label data (a cost per true class and decision); "
            "with multi_label use {from: labels} or a CSV of label sets."
        )
    _square(spec.get("cost_matrix"))


def read_pairs(
    spec: PreferencePairsSpec,
    class_names: Sequence[str],
    train_targets: Sequence[Any],
    multi_label: bool = False,
    root: str | Path | None = None,
    seed: int = 0,
) -> list[PreferencePair]:
    """The pairs of a checked ``preference_pairs`` value: file pairs for a CSV, training-split indices otherwise.

    Args:
        spec: The option's value (see the module docstring).
        class_names: The data's classes (CSV labels are names of these or indices).
        train_targets: Targets of the labelled training split (class indices, or index tuples for multi-label).
        multi_label: Pairs of label sets.
        root: Second folder relative CSV image paths may be under (after the CSV's own folder).
        seed: Seed of a generator spec without its own.

    Raises:
        DatasetError: A CSV label is unknown, images are missing, the cost matrix does not fit the classes, or the
            spec yields no pairs.

    Example:
        >>> [(p.path, p.preferred, p.rejected) for p in read_pairs({"from": "labels"}, ["a", "b"], [1, 0])]
        [(0, 1, 0), (1, 0, 1)]
    """
    check_preference_pairs(spec, multi_label)
    if isinstance(spec, str | Path):
        return _csv_pairs(Path(spec), class_names, multi_label, root)
    assert isinstance(spec, Mapping)
    seed = int(spec.get("seed", seed))
    if spec["from"] == "labels":
        pairs = pairs_from_labels(train_targets, len(class_names), seed=seed, multi_label=multi_label)
    else:
        matrix = _square(spec["cost_matrix"])
        if len(matrix) != len(class_names):
            raise DatasetError(
                f"preference_pairs: cost_matrix is {len(matrix)} x {len(matrix)} but the data has "
                f"{len(class_names)} classes ({', '.join(class_names)}); give one row and column per class."
            )
        pairs = pairs_from_cost_matrix(train_targets, matrix, seed=seed)
    if not pairs:
        raise DatasetError(
            f"preference_pairs {dict(spec)} yields no pairs from the training split: every cost row is constant. "
            "Give costs that differ within a row."
        )
    return pairs


def _csv_pairs(
    path: Path, class_names: Sequence[str], multi_label: bool, root: str | Path | None
) -> list[PreferencePair]:
    pairs = read_preference_csv(path, class_names=class_names, multi_label=multi_label)
    resolved, missing = [], []
    for pair in pairs:
        file = Path(pair.path)
        written = file.relative_to(path.parent) if file.is_relative_to(path.parent) else file
        if not file.is_file() and root is not None:
            file = Path(root) / written
        if not file.is_file():
            missing.append(str(written))
        resolved.append(PreferencePair(file, pair.preferred, pair.rejected, pair.weight))
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (" ..." if len(missing) > _MAX_LISTED else "")
        where = f"{path.parent} or {root}" if root is not None else str(path.parent)
        raise DatasetError(
            f"preference_pairs {path}: {len(missing)} image(s) not found under {where}: {listed}. Write image paths "
            "relative to the CSV's folder or to --data.root (or absolute)."
        )
    return resolved


def _square(matrix: Any) -> list[list[float]]:
    try:
        rows = [[float(value) for value in row] for row in matrix]
    except (TypeError, ValueError):
        rows = []
    if not rows or any(len(row) != len(rows) for row in rows):
        raise DatasetError(
            f"preference_pairs: from: cost_matrix needs cost_matrix, a square C x C list of numbers (cost[true "
            f"class][decision]), got {matrix!r}."
        )
    return rows
