"""Deprecated alias of :mod:`cvft.cli.base` (moved there); import from :mod:`cvft.cli.base` or :mod:`cvft.cli`."""

import warnings

from cvft.cli.base import RunCLI, read_checkpoint_hparams

__all__ = ["RunCLI", "read_checkpoint_hparams"]

warnings.warn(
    "cvft.cli_base moved to cvft.cli.base; import RunCLI and read_checkpoint_hparams from there (or from cvft.cli). "
    "The old path will be removed in a future release.",
    DeprecationWarning,
    stacklevel=2,
)
