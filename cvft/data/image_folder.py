"""``ImageFolderDataModule``: class folders or label CSV files in, seeded train / val / test DataLoaders out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvft.data._options import validate_options
from cvft.data.dataset import ImageDataset
from cvft.data.image_check import find_unreadable_images
from cvft.data.labelled_module import LabelledDataModule
from cvft.data.samples import (
    Sample,
    find_split_roots,
    read_label_csv,
    scan_class_folders,
    scan_split_folders,
    scan_unlabelled,
)
from cvft.data.split import stratified_split
from cvft.data.transforms import build_transforms, check_augment
from cvft.errors import DatasetError, ImageLoadError

__all__ = ["ImageFolderDataModule", "CHECK_IMAGES_MODES", "ON_BAD_IMAGE_MODES"]

_logger = logging.getLogger(__name__)

CHECK_IMAGES_MODES: tuple[str, ...] = ("none", "header", "full")
"""Values of ``ImageFolderDataModule(check_images=...)``."""

ON_BAD_IMAGE_MODES: tuple[str, ...] = ("error", "skip")
"""Values of ``ImageFolderDataModule(on_bad_image=...)``."""

_MAX_LISTED = 20


class ImageFolderDataModule(LabelledDataModule[Sample]):
    """Image classification data from class folders or ``path,label`` CSV files.

    Where the labelled images come from (first match wins):

    1. ``csv`` (+ optional ``val_csv`` / ``test_csv``): ``path,label`` files, multi-label rows as ``a|b``.
    2. ``root`` with ``train/`` (+ optional ``val/``, ``valid/``, ``validation/``, ``test/``) class folders.
    3. ``root`` with one sub-folder per class.

    Splits not given explicitly are cut from the training images by a seeded, stratified split
    (``val_fraction``, ``test_fraction``). Image size, mean, std, interpolation and eval crop default to the
    backbone's pretrained config (ImageNet statistics at 224 px without a backbone).

    ``num_classes``, ``class_names`` and ``class_counts`` work right after construction (the data is scanned on
    first use), so a CLI can link them into the model before ``setup``.

    Args:
        root: Folder of class folders, or of ``train``/``val``/``test`` folders of class folders. With ``csv``:
            the folder that the CSV's relative paths start from (default: each CSV file's folder).
        csv: Training ``path,label`` CSV file.
        val_csv: Validation CSV file; without it ``val_fraction`` of the training images are held out.
        test_csv: Test CSV file; without it ``test_fraction`` of the training images are held out.
        backbone: timm model name whose pretrained data config (size, mean, std, interpolation, crop) is used.
        image_size: Input size in pixels; default: the backbone's, else 224.
        mean: Per-channel normalisation mean in 0..1; default: the backbone's, else ImageNet's.
        std: Per-channel normalisation std in 0..1; default: the backbone's, else ImageNet's.
        val_fraction: Share of each class held out for validation when no validation split is given (0: none).
        test_fraction: Share of each class held out for testing when no test split is given (0: none).
        seed: Seed of the train / val / test split.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes (0: load in the main process; None: automatic, see
            :meth:`~cvft.data.split_module.SplitDataModule.workers_for`).
        augment: Training augmentation preset: ``none``, ``light``, ``default``, ``strong``, ``randaugment``,
            ``trivialaugment``, ``augmix``, or a timm-style ``rand-m9-n2-mstd0.5`` / ``augmix-m3-w3-a1`` string
            (:mod:`cvft.data.transforms`, :mod:`cvft.data.auto_augment`). Ignored with ``train_transform``.
        multi_label: Images may have several classes (CSV labels ``a|b``); targets become multi-hot vectors.
        channels: 3 for RGB, 1 for grayscale input.
        predict_root: Image file or folder (searched recursively) for ``predict``.
        check_images: Validate every image before training: ``none``, ``header`` (cheap, misses truncated JPEGs)
            or ``full`` (decodes every image in worker processes, JPEG at reduced size; results are cached by file
            size and modification time under ``$CVFT_CACHE``, default ``~/.cache/cvft``, so a second run over the
            same folder costs one ``stat`` per image). Bad files are handled as ``on_bad_image`` says.
        on_bad_image: ``error``: list every bad file in one :class:`~cvft.errors.ImageLoadError`. ``skip``: leave
            them out, log how many, and keep them in :attr:`skipped_images` (the ``TrainingReport`` callback writes
            them to ``skipped_images.txt`` in the run folder).
        class_names: Class names in index order. Given, ``class_names`` / ``num_classes`` come from this list
            without scanning the data (e.g. predicting with a checkpoint's classes), and labelled data is mapped
            onto this order (a class not in the list raises). ``None``: the sorted class folder names or CSV labels.
        **kwargs: The image-pipeline and preference-pair options, forwarded to
            :class:`~cvft.data.labelled_module.LabelledDataModule`: ``random_erasing``, ``random_erasing_mode``,
            ``train_transform``, ``eval_transform``, ``preference_pairs``.

    Example:
        >>> from cvft.data.demo import write_demo_image_folder
        >>> import tempfile
        >>> root = write_demo_image_folder("digits", Path(tempfile.mkdtemp()) / "digits", limit_per_class=5)
        >>> data = ImageFolderDataModule(root, image_size=32, batch_size=4, num_workers=0)
        >>> data.num_classes, data.class_names[:3]
        (10, ['0', '1', '2'])
    """

    def __init__(
        self,
        root: str | Path | None = None,
        csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        backbone: str | None = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        augment: str = "default",
        multi_label: bool = False,
        channels: int = 3,
        predict_root: str | None = None,
        check_images: str = "full",
        class_names: list[str] | None = None,
        on_bad_image: str = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._save_data_hparams()
        validate_options(
            choices={
                "check_images": (check_images, CHECK_IMAGES_MODES),
                "on_bad_image": (on_bad_image, ON_BAD_IMAGE_MODES),
                "channels": (channels, (1, 3)),
            },
        )
        check_augment(augment, self.random_erasing, self.random_erasing_mode)
        if multi_label and csv is None and root is not None:
            raise DatasetError(
                "multi_label=True needs labels from a CSV file (csv=...); class folders are single-label."
            )
        self.root = Path(root) if root is not None else None
        self.csv, self.val_csv, self.test_csv = csv, val_csv, test_csv
        self.multi_label, self.channels = multi_label, channels
        self.check_images, self.on_bad_image = check_images, on_bad_image
        self.skipped_images: dict[Path, str] = {}
        """Images left out with ``on_bad_image="skip"``, each with the reason."""
        self._keep_shared_options(
            batch_size, num_workers, seed, val_fraction, augment, predict_root, class_names, test_fraction=test_fraction
        )
        self._resolve_data_config(backbone, image_size, mean, std, channels)
        self._keep_pipeline_options()
        self._keep_preference_pairs(multi_label)

    # --- reading the data ----------------------------------------------------------------------------------

    def _read_splits(self) -> tuple[dict[str, list[Sample]], list[str]]:
        splits, class_names = self._read_labelled()
        if not self.multi_label and len(class_names) < 2:
            found = f"only the class {class_names[0]!r}" if class_names else "no class"
            raise DatasetError(
                f"{self._source()} has {found}; single-label classification needs at least 2 classes. Add a folder "
                "(or CSV label) per class, or use multi_label=True with a CSV for a one-label yes/no classifier."
            )
        bad = self._validate_images([s.path for split in splits.values() for s in split])
        splits = {name: [s for s in samples if s.path not in bad] for name, samples in splits.items()}
        self._split_missing(splits)
        if not splits["train"]:
            raise DatasetError(f"The training split of {self._source()} is empty. Add images.")
        return splits, class_names

    def _find_predict_files(self, root: str | Path) -> list[Path]:
        files = scan_unlabelled(root)
        bad = self._validate_images(files)
        readable = [path for path in files if path not in bad]
        if not readable:
            raise DatasetError(f"None of the {len(files)} image(s) in {root} can be read.")
        return readable

    def _build_dataset(self, split: str) -> ImageDataset:
        return ImageDataset(
            self.samples(split),
            self._transform(split == "train"),
            self.channels,
            multi_label=self.multi_label,
            num_classes=self.num_classes,
        )

    def _build_image_dataset(self, files: Sequence[Path], train: bool) -> ImageDataset:
        return ImageDataset(files, self._transform(train), self.channels)

    def _build_predict_dataset(self) -> ImageDataset:
        return ImageDataset(self.predict_files, self._transform(False), self.channels)

    # --- internals ------------------------------------------------------------------------------------------

    def _preset_transform(self, train: bool) -> Any:
        return build_transforms(**self._pipeline_options(train), crop_pct=self.crop_pct)

    def missing_split_hint(self, split: str) -> str:
        """How to provide a missing split."""
        return f"Set {split}_fraction > 0, pass {split}_csv=..., or add a root/{split} folder of class folders."

    def _has_labelled_data(self) -> bool:
        return self.root is not None or self.csv is not None

    def _source(self) -> str:
        return str(self.csv or self.root)

    def _read_labelled(self) -> tuple[dict[str, list[Sample]], list[str]]:
        given = self._class_names
        if self.csv is not None:
            train, names = read_label_csv(self.csv, self.root, self.multi_label, class_names=given)
            splits = {"train": train}
            for split, path in (("val", self.val_csv), ("test", self.test_csv)):
                if path is not None:
                    splits[split], _ = read_label_csv(path, self.root, self.multi_label, class_names=names)
            return splits, names
        if self.root is None:
            raise DatasetError("No labelled data: set root (a folder of class folders) or csv (a 'path,label' file).")
        if self.val_csv is not None or self.test_csv is not None:
            raise DatasetError("val_csv / test_csv need csv for the training split too.")
        if find_split_roots(self.root) is not None:
            return scan_split_folders(self.root, given)
        train, names = scan_class_folders(self.root, given)
        return {"train": train}, names

    def _split_missing(self, splits: dict[str, list[Sample]]) -> None:
        val_fraction = self.val_fraction if "val" not in splits else 0.0
        test_fraction = self.test_fraction if "test" not in splits else 0.0
        if val_fraction == 0.0 and test_fraction == 0.0:
            return
        train = splits["train"]
        train_idx, val_idx, test_idx = stratified_split(
            [s.target for s in train], val_fraction, test_fraction, self.seed
        )
        splits["train"] = [train[i] for i in train_idx]
        if val_fraction:
            splits["val"] = [train[i] for i in val_idx]
        if test_fraction:
            splits["test"] = [train[i] for i in test_idx]

    def _validate_images(self, paths: Sequence[Path]) -> set[Path]:
        """Check ``paths`` as ``check_images`` says; return the bad ones to skip, or raise (``on_bad_image``)."""
        if self.check_images == "none" or not paths:
            return set()
        errors = find_unreadable_images(paths, full=self.check_images == "full")
        if not errors:
            return set()
        unique = len(set(paths))
        if self.on_bad_image == "skip":
            self.skipped_images.update(errors)
            _logger.warning(
                "Skipping %d of %d image(s) that cannot be read (on_bad_image='skip'), e.g. %s",
                len(errors), unique, next(iter(errors.values())),
            )  # fmt: skip
            return set(errors)
        messages = list(errors.values())
        listed = "\n  ".join(messages[:_MAX_LISTED])
        more = f"\n  … and {len(messages) - _MAX_LISTED} more" if len(messages) > _MAX_LISTED else ""
        raise ImageLoadError(
            f"{len(messages)} of {unique} image(s) cannot be read (check_images={self.check_images!r}):\n"
            f"  {listed}{more}\nRe-export or delete these files, or pass on_bad_image='skip' to leave them out."
        )
