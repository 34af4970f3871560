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
    "CheckpointError",
    "StrategyError",
    "ConfigError",
]


class CvftError(Exception):
    """Base class of all cvft errors.

    Raised in a DataLoader worker, a cvft error reaches the main process as the same type with its own message:
    PyTorch rebuilds it from one string holding the worker's whole traceback, which the constructor trims back to
    the original message.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_without_worker_traceback(args[0], type(self)),)
        super().__init__(*args)


def _without_worker_traceback(message: str, error_type: type) -> str:
    """The original message inside torch's ``"Caught X in DataLoader worker ... Original Traceback ..."`` text."""
    if not message.startswith(f"Caught {error_type.__name__} ") or "\nOriginal Traceback" not in message:
        return message
    marker = f"\n{error_type.__module__}.{error_type.__qualname__}: "
    start = message.rfind(marker)
    return message[start + len(marker) :].rstrip("\n") if start >= 0 else message


class DatasetError(CvftError, ValueError):
    """A dataset root, CSV file or split is unusable (missing, empty, inconsistent)."""


class ImageLoadError(DatasetError):
    """An image file cannot be decoded (corrupt, truncated, not an image)."""


class WeightsError(CvftError, RuntimeError):
    """Pretrained weights cannot be found, read or applied."""


class HubUnavailableError(WeightsError):
    """The timm / Hugging Face hub cannot be reached to download pretrained weights."""


class CheckpointError(WeightsError):
    """A checkpoint file cannot be read safely: missing, empty, truncated, pickled objects, or not a checkpoint."""


class CheckpointMismatchError(WeightsError):
    """A checkpoint or adapter file belongs to a different backbone or class set."""


class StrategyError(CvftError, ValueError):
    """A fine-tuning strategy is misconfigured or does not apply to the given model."""


class ConfigError(CvftError, ValueError):
    """An option is out of its allowed range (a negative learning rate, a rate above 1, too few classes)."""
