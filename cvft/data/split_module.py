"""The DataLoader side that cvft's DataModules share: datasets by split in, seeded DataLoaders out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cvft.data.dataset import seed_worker
from cvft.errors import DatasetError

__all__ = ["SplitDataModule"]

FILE_WORKERS = 2
"""Worker processes for datasets read from files when ``num_workers`` is ``None`` (automatic)."""

_STAGE_OF_SPLIT = {"train": "fit", "val": "validate", "test": "test"}


class SplitDataModule(L.LightningDataModule):
    """A LightningDataModule whose ``setup`` fills ``self.datasets`` by split; this class serves the DataLoaders.

    Subclasses build ``self.datasets["train" | "val" | "test" | "predict"]`` in ``setup`` and set ``batch_size`` and
    ``num_workers`` (``None``: :meth:`workers_for` chooses); they write their own ``train_dataloader`` (which may
    pass a ``sampler`` to :meth:`_loader`) and say in :meth:`missing_split_hint` how to provide a split that is
    missing. Training batches are shuffled and drop the last incomplete batch when the split holds more than one
    batch; workers are seeded with :func:`~cvft.data.dataset.seed_worker`.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> class Tiny(SplitDataModule):
        ...     batch_size, num_workers = 2, 0
        ...     def setup(self, stage=None):
        ...         self.datasets = {"train": TensorDataset(torch.arange(4.0)), "val": TensorDataset(torch.ones(0))}
        ...     def train_dataloader(self):
        ...         return self._loader(self._dataset("train"), train=True)
        >>> len(Tiny().train_dataloader()), Tiny().val_dataloader()
        (2, [])
    """

    #: ``collate_fn`` of every DataLoader (``None``: PyTorch's default collation).
    collate_fn: ClassVar[Callable[[list[Any]], Any] | None] = None
    batch_size: int
    num_workers: int | None
    datasets: dict[str, Any]

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches, or ``[]`` (validation skipped) when there is no validation split."""
        dataset = self._dataset("val", required=False)
        return self._loader(dataset, train=False) if dataset is not None else []

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader(self._dataset("test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches over the images to predict (see the subclass for what each batch holds)."""
        if "predict" not in getattr(self, "datasets", {}):
            self.setup("predict")
        return self._loader(self.datasets["predict"], train=False)

    def missing_split_hint(self, split: str) -> str:
        """How to provide ``split`` when it is missing (ends the error message)."""
        return f"Provide a {split} split."

    def _dataset(self, split: str, required: bool = True) -> Any:
        if split not in getattr(self, "datasets", {}):
            self.setup(_STAGE_OF_SPLIT[split])
        dataset = self.datasets[split]
        if len(dataset) == 0:
            if not required:
                return None
            raise DatasetError(f"There is no {split} split. {self.missing_split_hint(split)}")
        return dataset

    def _use_strategy_inputs(self, dataset: Any) -> None:
        """Give ``dataset`` the views and indices the trained module's strategies ask for (``strategy_stack``)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        stack = getattr(module, "strategy_stack", None)
        if stack is not None:
            dataset.num_views = stack.num_views
            dataset.return_index = stack.needs_indices

    def workers_for(self, dataset: Any) -> int:
        """DataLoader worker processes for ``dataset``: ``num_workers``, or when it is ``None`` an automatic choice.

        A dataset held decoded in memory (``in_memory = True``, e.g. MedMNIST arrays) is loaded in the training
        process: its items cost microseconds, and worker processes would only compete with the model for CPU cores
        (measured: a whole BreastMNIST fit on 2 cores took 30.3 s with 2 workers, 27.9 s with none). Datasets read
        from files get :data:`FILE_WORKERS` workers to decode while the model trains.
        """
        if self.num_workers is not None:
            return int(self.num_workers)
        return 0 if getattr(dataset, "in_memory", False) else FILE_WORKERS

    def _loader(self, dataset: Dataset, train: bool, sampler: Sampler | None = None) -> DataLoader:
        workers = self.workers_for(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,  # type: ignore[arg-type]
            num_workers=workers,
            collate_fn=type(self).collate_fn,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=seed_worker if workers > 0 else None,
        )
