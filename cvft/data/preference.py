"""Preference pairs for DPO and reward models: ``(image, preferred label, rejected label[, weight])``.

A preference dataset's target is a float row (:func:`pair_target`), so that pairs travel through the ordinary
``(images, targets[, indices])`` batches; :func:`split_pair_targets` takes a batch of them apart:

* single-label: ``[preferred, rejected, weight]`` (width 3), two class indices;
* multi-label: ``[preferred multi-hot (C), rejected multi-hot (C), weight]`` (width ``2 C + 1``), two label sets
  (a pair prefers one set of labels for the image over another).

Pairs come from a CSV file (``path,preferred,rejected[,weight]``, labels as class names or indices, multi-label
sets as ``cat;dog``, :func:`read_preference_csv`) or are generated from a labelled set, for benchmarks:
:func:`pairs_from_labels` (the true label, or label set, over another) and :func:`pairs_from_cost_matrix` (a
cheaper decision over a dearer one). The labelled DataModules train on them with ``preference_pairs``
(:class:`~cvft.data.labelled_module.LabelledDataModule`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cvft.errors import DatasetError

#: A pair's label: a class index (single-label) or a set of class indices, sorted (multi-label).
PairLabel = int | tuple[int, ...]

#: Separators of the labels of a multi-label set in a preference CSV (``cat;dog``, or ``cat|dog`` as label CSVs).
LABEL_SET_SEPARATORS = (";", "|")

__all__ = [
    "PairLabel",
    "PreferencePair",
    "PreferencePairDataset",
    "pair_target",
    "split_pair_targets",
    "read_preference_csv",
    "pairs_from_labels",
    "pairs_from_cost_matrix",
]


@dataclass(frozen=True)
class PreferencePair:
    """One preference: for the image at ``path`` (or dataset index), label ``preferred`` is better than ``rejected``.

    Multi-label pairs hold label sets: sorted tuples of class indices (``()``: no label).
    """

    path: Path | int
    preferred: PairLabel
    rejected: PairLabel
    weight: float = 1.0


def pair_target(
    preferred: PairLabel, rejected: PairLabel, weight: float = 1.0, num_classes: int | None = None
) -> Tensor:
    """The target row of one pair: ``float32 [preferred, rejected, weight]``.

    For label sets (``num_classes`` given): ``[preferred multi-hot, rejected multi-hot, weight]``, width
    ``2 num_classes + 1``.

    Example:
        >>> pair_target(2, 0).tolist()
        [2.0, 0.0, 1.0]
        >>> pair_target((0, 2), (2,), 0.5, num_classes=3).tolist()
        [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5]
    """
    if num_classes is None:
        return torch.tensor([float(preferred), float(rejected), float(weight)])  # type: ignore[arg-type]
    row = torch.zeros(2 * num_classes + 1)
    for offset, labels in ((0, preferred), (num_classes, rejected)):
        for label in (labels,) if isinstance(labels, int) else labels:
            row[offset + int(label)] = 1.0
    row[-1] = float(weight)
    return row


def split_pair_targets(
    targets: Tensor | None, num_classes: int | None = None, multi_label: bool | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair targets -> preferred, rejected, weights ``(B,)`` float32.

    Single-label rows ``(B, 3)`` give preferred and rejected class indices ``(B,)`` int64; multi-label rows
    ``(B, 2 C + 1)`` give preferred and rejected multi-hot rows ``(B, C)`` float32. Which one is meant is told,
    not guessed from the width: ``multi_label`` says it; left ``None`` it follows from ``num_classes`` (the
    classifier's outputs), since a single-label classifier has at least two classes: width 3 is single-label unless
    ``num_classes`` is 1. Without either, the rows must be single-label.

    Raises:
        DatasetError: The targets are not pair rows of that kind (e.g. labels given to an objective that trains
            on pairs, or single-label pairs given to a multi-label classifier).

    Example:
        >>> import torch
        >>> preferred, rejected, weights = split_pair_targets(torch.tensor([[1.0, 0.0, 2.0]]))
        >>> preferred.tolist(), rejected.tolist(), weights.tolist()
        ([1], [0], [2.0])
        >>> preferred, rejected, _ = split_pair_targets(torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]]), num_classes=2)
        >>> preferred.tolist(), rejected.tolist()
        ([[1.0, 1.0]], [[0.0, 1.0]])
    """
    if multi_label is None:
        multi_label = num_classes is not None and (
            num_classes == 1 or (targets is not None and targets.ndim == 2 and targets.shape[1] != 3)
        )
    width = 2 * num_classes + 1 if multi_label and num_classes is not None else None
    if multi_label and width is None and targets is not None and targets.ndim == 2 and targets.shape[1] % 2 == 1:
        width = int(targets.shape[1])
    expected = width if multi_label else 3
    if targets is None or targets.ndim != 2 or targets.shape[1] != expected:
        shape = None if targets is None else tuple(targets.shape)
        if multi_label:
            kind = "multi-label pair targets [preferred multi-hot, rejected multi-hot, weight] of shape (B, 2 C + 1)"
            wanted = f"(B, {expected})" if expected else "(B, 2 C + 1)"
        else:
            kind, wanted = "single-label pair targets [preferred, rejected, weight]", "(B, 3)"
        raise DatasetError(
            f"Preference objectives (dpo, ipo, reward_model) train on {kind}: expected {wanted}, got {shape}. "
            "Train on preference pairs: set the DataModule's preference_pairs (--data.preference_pairs "
            "<pairs.csv> or '{from: labels}'), with multi_label as the classifier has it; from Python, a "
            "PreferencePairDataset."
        )
    if multi_label:
        classes = (targets.shape[1] - 1) // 2
        return targets[:, :classes].float(), targets[:, classes:-1].float(), targets[:, -1].float()
    return targets[:, 0].round().long(), targets[:, 1].round().long(), targets[:, 2].float()


def _label(value: str, class_names: Sequence[str] | None, path: Path, line: int) -> int:
    value = value.strip()
    if class_names is not None and value in class_names:
        return list(class_names).index(value)
    known = f"; known classes: {', '.join(class_names)}" if class_names else ""
    try:
        index = int(value)
    except ValueError:
        raise DatasetError(
            f"{path}, line {line}: label {value!r} is neither a class name nor an index{known}. Write a class "
            "name of the data (or its index), or fix the class list."
        ) from None
    if index < 0 or (class_names is not None and index >= len(class_names)):
        count = f" of {len(class_names)} classes" if class_names is not None else ""
        raise DatasetError(f"{path}, line {line}: class index {index} is out of range{count}{known}.")
    return index


def _label_set(value: str, class_names: Sequence[str] | None, path: Path, line: int) -> tuple[int, ...]:
    parts = [value]
    for separator in LABEL_SET_SEPARATORS:
        parts = [piece for part in parts for piece in part.split(separator)]
    return tuple(sorted({_label(part, class_names, path, line) for part in parts if part.strip()}))


def read_preference_csv(
    path: str | Path,
    root: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    multi_label: bool = False,
) -> list[PreferencePair]:
    """Read ``path,preferred,rejected[,weight]`` rows (a header row naming ``path`` is skipped).

    Args:
        path: The CSV file.
        root: Folder that relative image paths are under (default: the CSV's folder).
        class_names: Names the labels may use; integers are class indices.
        multi_label: Labels are sets, ``cat;dog`` (or ``cat|dog``; empty: no label), read as sorted index tuples.

    Raises:
        DatasetError: Missing file, a short row, an unknown label, a negative weight, or no rows.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> csv_path = Path(tempfile.mkdtemp()) / "pairs.csv"
        >>> _ = csv_path.write_text(chr(10).join(["path,preferred,rejected,weight", "a.png,cat,dog,2"]))
        >>> read_preference_csv(csv_path, class_names=["cat", "dog"])[0].weight
        2.0
        >>> _ = csv_path.write_text("a.png,cat;dog,")
        >>> pair = read_preference_csv(csv_path, class_names=["cat", "dog"], multi_label=True)[0]
        >>> pair.preferred, pair.rejected
        ((0, 1), ())
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Preference CSV not found: {path}.")
    base = Path(root) if root is not None else path.parent
    pairs: list[PreferencePair] = []
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or (line == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) not in (3, 4):
                raise DatasetError(f"{path}, line {line}: expected path,preferred,rejected[,weight], got {row!r}.")
            weight = float(row[3]) if len(row) == 4 else 1.0
            if not weight >= 0:
                raise DatasetError(f"{path}, line {line}: weight must be >= 0, got {weight}.")
            read_label = _label_set if multi_label else _label
            preferred = read_label(row[1], class_names, path, line)
            rejected = read_label(row[2], class_names, path, line)
            if preferred == rejected:
                raise DatasetError(f"{path}, line {line}: the preferred and the rejected label are the same.")
            pairs.append(PreferencePair(base / row[0].strip(), preferred, rejected, weight))
    if not pairs:
        raise DatasetError(f"{path} holds no preference pairs.")
    return pairs


def pairs_from_labels(
    targets: Sequence[int] | Sequence[Sequence[int]], num_classes: int, seed: int = 0, multi_label: bool = False
) -> list[PreferencePair]:
    """One pair per labelled sample: its true label preferred over a uniformly drawn other class.

    Multi-label (``targets`` are label sets, tuples of class indices): the true set preferred over the set with one
    uniformly drawn label flipped (added or removed).

    Example:
        >>> [(p.path, p.preferred) for p in pairs_from_labels([1, 0], num_classes=3)]
        [(0, 1), (1, 0)]
        >>> pair = pairs_from_labels([(0, 2)], num_classes=3, multi_label=True)[0]
        >>> pair.preferred, len(set(pair.preferred) ^ set(pair.rejected))
        ((0, 2), 1)
    """
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for index, label in enumerate(targets):
        if multi_label:
            labels = {int(c) for c in label}  # type: ignore[union-attr]
            flipped = int(torch.randint(num_classes, (1,), generator=generator))
            pairs.append(PreferencePair(index, tuple(sorted(labels)), tuple(sorted(labels ^ {flipped}))))
            continue
        other = int(torch.randint(num_classes - 1, (1,), generator=generator))
        pairs.append(PreferencePair(index, int(label), other + (other >= int(label))))  # type: ignore[arg-type]
    return pairs


def pairs_from_cost_matrix(
    targets: Sequence[int], cost_matrix: Sequence[Sequence[float]], seed: int = 0
) -> list[PreferencePair]:
    """One pair per labelled sample: the cheapest decision for its label over a dearer one, weighted by the saving.

    The rejected decision is drawn uniformly among those costing more; samples whose row has one cost are skipped.

    Example:
        >>> [(p.preferred, p.rejected, p.weight) for p in pairs_from_cost_matrix([1], [[0, 1], [5, 0]])]
        [(1, 0, 5.0)]
    """
    cost = torch.as_tensor(cost_matrix, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for index, label in enumerate(targets):
        row = cost[int(label)]
        best = int(row.argmin())
        dearer = torch.nonzero(row > row[best]).flatten()
        if len(dearer) == 0:
            continue
        rejected = int(dearer[torch.randint(len(dearer), (1,), generator=generator)])
        pairs.append(PreferencePair(index, best, rejected, float(row[rejected] - row[best])))
    return pairs


class PreferencePairDataset(Dataset):
    """``(image, pair target[, index])`` items for pairs whose ``path`` is a file or an index into ``images``.

    Args:
        pairs: The preference pairs.
        images: Where integer ``path`` values point: a dataset whose items start with the image (a labelled set).
        transform: Albumentations-style callable for file images (see :class:`~cvft.data.dataset.ImageDataset`).
        channels: 3 (RGB) or 1 (grayscale) for file images.
        return_index: Items become ``(image, target, index)``.
        num_classes: Given, the pairs are multi-label (label sets) and targets rows of width ``2 num_classes + 1``.

    Example:
        >>> import torch
        >>> base = [(torch.zeros(3, 4, 4), 0), (torch.ones(3, 4, 4), 1)]
        >>> data = PreferencePairDataset(pairs_from_labels([0, 1], num_classes=2), images=base)
        >>> image, target = data[1]
        >>> float(image.mean()), target.tolist()
        (1.0, [1.0, 0.0, 1.0])
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        images: Sequence[Any] | Dataset | None = None,
        transform: Callable[..., dict[str, Any]] | None = None,
        channels: int = 3,
        return_index: bool = False,
        num_classes: int | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.images = images
        self.return_index = return_index
        self.num_classes = num_classes
        sets = [p for p in self.pairs if not isinstance(p.preferred, int) or not isinstance(p.rejected, int)]
        if sets and num_classes is None:
            raise DatasetError("PreferencePairDataset: pairs of label sets are multi-label; pass num_classes=<C>.")
        files = [p.path for p in self.pairs if not isinstance(p.path, int)]
        if len(files) not in (0, len(self.pairs)):
            raise DatasetError("PreferencePairDataset: give pairs of image files or of dataset indices, not both.")
        if files:
            from cvft.data.dataset import ImageDataset

            self._files: ImageDataset | None = ImageDataset(files, transform=transform, channels=channels)
        else:
            if images is None:
                raise DatasetError("Pairs that point at dataset indices need the dataset: pass images=<dataset>.")
            self._files = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        pair = self.pairs[index]
        source = self._files if self._files is not None else self.images
        image = source[index if self._files is not None else int(pair.path)][0]  # type: ignore[index]
        target = pair_target(pair.preferred, pair.rejected, pair.weight, self.num_classes)
        if self.return_index:
            return image, target, torch.tensor(index)
        return image, target
