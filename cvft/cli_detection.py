"""Deprecated alias of :mod:`cvft.cli.detection` (moved there); import from it or from :mod:`cvft.cli`."""

import warnings

from cvft.cli.detection import DetectionCLI, run_detection_cli

__all__ = ["DetectionCLI", "run_detection_cli"]

warnings.warn(
    "cvft.cli_detection moved to cvft.cli.detection; import DetectionCLI and run_detection_cli from there (or from "
    "cvft.cli). The old path will be removed in a future release.",
    DeprecationWarning,
    stacklevel=2,
)
