"""Preference pairs for DPO and reward models: ``(image, preferred label, rejected label[, weight])``.

A preference dataset's target is a float row ``[preferred, rejected, weight]`` (:func:`pair_target`), so that pairs
travel through the ordinary ``(images, targets[, indices])`` batches; :func:`split_pair_targets` takes a batch of
them apart. Pairs come from a CSV file (``path,preferred,rejected[,weight]``, labels as class names or indices,
:func:`read_preference_csv`) or are generated from a labelled set, for benchmarks: :func:`pairs_from_labels` (the
true label over another) and :func:`pairs_from_cost_matrix` (a cheaper decision over a dearer one).
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

__all__ = [
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
    """One preference: for the image at ``path`` (or dataset index), label ``preferred`` is better than ``rejected``."""

    path: Path | int
    preferred: int
    rejected: int
    weight: float = 1.0


def pair_target(preferred: int, rejected: int, weight: float = 1.0) -> Tensor:
    """The target row of one pair: ``float32 [preferred, rejected, weight]``.

    Example:
        >>> pair_target(2, 0).tolist()
        [2.0, 0.0, 1.0]
    """
    return torch.tensor([float(preferred), float(rejected), float(weight)])


def split_pair_targets(targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, 3)`` pair targets -> preferred ``(B,)`` int64, rejected ``(B,)`` int64, weights ``(B,)`` float32.

    Raises:
        DatasetError: The targets are not pair rows (labels given to an objective that trains on pairs).

    Example:
        >>> import torch
        >>> preferred, rejected, weights = split_pair_targets(torch.tensor([[1.0, 0.0, 2.0]]))
        >>> preferred.tolist(), rejected.tolist(), weights.tolist()
        ([1], [0], [2.0])
    """
    if targets is None or targets.ndim != 2 or targets.shape[1] != 3:
        shape = None if targets is None else tuple(targets.shape)
        raise DatasetError(
            f"Preference objectives (dpo, ipo, reward_model) train on pair targets [preferred, rejected, weight] of "
            f"shape (B, 3), got {shape}: train on a PreferencePairDataset (read_preference_csv, pairs_from_labels)."
        )
    return targets[:, 0].round().long(), targets[:, 1].round().long(), targets[:, 2].float()


def _label(value: str, class_names: Sequence[str] | None, path: Path, line: int) -> int:
    value = value.strip()
    if class_names is not None and value in class_names:
        return list(class_names).index(value)
    try:
        return int(value)
    except ValueError:
        known = f"; known classes: {', '.join(class_names)}" if class_names else ""
        raise DatasetError(
            f"{path}, line {line}: label {value!r} is neither a class name nor an index{known}."
        ) from None


def read_preference_csv(
    path: str | Path, root: str | Path | None = None, class_names: Sequence[str] | None = None
) -> list[PreferencePair]:
    """Read ``path,preferred,rejected[,weight]`` rows (a header row naming ``path`` is skipped).

    Args:
        path: The CSV file.
        root: Folder that relative image paths are under (default: the CSV's folder).
        class_names: Names the labels may use; integers are class indices.

    Raises:
        DatasetError: Missing file, a short row, an unknown label, a negative weight, or no rows.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> csv_path = Path(tempfile.mkdtemp()) / "pairs.csv"
        >>> _ = csv_path.write_text(chr(10).join(["path,preferred,rejected,weight", "a.png,cat,dog,2"]))
        >>> read_preference_csv(csv_path, class_names=["cat", "dog"])[0].weight
        2.0
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
            preferred = _label(row[1], class_names, path, line)
            rejected = _label(row[2], class_names, path, line)
            pairs.append(PreferencePair(base / row[0].strip(), preferred, rejected, weight))
    if not pairs:
        raise DatasetError(f"{path} holds no preference pairs.")
    return pairs


def pairs_from_labels(targets: Sequence[int], num_classes: int, seed: int = 0) -> list[PreferencePair]:
    """One pair per labelled sample: its true label preferred over a uniformly drawn other class.

    Example:
        >>> [(p.path, p.preferred) for p in pairs_from_labels([1, 0], num_classes=3)]
        [(0, 1), (1, 0)]
    """
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for index, label in enumerate(targets):
        other = int(torch.randint(num_classes - 1, (1,), generator=generator))
        pairs.append(PreferencePair(index, int(label), other + (other >= int(label))))
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
    ) -> None:
        self.pairs = list(pairs)
        self.images = images
        self.return_index = return_index
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
        target = pair_target(pair.preferred, pair.rejected, pair.weight)
        if self.return_index:
            return image, target, torch.tensor(index)
        return image, target
