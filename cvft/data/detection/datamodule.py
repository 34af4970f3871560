"""``DetectionDataModule``: COCO json or YOLO folders in, seeded train / val / test / predict DataLoaders out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from cvft.data._options import validate_options
from cvft.data.detection._yolo import yaml_names
from cvft.data.detection.annotations import (
    OUT_OF_BOUNDS_MODES,
    DetectionAnnotations,
    DetectionRecord,
    read_coco,
    read_yolo,
)
from cvft.data.detection.dataset import DetectionDataset, detection_collate
from cvft.data.detection.transforms import DETECTION_AUGMENT_PRESETS, build_detection_transforms
from cvft.data.labelled_module import SPLITS, LabelledDataModule
from cvft.errors import DatasetError

__all__ = ["DetectionDataModule"]

_logger = logging.getLogger(__name__)

_YAML_NAMES = ("data.yaml", "dataset.yaml", "config.yaml")


class DetectionDataModule(LabelledDataModule[DetectionRecord]):
    """Object detection data from a COCO json or a YOLO (ultralytics) dataset.

    Where the labelled images come from (first match wins):

    1. ``coco_json`` (+ ``image_root``): a COCO instances file for training.
    2. ``data_yaml``: an ultralytics ``data.yaml`` whose ``train`` / ``val`` / ``test`` entries (image folders or
       ``.txt`` image lists, relative to its ``path:``, itself relative to the yaml's folder) hold the images;
       labels are found by ultralytics' ``images`` -> ``labels`` rule and class names come from ``names:``.
    3. ``yolo_root``: a folder with a ``data.yaml`` / ``dataset.yaml`` / ``config.yaml`` (read as 2.), or with
       ``images/`` (+ ``labels/``) and a ``classes.txt``.

    ``val_coco_json`` (+ ``val_image_root``) and ``test_coco_json`` (+ ``test_image_root``) override the
    validation / test split. Without a validation split, ``val_fraction`` of the training images are held out by
    a seeded split by image. Train and validation must have the same classes.

    ``num_classes``, ``class_names`` and ``category_ids`` (original COCO id of each class index) work right after
    construction (the annotations are read on first use), so a CLI can link them into the model.

    Args:
        coco_json: COCO instances json of the training images.
        image_root: Folder that ``coco_json``'s ``file_name`` entries are relative to (default: see
            :func:`~cvft.data.detection.annotations.read_coco`).
        data_yaml: ultralytics dataset yaml.
        yolo_root: YOLO dataset folder (see above).
        val_coco_json: COCO json of the validation images.
        val_image_root: Folder of the validation images.
        test_coco_json: COCO json of the test images.
        test_image_root: Folder of the test images.
        image_size: Side of the square network input in pixels (images are letterboxed to it).
        batch_size: Images per batch.
        num_workers: DataLoader worker processes (0: load in the main process; None: automatic, see
            :meth:`~cvft.data.split_module.SplitDataModule.workers_for`).
        augment: Training augmentation: ``"none"``, ``"default"`` or ``"strong"``.
        min_visibility: A box keeps at least this share of its area after a random crop, or it is dropped.
        hflip: Random horizontal flips in training.
        out_of_bounds: Boxes extending beyond their image: ``"clip"``, ``"drop"`` or ``"error"``.
        skip_crowd: Skip COCO ``iscrowd=1`` annotations.
        val_fraction: Share of the training images held out for validation when no validation split is given.
        seed: Seed of the train / val split.
        predict_root: Image file or folder (searched recursively) for ``predict``: batches ``(images, metas)``, each
            meta holding ``index`` (into :attr:`predict_files`), ``path``, ``orig_size`` and ``size``.
        class_names: Class names in index order. Given without labelled data (predicting), they define the classes;
            with labelled data they must match it.
        category_ids: Original category id of each class index, with ``class_names`` (default ``0..C-1``).
        classes: Keep only these categories, by name, as classes ``0..len(classes)-1`` in the order given (their
            original category ids kept): a few-class subset such as ``["person", "car"]`` of COCO. Boxes of other
            categories are removed from every split. ``None``: all classes.
        keep_negatives: With ``classes``, keep the training images left without boxes as negatives (``False``
            drops them). Validation and test always keep every image, as COCO evaluation of a category subset does,
            so false detections on the other images count.

    Example:
        >>> import tempfile
        >>> from cvft.data.detection.shapes import write_shapes_detection
        >>> root = write_shapes_detection(Path(tempfile.mkdtemp()) / "shapes", num_images=8, image_size=48)
        >>> data = DetectionDataModule(coco_json=root / "annotations.json", image_size=64, num_workers=0)
        >>> data.num_classes, data.class_names, data.category_ids
        (3, ['circle', 'square', 'triangle'], [3, 7, 11])
        >>> data.setup("fit")
        >>> images, targets = next(iter(data.train_dataloader()))
        >>> images[0].shape, sorted(targets[0])
        (torch.Size([3, 64, 64]), ['boxes', 'image_id', 'labels'])
    """

    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        coco_json: str | Path | None = None,
        image_root: str | Path | None = None,
        data_yaml: str | Path | None = None,
        yolo_root: str | Path | None = None,
        val_coco_json: str | Path | None = None,
        val_image_root: str | Path | None = None,
        test_coco_json: str | Path | None = None,
        test_image_root: str | Path | None = None,
        image_size: int = 512,
        batch_size: int = 8,
        num_workers: int | None = None,
        augment: str = "default",
        min_visibility: float = 0.3,
        hflip: bool = True,
        out_of_bounds: str = "clip",
        skip_crowd: bool = True,
        val_fraction: float = 0.2,
        seed: int = 0,
        predict_root: str | Path | None = None,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        classes: list[str] | None = None,
        keep_negatives: bool = True,
    ) -> None:
        super().__init__()
        self._save_data_hparams(ignore=["category_ids"])
        validate_options(
            image_size=image_size,
            min_visibility=min_visibility,
            choices={
                "augment": (augment, DETECTION_AUGMENT_PRESETS),
                "out_of_bounds": (out_of_bounds, OUT_OF_BOUNDS_MODES),
            },
        )
        self.coco_json, self.image_root = coco_json, image_root
        self.data_yaml, self.yolo_root = data_yaml, yolo_root
        self.val_coco_json, self.val_image_root = val_coco_json, val_image_root
        self.test_coco_json, self.test_image_root = test_coco_json, test_image_root
        self.image_size = image_size
        self.min_visibility, self.hflip = min_visibility, hflip
        self.out_of_bounds, self.skip_crowd = out_of_bounds, skip_crowd
        self.classes = list(classes) if classes is not None else None
        self.keep_negatives = keep_negatives
        self._keep_shared_options(batch_size, num_workers, seed, val_fraction, augment, predict_root, class_names)
        self._given_names = self._class_names  # checked against the labelled data's classes when it is read
        self._given_ids = list(category_ids) if category_ids is not None else None
        if self._given_ids is not None and self._given_names is None:
            raise DatasetError("category_ids needs class_names too (one name per id).")
        self._category_ids: list[int] | None = None
        if self._has_labelled_data():
            self._class_names = None  # the labelled data defines the classes
        elif self._given_names is not None:
            self._category_ids = self._given_ids or list(range(len(self._given_names)))

    # --- what the data is -----------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Class names; index ``i`` is class ``i``."""
        if self._class_names is None and not self._has_labelled_data():
            raise DatasetError(
                "No classes: set coco_json, data_yaml or yolo_root (labelled data), or class_names=[...]."
            )
        return super().class_names

    @property
    def category_ids(self) -> list[int]:
        """Original (e.g. COCO) category id of each class index."""
        _ = self.class_names  # reads the labelled data when needed
        assert self._category_ids is not None
        return list(self._category_ids)

    # --- Lightning hooks ------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(images, targets)``; the last incomplete batch is dropped."""
        return self._loader(self._dataset("train"), train=True)

    def state_dict(self) -> dict[str, Any]:
        """Return the class names and category ids, so a checkpoint records what its outputs mean."""
        state = super().state_dict()
        return {**state, "category_ids": self.category_ids} if state else state

    # --- reading the data ----------------------------------------------------------------------------------

    def _read_splits(self) -> tuple[dict[str, list[DetectionRecord]], list[str]]:
        splits = self._read_sources()
        train = splits.get("train")
        if train is None or not train.records:
            raise DatasetError(f"The training split of {self._source()} has no images. Add images.")
        for split, other in splits.items():
            if split != "train":
                _check_same_classes(train, other, split, self._source())
        if self.classes is not None:
            splits = {split: a.select_classes(self.classes) for split, a in splits.items()}
            train = splits["train"]
            if not any(len(record.labels) for record in train.records):
                raise DatasetError(
                    f"No training image of {self._source()} has a box of classes={self.classes}. "
                    "Choose classes that occur in the training split."
                )
        if self._given_names is not None:
            given = DetectionAnnotations([], self._given_names, self._given_ids or [])
            _check_same_classes(train, given, "class_names=", self._source())
        records = {split: a.records for split, a in splits.items()}
        if "val" not in records and self.val_fraction > 0:
            records["train"], records["val"] = _split_by_image(train.records, self.val_fraction, self.seed)
        if self.classes is not None and not self.keep_negatives:  # after the split: validation keeps every image
            records["train"] = [record for record in records["train"] if len(record.labels)]
        self._category_ids = train.category_ids
        return records, train.class_names

    def _classes_of(self, item: DetectionRecord) -> set[int]:
        return set(item.labels.tolist())

    def _build_dataset(self, split: str) -> DetectionDataset:
        return DetectionDataset(self.records(split), self._transform(split == "train"))

    def _build_predict_dataset(self) -> DetectionDataset:
        return DetectionDataset(self.predict_files, self._transform(False), predict=True)

    # --- internals ------------------------------------------------------------------------------------------

    def _transform(self, train: bool) -> Any:
        return build_detection_transforms(
            self.image_size,
            train=train,
            augment=self.augment,
            min_visibility=self.min_visibility,
            hflip=self.hflip,
            seed=torch.initial_seed() % 2**32 if train else None,
        )

    def missing_split_hint(self, split: str) -> str:
        """How to provide a missing split."""
        return f"Pass {split}_coco_json=..., add '{split}:' to the data.yaml" + (
            ", or set val_fraction > 0." if split == "val" else "."
        )

    def _has_labelled_data(self) -> bool:
        return any(s is not None for s in (self.coco_json, self.data_yaml, self.yolo_root))

    def _read_sources(self) -> dict[str, DetectionAnnotations]:
        oob = self.out_of_bounds
        if self.coco_json is not None:
            splits = {"train": read_coco(self.coco_json, self.image_root, oob, self.skip_crowd)}
        elif self.data_yaml is not None or self.yolo_root is not None:
            splits = _read_yolo_dataset(self.data_yaml, self.yolo_root, oob)
        else:
            raise DatasetError("No labelled data: set coco_json (+ image_root), data_yaml or yolo_root.")
        for split, json_path, root in (
            ("val", self.val_coco_json, self.val_image_root),
            ("test", self.test_coco_json, self.test_image_root),
        ):
            if json_path is not None:
                splits[split] = read_coco(json_path, root, oob, self.skip_crowd)
        return splits

    def _source(self) -> str:
        return str(self.coco_json or self.data_yaml or self.yolo_root)


def _read_yolo_dataset(
    data_yaml: str | Path | None, yolo_root: str | Path | None, out_of_bounds: str
) -> dict[str, DetectionAnnotations]:
    """Read the splits of an ultralytics data.yaml, or of a YOLO folder (with a yaml, or ``images/`` + labels)."""
    if data_yaml is None:
        root = Path(str(yolo_root))
        if not root.is_dir():
            raise DatasetError(f"YOLO dataset folder {root} does not exist. Check the path.")
        found = [root / name for name in _YAML_NAMES if (root / name).is_file()]
        if not found:
            split_folders = {s: root / "images" / s for s in SPLITS if (root / "images" / s).is_dir()}
            if "train" in split_folders:
                return {s: read_yolo(folder, out_of_bounds=out_of_bounds) for s, folder in split_folders.items()}
            return {"train": read_yolo(root / "images", out_of_bounds=out_of_bounds)}
        data_yaml = found[0]
    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise DatasetError(f"Dataset yaml {data_yaml} does not exist. Check the path.")
    try:
        config = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise DatasetError(f"{data_yaml} is not valid YAML ({error}).") from error
    if not isinstance(config, dict) or "train" not in config or "names" not in config:
        raise DatasetError(f"{data_yaml} needs 'train:' (image folder or list) and 'names:' entries (ultralytics).")
    base = Path(config.get("path") or ".")
    if not base.is_absolute() or not base.is_dir():
        base = data_yaml.parent / base if not base.is_absolute() else data_yaml.parent
    names = yaml_names(data_yaml) or []
    splits = {}
    for split in SPLITS:
        entries = config.get(split)
        if not entries:
            continue
        parts = [read_yolo(base / entry, class_names=names, out_of_bounds=out_of_bounds) for entry in _listed(entries)]
        splits[split] = DetectionAnnotations([r for p in parts for r in p.records], names)
    return splits


def _listed(entries: str | Sequence[str]) -> list[str]:
    return [entries] if isinstance(entries, str) else [str(e) for e in entries]


def _check_same_classes(train: DetectionAnnotations, other: DetectionAnnotations, split: str, source: str) -> None:
    default = list(range(train.num_classes))
    same_ids = train.category_ids == other.category_ids or default in (train.category_ids, other.category_ids)
    if train.class_names != other.class_names or not same_ids:
        raise DatasetError(
            f"The {split} classes {other.class_names} (ids {other.category_ids}) differ from the training classes of "
            f"{source}: {train.class_names} (ids {train.category_ids}). Use annotations with the same categories "
            "in the same order."
        )


def _split_by_image(
    records: list[DetectionRecord], val_fraction: float, seed: int
) -> tuple[list[DetectionRecord], list[DetectionRecord]]:
    """Hold out ``val_fraction`` of the images (at least one, at most all but one), chosen with ``seed``."""
    if len(records) < 2:
        raise DatasetError(
            f"Cannot hold out a validation split from {len(records)} image(s). Add images, pass a validation "
            "split, or set val_fraction=0."
        )
    count = min(max(1, round(val_fraction * len(records))), len(records) - 1)
    order = np.random.default_rng(seed).permutation(len(records))
    val = set(order[:count].tolist())
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]
