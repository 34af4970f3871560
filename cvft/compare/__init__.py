"""Compare fine-tuning strategies on your data: ``cvft compare`` and :func:`compare`.

Every strategy (a name, a stack like ``lora+supcon``, or a recipe file's ``model.strategies``) is fitted with every
seed, each in its own process, on the same data and budget; the results are tabulated (metric mean ± std over
seeds, trainable parameters and their share, training images/s, peak memory, wall time) and plotted with the
Pareto fronts. See :mod:`cvft.compare.runner` for the folder layout and resuming.

Example::

    from cvft.compare import compare

    table = compare(config="base.yaml", strategies=["linear_probe", "lora"], seeds=[0, 1],
                    overrides=["--data.root=images/"])
    table["test/acc_mean"], table.folder
"""

from cvft.compare.plot import pareto_front, plot_comparison
from cvft.compare.probe import RunProbe
from cvft.compare.runner import PlannedRun, compare, parse_seeds, parse_strategies
from cvft.compare.table import CompareTable, build_table, mean_std

__all__ = [
    "compare",
    "CompareTable",
    "build_table",
    "mean_std",
    "pareto_front",
    "plot_comparison",
    "parse_seeds",
    "parse_strategies",
    "PlannedRun",
    "RunProbe",
]
