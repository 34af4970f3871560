"""Data for multi-task fine-tuning: several labelled datasets, one task per batch, tasks drawn by ratio.

Every batch is ``{"images": Tensor, "targets": Tensor, "task": str}`` and holds samples of one task, the format
:class:`~cvft.tasks.multitask.MultiTaskClassifier` trains on. Which task a training batch comes from is drawn by
:class:`TaskBatchSampler` with probabilities ``ratios`` (default: proportional to the datasets' sizes).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from cvft.data._options import validate_options
from cvft.data.dataset import seed_worker
from cvft.errors import DatasetError

__all__ = ["MultiTaskDataModule", "TaskBatchSampler", "TaskCollate"]


class TaskBatchSampler(Sampler[list[int]]):
    """Batches of indices into the concatenation of several datasets, each batch from one dataset (task).

    The task of each batch is drawn independently with probabilities ``ratios``. Within a task, samples come in a
    fresh random order on every pass through its data; each batch holds distinct samples (``min(batch_size,
    size)`` of them), and the samples of a pass that do not fill a whole batch wait for a later pass. Everything
    derives from ``(seed, epoch)``, so an epoch is reproducible, and a resumed run (Lightning calls
    :meth:`set_epoch` on ``loader.batch_sampler.sampler``, which is this sampler itself) sees the same batches as an
    uninterrupted one.

    Under DDP (``num_replicas > 1``) every rank draws the same task at each step, and the ranks' batches are disjoint
    slices of one ``num_replicas * batch_size`` chunk of that task's pass order: one step on all ranks sees the
    samples a single process with ``batch_size * num_replicas`` would see (when every task holds that many), and
    every rank logs and synchronises the same task's metrics. The default epoch is still one pass over the data.

    Args:
        sizes: Number of samples of each task, in the order of the concatenated datasets.
        batch_size: Samples per batch.
        ratios: Probability of drawing each task (normalised; zeros allowed). ``None``: proportional to ``sizes``.
        num_batches: Batches per epoch (per rank). ``None``: ``sum(max(1, size // (batch_size * num_replicas)))``,
            one pass's worth of batches.
        seed: Seed of the draws (the same on every rank).
        rank: Process rank under DDP, in ``[0, num_replicas)``.
        num_replicas: Number of DDP processes (the world size); every task needs at least this many samples.

    Example:
        >>> sampler = TaskBatchSampler([4, 6], batch_size=2, seed=0)
        >>> len(sampler)
        5
        >>> all(max(b) < 4 or min(b) >= 4 for b in sampler)
        True
        >>> ranks = [list(TaskBatchSampler([4, 6], batch_size=2, rank=r, num_replicas=2)) for r in (0, 1)]
        >>> [set(a).isdisjoint(b) for a, b in zip(*ranks)]
        [True, True]
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        ratios: Sequence[float] | None = None,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise DatasetError(f"Every task needs at least one sample; sizes are {self.sizes}.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DatasetError(f"Need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}.")
        if any(s < num_replicas for s in self.sizes):
            raise DatasetError(
                f"Every task needs at least one sample per rank ({num_replicas} ranks); sizes are {self.sizes}."
            )
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}.")
        weights = np.asarray(self.sizes if ratios is None else ratios, dtype=np.float64)
        if len(weights) != len(self.sizes) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise DatasetError(f"ratios must be {len(self.sizes)} finite numbers >= 0, got {list(weights)}.")
        if weights.sum() <= 0:
            raise DatasetError("At least one task needs a ratio > 0.")
        self.ratios = (weights / weights.sum()).tolist()
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)
        default = sum(max(1, s // (self.batch_size * self.num_replicas)) for s in self.sizes)
        self.num_batches = default if num_batches is None else int(num_batches)
        if self.num_batches < 1:
            raise DatasetError(f"num_batches must be >= 1, got {num_batches}.")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).tolist()
        self.seed = int(seed)
        self.epoch = 0

    @property
    def sampler(self) -> TaskBatchSampler:
        """This sampler: Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler`` at each epoch start."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (called by Lightning at each epoch start)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def task_sequence(self) -> list[int]:
        """The task index of every batch of the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, 0, 0])  # rank-free; the 0 keeps 1-process draws as before
        return rng.choice(len(self.sizes), size=self.num_batches, p=self.ratios).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 0, 1])  # the same on every rank, as above
        orders: list[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in self.sizes]
        cursors = [0] * len(self.sizes)
        for task in self.task_sequence():
            size = min(self.batch_size, self.sizes[task] // self.num_replicas)
            chunk = size * self.num_replicas  # what all ranks together take from the task's pass order
            if cursors[task] + chunk > len(orders[task]):
                orders[task], cursors[task] = rng.permutation(self.sizes[task]), 0
            start = cursors[task] + self.rank * size
            cursors[task] += chunk
            yield (orders[task][start : start + size] + self.offsets[task]).tolist()


class _TaskDataset(Dataset):
    """One task's dataset, its items reduced to ``(image, target, task index)``."""

    def __init__(self, dataset: Dataset, task_index: int) -> None:
        self.dataset = dataset
        self.task_index = task_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        item = self.dataset[index]
        return item[0], item[1], self.task_index


class TaskCollate:
    """Collate ``(image, target, task index)`` items of one task into ``{"images", "targets", "task"}``.

    Args:
        task_names: Task names by index.

    Example:
        >>> import torch
        >>> batch = TaskCollate(["a", "b"])([(torch.zeros(3, 2, 2), 1, 1), (torch.ones(3, 2, 2), 0, 1)])
        >>> batch["task"], batch["images"].shape, batch["targets"].tolist()
        ('b', torch.Size([2, 3, 2, 2]), [1, 0])
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        self.task_names = list(task_names)

    def __call__(self, items: list[tuple[Any, Any, int]]) -> dict[str, Any]:
        """Collate one homogeneous batch."""
        tasks = {item[2] for item in items}
        if len(tasks) != 1:
            raise DatasetError(f"A batch mixes tasks {sorted(self.task_names[t] for t in tasks)}.")
        images, targets = default_collate([(item[0], item[1]) for item in items])
        return {"images": images, "targets": targets, "task": self.task_names[tasks.pop()]}


def _split_of(source: Any, split: str) -> Dataset | None:
    """The dataset of ``split`` ("train", "val", "test") from a Dataset (train only) or a LightningDataModule."""
    if isinstance(source, L.LightningDataModule):
        source.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        loader = getattr(source, f"{split}_dataloader")()
        return loader.dataset if isinstance(loader, DataLoader) else None
    if split == "train":
        return source
    return None


class MultiTaskDataModule(L.LightningDataModule):
    """Several classification datasets by task name; training batches of one task each, drawn by ``ratios``.

    Each source is a torch ``Dataset`` of ``(image, target, ...)`` items (extra item fields are dropped) or a
    LightningDataModule such as :class:`~cvft.data.ImageFolderDataModule`, whose train / val / test datasets (and
    transforms) are used. Validation and test give one DataLoader per task that has such data, in task order.

    Under DDP the module shards the data itself, so pass ``Trainer(use_distributed_sampler=False)`` (it refuses to
    train otherwise: Lightning's sampler cannot split one-task batches) and, with more than one task, a strategy that
    finds unused parameters (``strategy="ddp_find_unused_parameters_true"``: a step trains one task's head). Every rank
    trains the same task at each step, on its own disjoint slice of that task's samples (:class:`TaskBatchSampler`),
    and validation / test loaders give each rank its share of the samples, as Lightning's ``DistributedSampler`` would.

    Args:
        tasks: Task name -> training ``Dataset`` or LightningDataModule.
        val: Task name -> validation ``Dataset`` (overrides a DataModule's own validation split).
        test: Task name -> test ``Dataset`` (overrides a DataModule's own test split).
        batch_size: Samples per batch (training and evaluation).
        ratios: Task name -> probability of drawing the task for a training batch (normalised; every task must be
            named). ``None``: proportional to the training set sizes.
        batches_per_epoch: Training batches per epoch; ``None``: every task's ``size // batch_size`` summed.
        seed: Seed of the task draws and sample orders.
        num_workers: DataLoader worker processes.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> shapes = TensorDataset(torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,)))
        >>> colours = TensorDataset(torch.randn(4, 3, 4, 4), torch.randint(0, 2, (4, 5)).float())
        >>> data = MultiTaskDataModule({"shapes": shapes, "colours": colours}, batch_size=2)
        >>> data.setup("fit")
        >>> data.ratios
        {'shapes': 0.6666666666666666, 'colours': 0.3333333333333333}
        >>> batch = next(iter(data.train_dataloader()))
        >>> sorted(batch), batch["images"].shape[0]
        (['images', 'targets', 'task'], 2)
    """

    def __init__(
        self,
        tasks: Mapping[str, Any],
        val: Mapping[str, Dataset] | None = None,
        test: Mapping[str, Dataset] | None = None,
        batch_size: int = 32,
        ratios: Mapping[str, float] | None = None,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        num_workers: int | None = 0,
    ) -> None:
        super().__init__()
        validate_options(batch_size=batch_size, num_workers=num_workers, batches_per_epoch=batches_per_epoch)
        if not tasks:
            raise DatasetError("MultiTaskDataModule needs at least one task: {name: Dataset or DataModule}.")
        self.sources = dict(tasks)
        self.task_names = list(self.sources)
        for label, given in (("val", val), ("test", test), ("ratios", ratios)):
            unknown = sorted(set(given or {}) - set(self.task_names))
            if unknown:
                raise DatasetError(f"{label} names unknown tasks {unknown}; the tasks are {self.task_names}.")
        if ratios is not None:
            missing = [t for t in self.task_names if t not in ratios]
            if missing:
                raise DatasetError(f"ratios must give every task a value; missing {missing} (use 0 to skip one).")
        self._ratios = dict(ratios) if ratios is not None else None
        self._explicit = {"val": dict(val or {}), "test": dict(test or {})}
        self.batch_size = int(batch_size)
        self.batches_per_epoch = batches_per_epoch
        self.seed = int(seed)
        self.num_workers = int(num_workers or 0)
        self.datasets: dict[str, dict[str, Dataset]] = {}
        self.collate = TaskCollate(self.task_names)

    def _split(self, split: str) -> dict[str, Dataset]:
        if split not in self.datasets:
            found: dict[str, Dataset] = {}
            for task in self.task_names:
                dataset = self._explicit.get(split, {}).get(task)
                if dataset is None:
                    dataset = _split_of(self.sources[task], split)
                if dataset is not None and len(dataset) > 0:
                    found[task] = dataset
            self.datasets[split] = found
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Collect the datasets ``stage`` needs from the sources."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ("train",))
        for split in wanted:
            self._split(split)
        if "train" in wanted:
            missing = [t for t in self.task_names if t not in self.datasets["train"]]
            if missing:
                raise DatasetError(f"Tasks {missing} have no training data; give each task a non-empty dataset.")

    @property
    def task_sizes(self) -> dict[str, int]:
        """Training samples per task."""
        return {task: len(dataset) for task, dataset in self._split("train").items()}

    @property
    def ratios(self) -> dict[str, float]:
        """Normalised probability of drawing each task for a training batch."""
        sizes = self.task_sizes
        raw = self._ratios if self._ratios is not None else sizes
        total = sum(float(raw[t]) for t in self.task_names)
        if total <= 0:
            raise DatasetError(f"ratios must have a positive sum, got {raw}.")
        return {task: float(raw[task]) / total for task in self.task_names}

    def _ranks(self) -> tuple[int, int]:
        """``(rank, world size)`` of the attached trainer; ``(0, 1)`` without one."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _check_distributed_sampler(self) -> None:
        """Refuse Lightning's sampler injection, which cannot split one-task batches (it would fail unclearly)."""
        world = self._ranks()[1]
        # Lightning exposes the flag only on its accelerator connector; without it, its own error remains
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise DatasetError(
                f"MultiTaskDataModule shards its one-task training batches across the {world} processes itself; "
                "Lightning's distributed sampler cannot split them. Pass Trainer(use_distributed_sampler=False) "
                "(and, with several tasks, strategy='ddp_find_unused_parameters_true')."
            )

    def train_sampler(self) -> TaskBatchSampler:
        """The batch sampler of the training DataLoader (seeded by ``seed``; sharded by the trainer's ranks)."""
        sizes = self.task_sizes
        rank, world = self._ranks()
        ratios = self.ratios
        return TaskBatchSampler(
            [sizes[t] for t in self.task_names],
            self.batch_size,
            [ratios[t] for t in self.task_names],
            num_batches=self.batches_per_epoch,
            seed=self.seed,
            rank=rank,
            num_replicas=world,
        )

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            collate_fn=self.collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=seed_worker if workers > 0 else None,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Homogeneous training batches, tasks drawn by :attr:`ratios`."""
        self._check_distributed_sampler()
        train = self._split("train")
        concat = ConcatDataset([_TaskDataset(train[t], i) for i, t in enumerate(self.task_names)])
        return self._loader(concat, batch_sampler=self.train_sampler())

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        datasets = self._split(split)
        rank, world = self._ranks()
        loaders = []
        for i, task in enumerate(self.task_names):
            if task not in datasets:
                continue
            dataset = _TaskDataset(datasets[task], i)
            # under DDP each rank evaluates its share, padded to equal lengths as Lightning's own sampler does
            sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
            loaders.append(self._loader(dataset, batch_size=self.batch_size, sampler=sampler))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        """One validation DataLoader per task with validation data, in task order (``[]``: none)."""
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """One test DataLoader per task with test data, in task order."""
        return self._eval_loaders("test")
