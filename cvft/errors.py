"""Exceptions raised by cvft.

Every error says what was wrong, which value or file caused it and how to fix it. They subclass the built-in
exception a caller would naturally catch (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so existing
``except`` clauses keep working.
"""

__all__ = [
    "CvftError",
    "DatasetError",
    "ImageLoadError",
    "WeightsError",
    "HubUnavailableError",
    "CheckpointMismatchError",
    "StrategyError",
]


class CvftError(Exception):
    """Base class of all cvft errors."""


class DatasetError(CvftError, ValueError):
    """A dataset root, CSV file or split is unusable (missing, empty, inconsistent)."""


class ImageLoadError(DatasetError):
    """An image file cannot be decoded (corrupt, truncated, not an image)."""


class WeightsError(CvftError, RuntimeError):
    """Pretrained weights cannot be found, read or applied."""


class HubUnavailableError(WeightsError):
    """The timm / Hugging Face hub cannot be reached to download pretrained weights."""


class CheckpointMismatchError(WeightsError):
    """A checkpoint or adapter file belongs to a different backbone or class set."""


class StrategyError(CvftError, ValueError):
    """A fine-tuning strategy is misconfigured or does not apply to the given model."""
