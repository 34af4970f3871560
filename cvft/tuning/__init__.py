"""Finding a run's learning rate and batch size before it trains: Lightning's tuner on cvft's tasks.

* :func:`find_learning_rate` (:mod:`cvft.tuning.lr_finder`): the learning-rate range test behind
  ``cvft fit --model.lr auto`` and ``cvft lr-find``; writes ``lr_find.csv`` and ``lr_find.png``.
* :func:`find_batch_size` (:mod:`cvft.tuning.batch_size`): the largest batch that trains, behind
  ``cvft fit --tune_batch_size power|binsearch``.

Both run in a fit that ends after the search and leave the task with the weights and state it came with, so the fit
that follows trains as a run given those values would.
"""

from cvft.tuning.batch_size import BATCH_SIZE_MODES, BatchSizeFinderOptions, BatchSizeResult, find_batch_size
from cvft.tuning.lr_finder import LRFinderOptions, LRFinderResult, find_learning_rate, scale_groups_during_steps

__all__ = [
    "BATCH_SIZE_MODES",
    "BatchSizeFinderOptions",
    "BatchSizeResult",
    "LRFinderOptions",
    "LRFinderResult",
    "find_batch_size",
    "find_learning_rate",
    "scale_groups_during_steps",
]
