"""``LabelledDataModule``: what cvft's labelled DataModules share, around one abstract "read the splits" step.

A labelled DataModule reads its source once, on the first question about the data, into items per split (samples,
records) and the list of class names. Everything else follows from those two and is written here once: the class
names, count and frequencies, the items of a split, the datasets of a Lightning stage, the files to predict on, the
class list a checkpoint records (and the check of it on resume), and the image size and normalisation resolved from
the backbone's pretrained data config. A subclass says where its data comes from and how it becomes datasets:

* :meth:`~LabelledDataModule._read_splits`: read the source into ``({split: items}, class names)``, holding out the
  splits the source does not supply (the one step every subclass must write);
* :meth:`~LabelledDataModule._build_dataset` and :meth:`~LabelledDataModule._build_predict_dataset`: the datasets;
* :meth:`~LabelledDataModule._has_labelled_data` and :meth:`~LabelledDataModule._source`: whether a source is set,
  and its name for messages.

Its ``__init__`` lists its own arguments (LightningCLI reads them from the signature) and forwards the image
pipeline and preference-pair options (user pipelines, random erasing, ``preference_pairs``) with ``**kwargs`` to this
base; it saves them all with :meth:`~LabelledDataModule._save_data_hparams`, validates the ones of its own, and hands
the shared ones to :meth:`~LabelledDataModule._keep_shared_options` and :meth:`~LabelledDataModule._resolve_data_config`
(which check them), and the forwarded ones to :meth:`~LabelledDataModule._keep_pipeline_options` and
:meth:`~LabelledDataModule._keep_preference_pairs`. A subclass builds its preset pipelines in
:meth:`~LabelledDataModule._preset_transform`; :meth:`~LabelledDataModule._transform` hands out a user pipeline
instead where one is given, and ``setup`` checks each user pipeline on a real image of the first split it serves
(:func:`~cvft.data.user_pipeline.check_pipeline_output`). The DataLoaders come from
:class:`~cvft.data.split_module.SplitDataModule`.

Preference pairs (DPO, reward models) are written here once too: a subclass that takes ``preference_pairs``
(:mod:`cvft.data.preference_option`) keeps it with :meth:`~LabelledDataModule._keep_preference_pairs` and builds
datasets over image files in :meth:`~LabelledDataModule._build_image_dataset`; the training split then becomes a
:class:`~cvft.data.preference.PreferencePairDataset` with the training pipeline, and validation and test stay
labelled.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cvft.checkpoints import save_loadable_hparams
from cvft.data._options import validate_options
from cvft.data.normalization import per_channel
from cvft.data.preference import PreferencePair, PreferencePairDataset
from cvft.data.preference_option import PreferencePairsSpec, check_preference_pairs, read_pairs
from cvft.data.samples import scan_unlabelled
from cvft.data.split_module import SplitDataModule
from cvft.data.transforms import IMAGENET_DATA_CONFIG, data_config_for
from cvft.data.user_pipeline import UserPipeline, check_pipeline_output, load_user_pipeline
from cvft.errors import CheckpointMismatchError, ConfigError, DatasetError

__all__ = ["LabelledDataModule", "SPLITS"]

_logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The labelled splits, in order."""

_SPLITS_OF_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}

ItemT = TypeVar("ItemT")
"""What a split holds: :class:`~cvft.data.samples.Sample`, ``MedicalRecord``, ``DetectionRecord`` ..."""


class LabelledDataModule(SplitDataModule, ABC, Generic[ItemT]):
    """A DataModule of labelled splits read lazily from one source; subclasses write :meth:`_read_splits`.

    ``class_names``, ``num_classes``, ``class_counts`` and :meth:`samples` work right after construction (the source
    is read on first use), so a CLI can link them into the model before ``setup``. Class names given to the
    constructor are used without reading the source (e.g. predicting with a checkpoint's classes).

    The arguments below are the image-pipeline and preference-pair options of the classification DataModules, which
    forward them with ``**kwargs`` (LightningCLI follows the forwarding and reads their help here). A subclass keeps
    them with :meth:`_keep_pipeline_options` and :meth:`_keep_preference_pairs`; one that does not forward them (the
    detection DataModule) has the defaults.

    Args:
        random_erasing: Probability of timm's random erasing on training images (timm's ``reprob``; 0: off), after
            normalisation, on top of any ``augment`` preset (:mod:`cvft.data.random_erasing`).
        random_erasing_mode: Fill of the erased box: ``pixel`` (per-pixel normal noise, timm's default in training),
            ``rand`` (one random colour) or ``const`` (the mean colour).
        train_transform: Your own training pipeline instead of ``augment``: a path to an albumentations YAML / JSON
            file (``A.save``), the same mapping inline in the config, or from Python an albumentations transform or
            a callable ``image -> tensor`` (:mod:`cvft.data.user_pipeline`). It must end in ``Normalize`` and
            ``ToTensorV2``: it is checked at setup on a real image (floating ``channels x image_size`` tensor,
            normalised) and refused naming the step at fault.
        eval_transform: Your own pipeline for validation, test and prediction (same forms and checks). Saved with
            the run: ``cvft predict`` / ``cvft test`` with ``--ckpt_path`` use the one the run was trained with.
        preference_pairs: Train on preference pairs (DPO, reward models) instead of the labels: a CSV path
            (``path,preferred,rejected[,weight]``, image paths relative to the CSV's folder or to ``root``, labels as
            class names or indices, multi-label sets as ``cat;dog``), or a generator over the labelled training
            split, ``{from: labels}`` or ``{from: cost_matrix, cost_matrix: [[...]]}``, with an optional ``seed``
            (:mod:`cvft.data.preference_option`). The training split becomes a
            :class:`~cvft.data.preference.PreferencePairDataset` with the training pipeline; validation and test
            stay labelled.

    Example:
        >>> class Toy(LabelledDataModule):
        ...     def __init__(self, class_names=None):
        ...         super().__init__()
        ...         self._keep_shared_options(2, 0, seed=0, val_fraction=0.0, augment="none", predict_root=None,
        ...                                   class_names=class_names)
        ...     def _read_splits(self):
        ...         return {"train": [0, 1, 1], "val": [1]}, ["cat", "dog"]
        ...     def _classes_of(self, item):
        ...         return [item]
        ...     def _build_dataset(self, split):
        ...         return self.samples(split)
        ...     def _build_predict_dataset(self):
        ...         return []
        ...     def _has_labelled_data(self):
        ...         return True
        ...     def _source(self):
        ...         return "toy"
        >>> data = Toy()
        >>> data.class_names, data.class_counts, data.samples("val"), data.state_dict()
        (['cat', 'dog'], [1, 2], [1], {'class_names': ['cat', 'dog']})
        >>> data.load_state_dict({"class_names": ["dog", "cat"]})
        Traceback (most recent call last):
        ...
        cvft.errors.CheckpointMismatchError: The checkpoint was trained on classes ['dog', 'cat'], ...
    """

    batch_size: int
    num_workers: int | None
    seed: int
    val_fraction: float
    augment: str
    predict_root: str | Path | None

    def __init__(
        self,
        *,
        random_erasing: float = 0.0,
        random_erasing_mode: str = "pixel",
        train_transform: str | dict[str, Any] | None = None,
        eval_transform: str | dict[str, Any] | None = None,
        preference_pairs: str | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._splits: dict[str, list[ItemT]] | None = None
        self._class_names: list[str] | None = None
        self._predict_files: list[Path] | None = None
        self.datasets: dict[str, Any] = {}
        self.user_pipelines: dict[str, UserPipeline] = {}
        """The user's pipelines by use, ``"train"`` and ``"eval"`` (val, test, predict), where given."""
        self.random_erasing, self.random_erasing_mode = random_erasing, random_erasing_mode
        self._pipeline_specs = {"train": train_transform, "eval": eval_transform}
        self.preference_pairs: PreferencePairsSpec = preference_pairs
        """Where the training split's preference pairs come from (``None``: train on the labels)."""
        self._checked_pipelines: set[str] = set()

    # --- construction helpers -------------------------------------------------------------------------------

    def _save_data_hparams(self, ignore: Sequence[str] = ()) -> None:
        """Save the calling constructor's arguments as ``hparams`` that load with ``weights_only``.

        ``class_names`` (and ``ignore``) stay out: the model records the resolved list, and Lightning refuses to log
        model and data hparams that share a key with different values. Path-like values become strings
        (:func:`~cvft.checkpoints.save_loadable_hparams`).

        Args:
            ignore: Further arguments to leave out.
        """
        frame = inspect.currentframe()
        ignore = ["class_names", *ignore]
        save_loadable_hparams(self, frame.f_back if frame else None, ignore=ignore)

    def _keep_shared_options(
        self,
        batch_size: int,
        num_workers: int | None,
        seed: int,
        val_fraction: float,
        augment: str,
        predict_root: str | Path | None,
        class_names: Sequence[str] | None,
        test_fraction: float | None = None,
    ) -> None:
        """Check and keep the options every labelled DataModule takes, and ``test_fraction`` where it takes one.

        ``augment`` is checked by the subclass (each has its own presets).

        Raises:
            ConfigError: ``batch_size`` or ``num_workers`` is out of range.
            DatasetError: A split fraction is out of range or the fractions leave no training images, or
                ``class_names`` is empty or names a class twice.
        """
        fractions = {"val_fraction": val_fraction}
        if test_fraction is not None:
            fractions["test_fraction"] = test_fraction
            self.test_fraction = test_fraction
        validate_options(batch_size=batch_size, num_workers=num_workers, **fractions)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.augment, self.predict_root = val_fraction, augment, predict_root
        self._class_names = _checked_class_names(class_names)

    def _resolve_data_config(
        self,
        backbone: str | None,
        image_size: int | tuple[int, int] | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        channels: int,
    ) -> None:
        """Set ``image_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` and ``data_config``.

        Given values win; the others come from the backbone's pretrained data config (ImageNet's at 224 px without
        a backbone). ``mean`` / ``std`` are fitted to ``channels`` by :func:`~cvft.data.normalization.per_channel`.

        Raises:
            ConfigError: ``image_size`` is not a positive size (checked before the backbone is looked up).
        """
        validate_options(image_size=image_size)
        config = dict(data_config_for(backbone) if backbone else IMAGENET_DATA_CONFIG)
        height, width = config["input_size"][1:]
        default_size = height if height == width else (height, width)
        self.image_size: int | tuple[int, int] = image_size if image_size is not None else default_size
        self.mean = per_channel(mean or config["mean"], channels, "mean")
        self.std = per_channel(std or config["std"], channels, "std")
        self.interpolation: str = config["interpolation"]
        self.crop_pct: float = config["crop_pct"]
        config.update(input_size=(channels, *_pair(self.image_size)), mean=self.mean, std=self.std)
        self.data_config: dict[str, Any] = config
        """Resolved ``input_size``, ``mean``, ``std``, ``interpolation`` and ``crop_pct``."""

    def _keep_pipeline_options(self) -> None:
        """Keep the user pipelines and random erasing (after ``save_hyperparameters``).

        The pipelines are loaded and their steps built now (:func:`~cvft.data.user_pipeline.load_user_pipeline`);
        their serialised form replaces the given value in ``hparams``, so a checkpoint holds the pipeline itself,
        not a path to a file that may change (a Python callable is recorded as ``None``).

        Raises:
            ConfigError: A pipeline cannot be loaded, or ``random_erasing`` is combined with ``train_transform``.
        """
        train_transform, eval_transform = self._pipeline_specs["train"], self._pipeline_specs["eval"]
        if train_transform is not None and self.random_erasing:
            raise ConfigError(
                "random_erasing adds erasing to the augment presets; train_transform replaces them. Put the erasing "
                "into your pipeline instead: a cvft.data.random_erasing.RandomErasing step (or A.Erasing) after "
                "Normalize, and leave random_erasing at 0."
            )
        for use, option, spec in (
            ("train", "train_transform", train_transform),
            ("eval", "eval_transform", eval_transform),
        ):
            pipeline = load_user_pipeline(spec, option)
            if pipeline is not None:
                self.user_pipelines[use] = pipeline
            if option in self.hparams:
                self.hparams[option] = pipeline.serialised if pipeline is not None else None

    def _keep_preference_pairs(self, multi_label: bool = False) -> None:
        """Check and keep ``preference_pairs`` (:mod:`cvft.data.preference_option`); it is in ``hparams`` as given.

        A CSV file is read (and a missing one refused) when the training split is built, so ``test`` and ``predict``
        with a run's config do not need it.

        Raises:
            DatasetError: A bad generator spec, naming the fix.
        """
        preference_pairs = self.preference_pairs
        if isinstance(preference_pairs, Path):
            preference_pairs = str(preference_pairs)
        check_preference_pairs(preference_pairs, multi_label, files=False)  # the CSV is read when training starts
        self.preference_pairs = dict(preference_pairs) if isinstance(preference_pairs, dict) else preference_pairs

    def _pipeline_options(self, train: bool) -> dict[str, Any]:
        """Keyword arguments of the image pipeline of a split (after :meth:`_resolve_data_config`).

        The training pipeline's own random generator is seeded from torch's seed, so a run repeats under
        ``lightning.seed_everything``; evaluation pipelines are deterministic.
        """
        return {
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "train": train,
            "preset": self.augment,
            "interpolation": self.interpolation,
            "seed": _train_seed() if train else None,
            "random_erasing": self.random_erasing,
            "random_erasing_mode": self.random_erasing_mode,
        }

    def _transform(self, train: bool) -> Any:
        """The image pipeline of the training split or of the evaluated ones: the user's where given, else a preset."""
        pipeline = self.user_pipelines.get("train" if train else "eval")
        if pipeline is not None:
            return pipeline.fresh(seed=_train_seed() if train else None)
        return self._preset_transform(train)

    def _preset_transform(self, train: bool) -> Any:
        """The cvft pipeline of the training or the evaluated splits (``augment``, the data config)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _preset_transform (or override _transform).")

    def random_training_pipeline(self) -> str | None:
        """Why a training image may come out differently at each epoch, or ``None`` when it cannot.

        Returns:
            The option that makes the training pipeline random (``augment``, ``random_erasing``,
            ``train_transform``), as a message names it.
        """
        if "train" in self.user_pipelines:
            return "train_transform (a user pipeline) may draw new random views every epoch"
        if self.augment != "none":
            return f"augment={self.augment!r} draws new random views every epoch (pass --data.augment none to cache)"
        if self.random_erasing:
            return f"random_erasing={self.random_erasing} erases new boxes every epoch (set it to 0 to cache)"
        return None

    # --- what the data is -----------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Class names; index ``i`` is class ``i``."""
        if self._class_names is None:
            self._scan()
        assert self._class_names is not None
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (multi-label, detection: images carrying each class), in class order."""
        counts: Counter[int] = Counter()
        for item in self.samples("train"):
            counts.update(self._classes_of(item))
        return [counts.get(i, 0) for i in range(self.num_classes)]

    def samples(self, split: str) -> list[ItemT]:
        """Return the items of ``"train"``, ``"val"`` or ``"test"`` (empty when the split does not exist).

        Args:
            split: Split name.

        Returns:
            The split's samples (records).

        Example:
            >>> data.samples("val")[0].path  # doctest: +SKIP
            PosixPath('digits/0/0003.png')
        """
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
        self._scan()
        assert self._splits is not None
        return list(self._splits.get(split, []))

    def records(self, split: str) -> list[ItemT]:
        """Alias of :meth:`samples` (the name the medical and detection DataModules use).

        Args:
            split: Split name.

        Returns:
            The split's records.
        """
        return self.samples(split)

    @property
    def predict_files(self) -> list[Path]:
        """Files of ``predict_root`` in the order ``predict_dataloader`` yields them (batch indices point here)."""
        if self._predict_files is None:
            if self.predict_root is None:
                raise DatasetError("No images to predict on: set predict_root (an image file or a folder).")
            self._predict_files = self._find_predict_files(self.predict_root)
        return list(self._predict_files)

    # --- Lightning hooks ------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs (``fit``, ``validate``, ``test``, ``predict``; ``None``: all labelled).

        Args:
            stage: Lightning stage.
        """
        if stage == "predict":
            self.datasets["predict"] = self._build_predict_dataset()
            self._check_user_pipeline("eval", self.datasets["predict"])
            return
        for split in _SPLITS_OF_STAGE.get(stage or "", SPLITS):
            if split == "train" and self.preference_pairs is not None:
                self.datasets[split] = self._build_pair_dataset()
                self._check_user_pipeline("train", self.datasets[split].images)
                continue
            self.datasets[split] = self._build_dataset(split)
            self._check_user_pipeline("train" if split == "train" else "eval", self.datasets[split])

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (or drawn by :meth:`_train_sampler`); the last incomplete batch is dropped.

        The module being trained may ask for more: ``num_views`` augmented views of each image (contrastive
        strategies) and sample indices (``needs_indices``, e.g. cached teacher logits), read from its
        ``strategy_stack``.
        """
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        stack = getattr(module, "strategy_stack", None)
        if stack is not None:
            self._check_pair_objective(stack)
        dataset = self._dataset("train")
        self._use_strategy_inputs(dataset)
        return self._loader(dataset, train=True, sampler=self._train_sampler())

    def preference_pair_items(self) -> list[PreferencePair]:
        """The training split's preference pairs as ``preference_pairs`` gives them (image files or train indices).

        Raises:
            DatasetError: ``preference_pairs`` is not set, or its pairs cannot be read (see
                :func:`~cvft.data.preference_option.read_pairs`).
        """
        if self.preference_pairs is None:
            raise DatasetError("preference_pairs is not set: this data trains on labels.")
        targets = [getattr(item, "target", item) for item in self.samples("train")]
        root = getattr(self, "root", None)
        multi_label = bool(getattr(self, "multi_label", False))
        return read_pairs(self.preference_pairs, self.class_names, targets, multi_label, root, self.seed)

    def state_dict(self) -> dict[str, Any]:
        """Return the class names, so a checkpoint records which classes its outputs mean."""
        return {"class_names": self.class_names} if self._knows_classes() else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that a resumed checkpoint was trained on the same classes.

        Args:
            state_dict: What :meth:`state_dict` returned when the checkpoint was saved.

        Raises:
            CheckpointMismatchError: The checkpoint's classes differ from this data's.
        """
        saved = state_dict.get("class_names")
        if saved is None or not self._knows_classes():
            return
        if list(saved) != self.class_names:
            raise CheckpointMismatchError(
                f"The checkpoint was trained on classes {saved}, but this data has {self.class_names}. "
                "Resume with the same data, or start a new run (fine-tune from the checkpoint's weights)."
            )

    # --- what a subclass writes -----------------------------------------------------------------------------

    @abstractmethod
    def _read_splits(self) -> tuple[dict[str, list[ItemT]], list[str]]:
        """Read the source: ``({"train": items, "val": ..., "test": ...}, class names)``, checked and complete.

        Splits the source does not supply are held out of the training items here (by class, patient or image);
        a split left out or empty does not exist. Runs once, on the first question about the data.
        """

    @abstractmethod
    def _build_dataset(self, split: str) -> Dataset:
        """The dataset of labelled ``split`` (``"train"``, ``"val"`` or ``"test"``)."""

    @abstractmethod
    def _build_predict_dataset(self) -> Dataset:
        """The dataset of :attr:`predict_files`."""

    @abstractmethod
    def _has_labelled_data(self) -> bool:
        """Whether a labelled source is set (without it, only given class names and predicting are possible)."""

    @abstractmethod
    def _source(self) -> str:
        """The labelled source, as messages name it."""

    def _build_image_dataset(self, files: Sequence[Path], train: bool) -> Dataset:
        """An unlabelled dataset over image ``files`` with the training or evaluation pipeline (preference CSVs)."""
        raise NotImplementedError(f"{type(self).__name__} does not read preference pairs of image files.")

    def _find_predict_files(self, root: str | Path) -> list[Path]:
        """The files under ``root`` (a file or a folder) to predict on; default: its images."""
        return scan_unlabelled(root)

    def _classes_of(self, item: ItemT) -> Iterable[int]:
        """The class indices ``item`` carries (counted by :attr:`class_counts`); default: its ``target``."""
        target = item.target  # type: ignore[attr-defined]
        return [target] if isinstance(target, int) else target

    def _train_sampler(self) -> Sampler | None:
        """Sampler of the training DataLoader; ``None``: shuffled."""
        return None

    # --- internals ------------------------------------------------------------------------------------------

    def _build_pair_dataset(self) -> PreferencePairDataset:
        """The training split as preference pairs over its own images or the CSV's files, with the training pipeline."""
        pairs = self.preference_pair_items()
        multi_label = bool(getattr(self, "multi_label", False))
        if isinstance(pairs[0].path, int):
            images: Dataset = self._build_dataset("train")
        else:
            files = list(dict.fromkeys(Path(pair.path) for pair in pairs))
            position = {file: index for index, file in enumerate(files)}
            pairs = [PreferencePair(position[Path(p.path)], p.preferred, p.rejected, p.weight) for p in pairs]
            images = self._build_image_dataset(files, train=True)
        _logger.info("%s: training on %d preference pairs (%s)", self._source(), len(pairs), self.preference_pairs)
        return PreferencePairDataset(pairs, images=images, num_classes=self.num_classes if multi_label else None)

    def _check_pair_objective(self, stack: Any) -> None:
        """Refuse pairs for an objective trained on labels, and labels for one trained on pairs (``strategy_stack``).

        Raises:
            DatasetError: The data and the strategies disagree, naming ``preference_pairs``.
        """
        pair_objectives = [s.name for s in getattr(stack, "strategies", []) if getattr(s, "pair_targets", False)]
        if self.preference_pairs is not None and not pair_objectives:
            raise DatasetError(
                f"preference_pairs={self.preference_pairs!r} makes the training batches preference pairs, but no "
                "strategy trains on pairs. Add dpo or reward_model to --model.strategies, or leave "
                "--data.preference_pairs out to train on the labels."
            )
        if self.preference_pairs is None and pair_objectives:
            raise DatasetError(
                f"{pair_objectives[0]} trains on preference pairs, but the training batches are labelled images. Set "
                "--data.preference_pairs: a CSV (path,preferred,rejected[,weight]) or a generator such as "
                "'{from: labels}'."
            )

    def _check_user_pipeline(self, use: str, dataset: Any) -> None:
        """Check the user pipeline of ``use`` once, on the first image of ``dataset`` (before training starts)."""
        pipeline = self.user_pipelines.get(use)
        if pipeline is None or use in self._checked_pipelines or not len(dataset) or not hasattr(dataset, "read"):
            return
        input_shape = (int(getattr(self, "channels", 3)), *_pair(self.image_size))
        check_pipeline_output(pipeline, dataset.read(0), input_shape, self.mean, self.std)  # type: ignore[arg-type]
        self._checked_pipelines.add(use)

    def _knows_classes(self) -> bool:
        return self._class_names is not None or self._has_labelled_data()

    def _scan(self) -> None:
        if self._splits is not None:
            return
        splits, class_names = self._read_splits()
        self._splits, self._class_names = splits, class_names
        sizes = ", ".join(f"{name} {len(splits[name])}" for name in SPLITS if splits.get(name))
        _logger.info("%s: %d classes, %s images", self._source(), len(class_names), sizes)


def _checked_class_names(class_names: Sequence[str] | None) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(name) for name in class_names]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if not names or duplicates:
        problem = f"duplicates {duplicates}" if duplicates else "no names"
        raise DatasetError(f"class_names has {problem}; give each class exactly once.")
    return names


def _train_seed() -> int:
    """Seed of a training pipeline's own generator: torch's, so a run repeats under ``lightning.seed_everything``."""
    return torch.initial_seed() % 2**32


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
