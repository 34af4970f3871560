"""Seeded, stratified train / val / test splits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from cvft.errors import DatasetError

__all__ = ["stratified_split", "stratum_of"]


def stratum_of(target: int | Sequence[int], class_frequency: Counter[int] | None = None) -> int:
    """Return the class a sample is stratified by: its class, or for multi-label its rarest class.

    Args:
        target: Class index or tuple of class indices.
        class_frequency: How many samples carry each class (needed to find the rarest class of a multi-label
            target; without it the smallest index is used).

    Returns:
        A class index, or -1 for an empty multi-label target.

    Example:
        >>> stratum_of(3), stratum_of((0, 2), Counter({0: 10, 2: 4}))
        (3, 2)
    """
    if isinstance(target, (int, np.integer)):
        return int(target)
    if not target:
        return -1
    frequency = class_frequency or Counter()
    return min(target, key=lambda c: (frequency.get(c, 0), c))


def stratified_split(
    targets: Sequence[int | Sequence[int]],
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Split sample indices into train / val / test, class by class.

    Each class (for multi-label: each sample's rarest class) is shuffled with ``seed`` and split by the fractions,
    rounded. A class with at least 2 samples gets at least one validation sample (when ``val_fraction > 0``), one
    with at least 3 at least one test sample (when ``test_fraction > 0``); every class keeps at least one training
    sample. The result depends only on the targets, fractions and seed.

    Args:
        targets: Per-sample class index or tuple of class indices.
        val_fraction: Share of each class for validation, in ``[0, 1)``.
        test_fraction: Share of each class for testing, in ``[0, 1)``; ``val_fraction + test_fraction < 1``.
        seed: Random seed.

    Returns:
        ``(train, val, test)`` sorted index lists; disjoint, together covering every sample.

    Raises:
        DatasetError: The fractions are out of range.

    Example:
        >>> train, val, test = stratified_split([0, 0, 0, 0, 1, 1], val_fraction=0.25)
        >>> len(train), len(val), test
        (4, 2, [])
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DatasetError(f"{name} must be in [0, 1), got {value}.")
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(
            f"val_fraction + test_fraction must leave images for training, got {val_fraction} + {test_fraction}."
        )
    frequency: Counter[int] = Counter()
    for target in targets:
        frequency.update([target] if isinstance(target, (int, np.integer)) else target)
    strata: dict[int, list[int]] = {}
    for i, target in enumerate(targets):
        strata.setdefault(stratum_of(target, frequency), []).append(i)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for stratum in sorted(strata):
        members = strata[stratum]
        order = [members[i] for i in rng.permutation(len(members))]
        n_val, n_test = _counts(len(members), val_fraction, test_fraction)
        val.extend(order[:n_val])
        test.extend(order[n_val : n_val + n_test])
        train.extend(order[n_val + n_test :])
    return sorted(train), sorted(val), sorted(test)


def _counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 and n >= 2 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n >= 3 else 0
    while n_val + n_test > n - 1:  # keep one training sample
        if 0 < n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test
