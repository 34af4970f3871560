from __future__ import annotations

from collections import Counter

import pytest

from cvft.data.split import stratified_split, stratum_of
from cvft.errors import DatasetError

TARGETS = [0] * 10 + [1] * 5 + [2] * 2 + [3] * 1 + [4] * 3


def test_deterministic_given_seed():
    assert stratified_split(TARGETS, 0.2, 0.1, seed=3) == stratified_split(TARGETS, 0.2, 0.1, seed=3)
    assert stratified_split(TARGETS, 0.2, seed=3) != stratified_split(TARGETS, 0.2, seed=4)


def test_disjoint_and_covering():
    train, val, test = stratified_split(TARGETS, 0.2, 0.2, seed=0)
    assert sorted(train + val + test) == list(range(len(TARGETS)))
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)


def test_every_class_with_two_images_in_val_and_train():
    train, val, test = stratified_split(TARGETS, 0.2, 0.2, seed=0)
    val_classes = Counter(TARGETS[i] for i in val)
    train_classes = Counter(TARGETS[i] for i in train)
    test_classes = Counter(TARGETS[i] for i in test)
    assert set(val_classes) == {0, 1, 2, 4}  # class 3 has one image: it stays in train
    assert set(train_classes) == {0, 1, 2, 3, 4}
    assert set(test_classes) == {0, 1, 4}  # test needs >= 3 images so train and val keep one
    assert val_classes[0] == 2 and test_classes[0] == 2 and val_classes[1] == 1


def test_no_val():
    train, val, test = stratified_split(TARGETS, 0.0)
    assert val == [] and test == [] and len(train) == len(TARGETS)


def test_multi_label_stratified_by_rarest_class():
    targets = [(0,)] * 8 + [(0, 1)] * 2
    assert stratum_of((0, 1), Counter({0: 10, 1: 2})) == 1
    _, val, _ = stratified_split(targets, 0.2, seed=0)
    assert any(1 in targets[i] for i in val)


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.0), (1.0, 0.0), (0.6, 0.4), (0.2, 1.5)])
def test_bad_fractions(val, test):
    with pytest.raises(DatasetError, match="fraction"):
        stratified_split(TARGETS, val, test)
