"""Normalisation statistics fitted to the number of input channels, by one rule everywhere in cvft.

A backbone's pretrained ``mean`` / ``std`` usually hold three values (RGB), while the model may take one channel
(grayscale, ``in_chans=1``) or several (2.5D slice stacks). timm adapts a pretrained first convolution to other
channel counts by averaging its RGB filters; the statistics follow the same convention: the RGB values are averaged
and that average serves every channel. A single value likewise serves every channel, and one value per channel is
used as given. Any other count is refused, naming the option and the values.

The DataModules (:class:`~cvft.data.ImageFolderDataModule`, :class:`~cvft.data.medical.MedicalImageDataModule`),
the explanation pipeline and the detection heads all resolve their statistics with :func:`per_channel`.
"""

from __future__ import annotations

from collections.abc import Sequence

from cvft.errors import ConfigError

__all__ = ["per_channel"]


def per_channel(values: Sequence[float], channels: int, name: str) -> tuple[float, ...]:
    """Fit normalisation statistics (a mean or a std) to ``channels`` input channels.

    Args:
        values: One value, one per channel, or three (RGB) values.
        channels: Number of input channels.
        name: Option name used in the error message (``"mean"``, ``"std"``).

    Returns:
        One value per channel: ``values`` when they already are, else their average repeated ``channels`` times.

    Raises:
        ConfigError: ``values`` holds neither one, three nor ``channels`` values (a ``ValueError``).

    Example:
        >>> per_channel((0.485, 0.456, 0.406), 3, "mean")
        (0.485, 0.456, 0.406)
        >>> per_channel((0.3, 0.6, 0.9), 1, "mean")
        (0.6,)
        >>> per_channel((0.5,), 3, "std")
        (0.5, 0.5, 0.5)
    """
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) in (1, 3):  # one value for all, or RGB statistics averaged (timm's channel adaptation)
        return (sum(values) / len(values),) * channels
    raise ConfigError(f"{name} needs one value, or {channels} (one per channel), got {values}.")
