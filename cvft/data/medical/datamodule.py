"""``MedicalImageDataModule``: DICOM / NIfTI / 16-bit images or MedMNIST arrays in, patient-safe loaders out."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from cvft.data._options import validate_options
from cvft.data.labelled_module import SPLITS, LabelledDataModule
from cvft.data.medical.augment import build_medical_transforms, check_medical_augment
from cvft.data.medical.dataset import MedicalArrayDataset, MedicalImageDataset
from cvft.data.medical.labels import MedicalRecord, read_medical_csv
from cvft.data.medical.patient_split import check_no_patient_leak, patient_split
from cvft.data.medical.read import is_medical_image_file
from cvft.data.samples import is_ignored_file
from cvft.data.split import stratum_of
from cvft.errors import DatasetError

__all__ = ["MedicalImageDataModule", "SAMPLERS"]

_logger = logging.getLogger(__name__)

SAMPLERS: tuple[str, ...] = ("random", "weighted")
"""Values of ``MedicalImageDataModule(sampler=...)``."""


class MedicalImageDataModule(LabelledDataModule[MedicalRecord]):
    r"""Medical image classification data: a label CSV of DICOM / NIfTI / PNG / TIFF files, or a MedMNIST set.

    Sources (exactly one):

    * ``csv``: columns ``path``, ``label`` (``A|B`` with ``multi_label``), optional ``patient_id``, optional
      ``split`` (train / val / test) and any metadata columns (see :func:`~cvft.data.medical.read_medical_csv`),
      plus optional ``val_csv`` / ``test_csv``. Splits not supplied are drawn **by patient**
      (:func:`~cvft.data.medical.patient_split`) with ``val_fraction`` / ``test_fraction`` (fractions of patients);
      supplied splits that share a patient are refused (:func:`~cvft.data.medical.check_no_patient_leak`).
      Without a ``patient_id`` column every image counts as its own patient (logged at WARNING).
    * ``medmnist``: a MedMNIST ``.npz`` file or an official name (``"pneumoniamnist"``) found in
      ``medmnist_root`` (downloaded there with ``download=True``); its official train / val / test split is used.

    Images are read as float ``[0, 1]`` (``window``, ``slice_index``, ``axis``, ``context``, ``frame`` go to
    :func:`~cvft.data.medical.read_medical_image`), grayscale is repeated to ``channels`` (3 for RGB-pretrained
    backbones; 1 with the model's ``in_chans=1``), then augmented (:mod:`cvft.data.medical.augment`: no flips
    unless ``augment="medical_flip"``) and normalised with the backbone's pretrained mean / std.

    Class imbalance: ``sampler="weighted"`` draws training images with probability inversely proportional to the
    frequency of their class (multi-label: of their rarest positive label; "no finding" images form their own
    group), ``len(train)`` draws per epoch with replacement, seeded by ``seed``. :attr:`pos_weight` gives
    negatives / positives per class for ``ImageClassifier(pos_weight=...)``.

    Args:
        csv: Label CSV file (training images, or all images with a ``split`` column).
        val_csv: Validation CSV file (same columns).
        test_csv: Test CSV file (same columns).
        root: Folder that the CSV files' relative paths start from (default: each CSV file's folder).
        medmnist: MedMNIST ``.npz`` path or official dataset name.
        medmnist_root: Folder holding (or receiving) ``<name>.npz`` for an official name.
        download: Download an official MedMNIST file that is not in ``medmnist_root``.
        multi_label: Rows may carry several labels; targets become multi-hot vectors.
        none_label: Multi-label "no finding" label (e.g. ``"No Finding"``): its rows get no positive class.
        class_names: Class names in index order; given, labels are mapped onto this order (e.g. predicting with a
            checkpoint's classes).
        window: Intensity window: ``"lung"``, ``"mediastinum"``, ``"bone"``, ``"brain"``, ``"soft_tissue"``,
            ``(center, width)`` or ``None`` (full range).
        slice_index: Slice of a 3D volume (default: the reader's, the middle slice).
        axis: Axis slices are taken along (3D volumes).
        context: 2.5D input: neighbouring slices on each side, stacked as channels (``channels`` must be
            ``2 * context + 1``).
        frame: Frame of a multi-frame DICOM file.
        backbone: timm model name whose pretrained data config (size, mean, std, interpolation) is used.
        image_size: Input size in pixels; default: the backbone's, else 224.
        mean: Per-channel mean of ``[0, 1]`` values (one value, or one per channel); default: the backbone's.
        std: Per-channel std; default: the backbone's.
        channels: Channels fed to the model (the CLI passes it to the model's ``in_chans``).
        val_fraction: Share of patients held out for validation when no validation split is supplied.
        test_fraction: Share of patients held out for testing when no test split is supplied.
        seed: Seed of the patient split and of the weighted sampler.
        sampler: ``"random"`` (shuffle) or ``"weighted"`` (class-balanced draws, see above).
        augment: Training augmentation: ``"medical"``, ``"medical_flip"``, ``"none"``, or a policy on the float
            image in place of ``"medical"``'s affine: ``"randaugment"``, ``"trivialaugment"``, ``"augmix"`` or a
            timm-style ``"rand-m9-n2-mstd0.5"`` string (no flips or crops, but intensity remaps such as solarize and
            equalize; :mod:`cvft.data.medical.augment`). Ignored with ``train_transform``.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes (0: load in the main process; None: 0 for data held in
            memory such as MedMNIST arrays, else 2).
        predict_root: Image file or folder (searched recursively) for ``predict``.
        **kwargs: The image-pipeline and preference-pair options, forwarded to
            :class:`~cvft.data.labelled_module.LabelledDataModule`: ``random_erasing``, ``random_erasing_mode``,
            ``train_transform`` (here it receives ``float32`` ``H x W x channels`` images in ``[0, 1]``, so it
            normalises with ``max_pixel_value=1``), ``eval_transform``, ``preference_pairs``.

    Example:
        >>> import tempfile, shutil
        >>> from pydicom.data import get_testdata_file
        >>> root = Path(tempfile.mkdtemp())
        >>> rows = ["path,label,patient_id"]
        >>> for i in range(6):
        ...     _ = shutil.copy(get_testdata_file("CT_small.dcm"), root / f"{i}.dcm")
        ...     rows.append(f"{i}.dcm,{'abnormal' if i % 2 else 'normal'},p{i}")
        >>> _ = (root / "labels.csv").write_text("\n".join(rows))
        >>> data = MedicalImageDataModule(csv=str(root / "labels.csv"), image_size=32, val_fraction=0.34,
        ...                               window="mediastinum", batch_size=2, num_workers=0)
        >>> data.class_names, [len(data.records(s)) for s in ("train", "val", "test")]
        (['abnormal', 'normal'], [4, 2, 0])
        >>> images, targets = next(iter(data.train_dataloader()))
        >>> images.shape, targets.dtype
        (torch.Size([2, 3, 32, 32]), torch.int64)
    """

    def __init__(
        self,
        csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        root: str | None = None,
        medmnist: str | None = None,
        medmnist_root: str | None = None,
        download: bool = False,
        multi_label: bool = False,
        none_label: str | None = None,
        class_names: list[str] | None = None,
        window: str | tuple[float, float] | None = None,
        slice_index: int | None = None,
        axis: int | None = None,
        context: int = 0,
        frame: int | str | None = None,
        backbone: str | None = None,
        image_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        channels: int = 3,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        seed: int = 0,
        sampler: Literal["random", "weighted"] = "random",
        augment: str = "medical",
        batch_size: int = 32,
        num_workers: int | None = None,
        predict_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._save_data_hparams()
        if (csv is None) == (medmnist is None):
            raise DatasetError(
                "MedicalImageDataModule needs exactly one source: csv=... (a label CSV file) or medmnist=... (a "
                f"MedMNIST .npz file or name); got csv={csv!r}, medmnist={medmnist!r}."
            )
        if medmnist is not None and (val_csv or test_csv):
            raise DatasetError("val_csv / test_csv go with csv=...; MedMNIST brings its own train / val / test split.")
        _validate(sampler, channels, context)
        check_medical_augment(augment, self.random_erasing, self.random_erasing_mode)
        validate_options(channels=channels, context=context)
        self.csv, self.val_csv, self.test_csv, self.root = csv, val_csv, test_csv, root
        self.medmnist, self.medmnist_root, self.download = medmnist, medmnist_root, download
        self.multi_label, self.none_label, self.channels = multi_label, none_label, channels
        self.sampler = sampler
        options = {"window": window, "slice_index": slice_index, "axis": axis, "context": context or None}
        options["frame"] = frame
        self.reader_options: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
        """Keyword arguments passed to ``read_medical_image``."""
        self._keep_shared_options(
            batch_size, num_workers, seed, val_fraction, augment, predict_root, class_names, test_fraction=test_fraction
        )
        self._resolve_data_config(backbone, image_size, mean, std, channels)
        self._keep_pipeline_options()
        self._keep_preference_pairs(multi_label)
        self._arrays: dict[str, tuple[np.ndarray, list[Any]]] = {}

    # --- what the data is -----------------------------------------------------------------------------------

    @property
    def pos_weight(self) -> list[float]:
        """Negatives / positives per class over the training images, for ``ImageClassifier(pos_weight=...)``.

        A class without positive training images gets 1.0 (logged at WARNING).
        """
        total = len(self.records("train"))
        weights = []
        for name, positives in zip(self.class_names, self.class_counts, strict=True):
            if positives == 0:
                _logger.warning("Class %r has no positive training image; its pos_weight is 1.0.", name)
                weights.append(1.0)
            else:
                weights.append((total - positives) / positives)
        return weights

    def weighted_sampler(self) -> WeightedRandomSampler:
        """Class-balanced sampler over the training split (see the class docstring), seeded by ``seed``.

        Returns:
            A ``WeightedRandomSampler`` drawing ``len(train)`` indices per epoch with replacement.
        """
        targets = [record.target for record in self.records("train")]
        frequency = Counter(dict(enumerate(self.class_counts)))
        groups = [stratum_of(target, frequency) for target in targets]
        sizes = Counter(groups)
        weights = torch.tensor([1.0 / sizes[group] for group in groups], dtype=torch.double)
        generator = torch.Generator().manual_seed(self.seed)
        return WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)

    # --- reading the data ----------------------------------------------------------------------------------

    def _read_splits(self) -> tuple[dict[str, list[MedicalRecord]], list[str]]:
        splits, names = self._read_medmnist() if self.medmnist is not None else self._read_csvs()
        if not splits["train"]:
            raise DatasetError(f"The training split of {self._source()} is empty. Add images.")
        if not self.multi_label and len(names) < 2:
            found = f"only the class {names[0]!r}" if names else "no class"
            raise DatasetError(
                f"{self._source()} has {found}; single-label classification needs at least 2 classes. "
                "Add rows of the other class(es), or use multi_label=True for a one-label yes/no classifier."
            )
        return splits, names

    def _find_predict_files(self, root: str | Path) -> list[Path]:
        root = Path(root)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise DatasetError(f"predict_root {root} does not exist. Pass an image file or a folder of images.")
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and not is_ignored_file(p) and is_medical_image_file(p)
        )
        if not files:
            raise DatasetError(
                f"predict_root {root} holds no DICOM, NIfTI or image files to predict on (other files are skipped)."
            )
        return files

    def _build_image_dataset(self, files: Sequence[Path], train: bool) -> MedicalImageDataset:
        return MedicalImageDataset(files, self._transform(train), self.channels, reader_options=self.reader_options)

    def _build_predict_dataset(self) -> MedicalImageDataset:
        return MedicalImageDataset(
            self.predict_files, self._transform(False), self.channels, reader_options=self.reader_options
        )

    def _has_labelled_data(self) -> bool:
        return True  # the constructor requires csv or medmnist

    def _source(self) -> str:
        return str(self.csv or self.medmnist)

    def _train_sampler(self) -> WeightedRandomSampler | None:
        return self.weighted_sampler() if self.sampler == "weighted" else None

    # --- internals ------------------------------------------------------------------------------------------

    def _preset_transform(self, train: bool) -> Any:
        return build_medical_transforms(**self._pipeline_options(train))

    def _build_dataset(self, split: str) -> MedicalImageDataset:
        records = self.records(split)
        common = {"multi_label": self.multi_label, "num_classes": self.num_classes}
        if split in self._arrays:
            images, targets = self._arrays[split]
            name = f"{Path(str(self.medmnist)).name}:{split}"
            train = split == "train"
            return MedicalArrayDataset(
                images,
                targets,
                self._transform(train),
                self.channels,
                name=name,
                deterministic_transform=self._deterministic_transform(train),
                **common,
            )
        return MedicalImageDataset(
            records, self._transform(split == "train"), self.channels, reader_options=self.reader_options, **common
        )

    def _deterministic_transform(self, train: bool) -> bool:
        """Whether the pipeline of ``train`` maps an image to the same tensor every time (cvft's, not random).

        User pipelines are taken as possibly random: their outputs are not cached.
        """
        if train:
            return self.random_training_pipeline() is None
        return "eval" not in self.user_pipelines

    def missing_split_hint(self, split: str) -> str:
        """How to provide a missing split."""
        return f"Set {split}_fraction > 0, pass {split}_csv=..., or mark rows '{split}' in the CSV's split column."

    def _read_csvs(self) -> tuple[dict[str, list[MedicalRecord]], list[str]]:
        assert self.csv is not None
        options = {"root": self.root, "multi_label": self.multi_label, "none_label": self.none_label}
        records, names = read_medical_csv(self.csv, class_names=self._class_names, **options)
        supplied = [r for r in records if r.split is not None]
        if supplied and len(supplied) != len(records):
            raise DatasetError(f"{self.csv}: the split column is filled for some rows only; fill it for every row.")
        splits: dict[str, list[MedicalRecord]] = {name: [] for name in SPLITS}
        if supplied:
            for record in records:
                splits[str(record.split)].append(record)
        else:
            splits["train"] = records
        given = {split for split in SPLITS if splits[split]} | ({"train"} if not supplied else set())
        for split, path in (("val", self.val_csv), ("test", self.test_csv)):
            if path is not None:
                if splits[split]:
                    raise DatasetError(
                        f"The {split} split is given twice: by {path} and by the split column of {self.csv}. Keep one."
                    )
                splits[split], _ = read_medical_csv(path, class_names=names, **options)
                given.add(split)
        if len(given) > 1:
            sources = ", ".join(str(p) for p in (self.csv, self.val_csv, self.test_csv) if p)
            check_no_patient_leak(splits, source=sources)
        self._split_missing(splits, given)
        if all(r.patient_id is None for r in records):
            _logger.warning(
                "%s has no patient_id column: images are split one by one, so images of one patient may land in "
                "different splits (optimistic validation). Add a patient_id column.",
                self.csv,
            )
        return splits, names

    def _split_missing(self, splits: dict[str, list[MedicalRecord]], given: set[str]) -> None:
        val_fraction = self.val_fraction if "val" not in given else 0.0
        test_fraction = self.test_fraction if "test" not in given else 0.0
        if val_fraction == 0.0 and test_fraction == 0.0:
            return
        drawn = patient_split(splits["train"], val_fraction, test_fraction, self.seed)
        held_out = {split: splits[split] for split in ("val", "test") if split in given}
        splits["train"] = drawn["train"]
        splits["val"] = held_out.get("val", drawn["val"])
        splits["test"] = held_out.get("test", drawn["test"])

    def _read_medmnist(self) -> tuple[dict[str, list[MedicalRecord]], list[str]]:
        from cvft.data.medical.medmnist import load_medmnist_npz, medmnist_path, medmnist_task

        path = medmnist_path(str(self.medmnist), root=self.medmnist_root, download=self.download)
        arrays = {split: load_medmnist_npz(path, split) for split in SPLITS}
        task = medmnist_task(str(self.medmnist), labels=arrays["train"][1])
        if self.multi_label != task.multi_label:
            raise DatasetError(
                f"{path} is a {task.task} data set; set multi_label={task.multi_label} (the CLI passes it to the "
                "model)."
            )
        names = self._class_names or [str(i) for i in range(task.num_classes)]
        if len(names) != task.num_classes:
            raise DatasetError(
                f"class_names has {len(names)} names but {path} has {task.num_classes} classes. Leave class_names "
                "out or give one name per class."
            )
        splits: dict[str, list[MedicalRecord]] = {}
        for split, (images, labels) in arrays.items():
            if task.multi_label:
                targets: list[Any] = [tuple(int(i) for i in np.flatnonzero(row)) for row in labels]
            else:
                targets = [int(row[0]) for row in labels]
            self._arrays[split] = (images, targets)
            splits[split] = [
                MedicalRecord(path, target, None, split, {"index": str(i)}) for i, target in enumerate(targets)
            ]
        return splits, names


def _validate(sampler: str, channels: int, context: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if isinstance(context, int) and context > 0 and channels != 2 * context + 1:
        raise ValueError(
            f"context={context} stacks {2 * context + 1} slices as channels, but channels={channels}. Set "
            f"channels={2 * context + 1} (the CLI passes it to the model's in_chans)."
        )
