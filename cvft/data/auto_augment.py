"""RandAugment, TrivialAugment (wide) and AugMix as albumentations steps, and timm-style strings that configure them.

The operations are torchvision's (``torchvision.transforms.v2``), run on the image as a tensor inside one
albumentations :class:`~albumentations.ImageOnlyTransform`. Their random draws come from the albumentations pipeline's
own generator (``A.Compose(seed=...)``, reseeded per DataLoader worker by :func:`~cvft.data.dataset.seed_worker`): each
call draws one seed from it and runs the torchvision operation under that seed with torch's global generator saved
and restored, so a pipeline repeats exactly under its seed and leaves torch's random state (model init, dropout)
untouched. ``uint8`` images (natural images, 1 or 3 channels) and ``float32`` images in ``[0, 1]`` (medical images)
are both accepted; the output keeps the input's dtype.

``augment`` strings (:func:`auto_augment_step`), in timm's ``--aa`` spelling:

* ``"randaugment"`` = ``"rand-m9-n2-mstd0.5"``: ``n`` operations drawn uniformly, each of magnitude ``m`` on timm's
  0-10 scale, drawn per operation from ``N(m, mstd)`` and clipped to ``[0, mmax]`` (``mstd`` above 100: uniform in
  ``[0, m]``). Keys: ``m`` (9), ``n`` (2), ``mstd`` (0 unless given, as in timm), ``mmax`` (10).
  The operations are torchvision's RandAugment space (identity, shear, translate up to 45 %, rotate up to 30°,
  brightness / colour / contrast / sharpness up to ±0.9, posterize, solarize, autocontrast, equalize), each applied
  when drawn; timm's own list differs slightly (invert and solarize-add instead of identity, each op applied with
  probability 0.5), so timm's ``inc1`` and ``p`` keys are refused.
* ``"trivialaugment"``: TrivialAugment-Wide (Müller & Hutter 2021): one operation with a uniformly drawn magnitude
  from 31 bins of the wide ranges. No keys.
* ``"augmix"`` = ``"augmix-m3-w3-a1"``: AugMix (Hendrycks et al. 2020), ``w`` chains of ``d`` operations of severity
  ``m`` (1-10) mixed with Dirichlet(``a``) weights, then with the original by Beta(``a``, ``a``). Keys: ``m``
  (severity, 3), ``w`` (width, 3), ``d`` (depth 1-3; left out: drawn in 1..3 per chain), ``a`` (alpha, 1). Only the
  augmentation: AugMix's Jensen-Shannon consistency loss is not part of it.

Geometric operations fill uncovered pixels with ``fill`` (cvft's presets pass the normalisation mean, as timm does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from albumentations.core.transforms_interface import ImageOnlyTransform
from torchvision.transforms import v2

from cvft.errors import ConfigError

__all__ = [
    "AUTO_AUGMENT_PRESETS",
    "AugMix",
    "RandAugment",
    "TrivialAugmentWide",
    "auto_augment_step",
    "is_auto_augment",
]

AUTO_AUGMENT_PRESETS: tuple[str, ...] = ("randaugment", "trivialaugment", "augmix")
"""Preset names of the automatic augmentation policies (each also takes a timm-style string, see the module)."""

_KEYS = {
    "rand": {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "magnitude_max"},
    "augmix": {"m": "severity", "w": "width", "d": "depth", "a": "alpha"},
}
_PRESET_OF_PREFIX = {"rand": "randaugment", "augmix": "augmix"}
_RANDAUGMENT_PRESET = {"magnitude": 9.0, "num_ops": 2, "magnitude_std": 0.5}
_MAGNITUDE_BINS = 101  # torchvision bins: magnitude m of timm's 0-10 scale is bin round(10 m), 0.1 resolution
_INTEGER_KEYS = {"num_ops", "width", "depth", "severity"}
_KEY_PATTERN = re.compile(r"([a-z]+)(inf|-?\d+(?:\.\d*)?)")


class _TorchvisionPolicy(ImageOnlyTransform):
    """One torchvision augmentation policy as an albumentations step, seeded by the pipeline's generator."""

    def __init__(self, fill: Sequence[float] | float | None = None, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.fill = None if fill is None else [float(v) for v in np.atleast_1d(np.asarray(fill, dtype=float))]

    def get_params(self) -> dict[str, Any]:
        """One seed for torch's generator per image, drawn from the pipeline's own generator."""
        return {"torch_seed": int(self.random_generator.integers(0, 2**63 - 1))}

    def apply(self, img: np.ndarray, torch_seed: int = 0, **params: Any) -> np.ndarray:
        """Run the policy on ``img`` (``H x W x C``, ``uint8`` or ``float32`` in ``[0, 1]``); same shape, dtype out."""
        if img.dtype not in (np.uint8, np.float32):
            raise ValueError(
                f"{type(self).__name__} takes uint8 images or float32 images in [0, 1], got {img.dtype}; place it "
                "before Normalize (and convert other dtypes first)."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(img if img.ndim == 3 else img[:, :, None])).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            out = self._augment(tensor, self._fill_for(tensor))
        return np.ascontiguousarray(out.permute(1, 2, 0).numpy()).reshape(img.shape)

    def _fill_for(self, image: torch.Tensor) -> list[float] | None:
        if self.fill is None:
            return None
        channels = image.shape[0]
        values = self.fill if len(self.fill) == channels else [sum(self.fill) / len(self.fill)] * channels
        scale = 255.0 if image.dtype == torch.uint8 else 1.0
        return [round(v * scale) if scale > 1 else v for v in values]

    def _augment(self, image: torch.Tensor, fill: list[float] | None) -> torch.Tensor:
        raise NotImplementedError

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments written by ``A.save`` / ``A.to_dict``."""
        return ("fill",)


class RandAugment(_TorchvisionPolicy):
    """RandAugment (Cubuk et al. 2020) with timm's magnitude scale and per-operation magnitude noise.

    Args:
        num_ops: Operations applied in sequence (timm's ``n``).
        magnitude: Magnitude on timm's 0-10 scale (timm's ``m``; 10 is each operation's largest change).
        magnitude_std: Standard deviation of the magnitude drawn per operation (timm's ``mstd``; 0: fixed,
            ``inf``: uniform in ``[0, magnitude]``).
        magnitude_max: Upper clip of drawn magnitudes (timm's ``mmax``), at most 10.
        fill: Fill of uncovered pixels in ``[0, 1]`` units, one value or one per channel (``None``: black).
        p: Probability of applying the step.

    Example:
        >>> step = RandAugment(num_ops=2, magnitude=9, p=1.0)
        >>> step.set_random_seed(0)
        >>> step(image=np.full((8, 8, 1), 100, np.uint8))["image"].shape
        (8, 8, 1)
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.0,
        magnitude_max: float = 10.0,
        fill: Sequence[float] | float | None = None,
        p: float = 1.0,
    ) -> None:
        super().__init__(fill=fill, p=p)
        if not isinstance(num_ops, int) or num_ops < 1:
            raise ValueError(f"RandAugment num_ops (n) must be an integer >= 1, got {num_ops!r}.")
        if not 0.0 <= magnitude_max <= 10.0 or not 0.0 <= magnitude <= magnitude_max:
            raise ValueError(
                f"RandAugment magnitude (m) must lie in [0, mmax] and mmax in [0, 10] (timm's scale), got "
                f"m={magnitude}, mmax={magnitude_max}."
            )
        if not magnitude_std >= 0.0:
            raise ValueError(f"RandAugment magnitude_std (mstd) must be >= 0, got {magnitude_std}.")
        self.num_ops, self.magnitude = num_ops, float(magnitude)
        self.magnitude_std, self.magnitude_max = float(magnitude_std), float(magnitude_max)

    def _augment(self, image: torch.Tensor, fill: list[float] | None) -> torch.Tensor:
        for _ in range(self.num_ops):
            magnitude = self.magnitude
            if math.isinf(self.magnitude_std) or self.magnitude_std > 100:
                magnitude = float(torch.rand(())) * magnitude
            elif self.magnitude_std > 0:
                magnitude = magnitude + float(torch.randn(())) * self.magnitude_std
            bin_index = round(min(max(magnitude, 0.0), self.magnitude_max) * (_MAGNITUDE_BINS - 1) / 10)
            op = v2.RandAugment(
                num_ops=1,
                magnitude=bin_index,
                num_magnitude_bins=_MAGNITUDE_BINS,
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=fill,  # type: ignore[arg-type]
            )
            image = op(image)
        return image

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments written by ``A.save`` / ``A.to_dict``."""
        return ("num_ops", "magnitude", "magnitude_std", "magnitude_max", "fill")


class TrivialAugmentWide(_TorchvisionPolicy):
    """TrivialAugment-Wide (Müller & Hutter 2021): one operation, magnitude drawn uniformly from 31 bins.

    Args:
        fill: Fill of uncovered pixels in ``[0, 1]`` units (``None``: black).
        p: Probability of applying the step.

    Example:
        >>> step = TrivialAugmentWide(p=1.0)
        >>> step.set_random_seed(0)
        >>> step(image=np.zeros((8, 8, 3), np.float32))["image"].dtype
        dtype('float32')
    """

    def _augment(self, image: torch.Tensor, fill: list[float] | None) -> torch.Tensor:
        op = v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR, fill=fill)  # type: ignore[arg-type]
        return op(image)


class AugMix(_TorchvisionPolicy):
    """AugMix (Hendrycks et al. 2020): ``width`` chains of operations mixed with the original image.

    Args:
        severity: Severity of the operations, 1-10 (timm's ``m``).
        width: Augmentation chains mixed (``w``).
        depth: Operations per chain (``d``); -1 draws 1-3 per chain.
        alpha: Dirichlet / Beta parameter of the mixing weights (``a``).
        fill: Fill of uncovered pixels in ``[0, 1]`` units (``None``: black).
        p: Probability of applying the step.

    Example:
        >>> step = AugMix(severity=3, width=3, p=1.0)
        >>> step.set_random_seed(0)
        >>> step(image=np.zeros((8, 8, 3), np.uint8))["image"].shape
        (8, 8, 3)
    """

    def __init__(
        self,
        severity: int = 3,
        width: int = 3,
        depth: int = -1,
        alpha: float = 1.0,
        fill: Sequence[float] | float | None = None,
        p: float = 1.0,
    ) -> None:
        super().__init__(fill=fill, p=p)
        if not isinstance(severity, int) or not 1 <= severity <= 10:
            raise ValueError(f"AugMix severity (m) must be an integer in 1..10, got {severity!r}.")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"AugMix width (w) must be an integer >= 1, got {width!r}.")
        if not isinstance(depth, int) or not (depth == -1 or depth >= 1):
            raise ValueError(f"AugMix depth (d) must be -1 (1-3 per chain) or an integer >= 1, got {depth!r}.")
        if not alpha > 0:
            raise ValueError(f"AugMix alpha (a) must be > 0, got {alpha!r}.")
        self.severity, self.width, self.depth, self.alpha = severity, width, depth, float(alpha)

    def _augment(self, image: torch.Tensor, fill: list[float] | None) -> torch.Tensor:
        op = v2.AugMix(
            severity=self.severity,
            mixture_width=self.width,
            chain_depth=self.depth,
            alpha=self.alpha,
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=fill,  # type: ignore[arg-type]
        )
        return op(image)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments written by ``A.save`` / ``A.to_dict``."""
        return ("severity", "width", "depth", "alpha", "fill")


def is_auto_augment(spec: str) -> bool:
    """Whether ``spec`` names an automatic augmentation policy (a preset name or a timm-style string).

    Example:
        >>> is_auto_augment("rand-m7-n3"), is_auto_augment("augmix"), is_auto_augment("default")
        (True, True, False)
    """
    return spec in AUTO_AUGMENT_PRESETS or spec.split("-", 1)[0] in _KEYS


def auto_augment_step(spec: str, fill: Sequence[float] | None = None) -> _TorchvisionPolicy:
    """The albumentations step of an automatic augmentation string (see the module docstring for the keys).

    Args:
        spec: ``"randaugment"``, ``"trivialaugment"``, ``"augmix"``, or a timm-style ``"rand-m9-n2-mstd0.5"`` /
            ``"augmix-m3-w3-d2-a1"``.
        fill: Fill of uncovered pixels in ``[0, 1]`` units (``None``: black).

    Returns:
        The step (applied with probability 1).

    Raises:
        ConfigError: Unknown policy or key, or a value out of range, naming the allowed keys.

    Example:
        >>> step = auto_augment_step("rand-m7-n3-mstd0.5")
        >>> step.num_ops, step.magnitude, step.magnitude_std
        (3, 7.0, 0.5)
    """
    if spec == "trivialaugment":
        return TrivialAugmentWide(fill=fill)
    if spec == "randaugment":
        return RandAugment(**_RANDAUGMENT_PRESET, fill=fill)  # type: ignore[arg-type]
    prefix, _, rest = spec.partition("-")
    if prefix not in _KEYS or (spec not in AUTO_AUGMENT_PRESETS and not rest):
        raise ConfigError(
            f"Unknown automatic augmentation {spec!r}; use randaugment, trivialaugment, augmix, or a timm-style "
            "string such as rand-m9-n2-mstd0.5 or augmix-m3-w3-a1."
        )
    options = _parse_keys(spec, prefix, rest)
    try:
        if prefix == "rand":
            return RandAugment(**options, fill=fill)
        return AugMix(**options, fill=fill)
    except ValueError as error:
        raise ConfigError(f"augment {spec!r}: {error}") from None


def _parse_keys(spec: str, prefix: str, rest: str) -> dict[str, Any]:
    keys = _KEYS[prefix]
    allowed = ", ".join(f"{key} ({name})" for key, name in keys.items())
    options: dict[str, Any] = {}
    for piece in filter(None, rest.split("-")):
        match = _KEY_PATTERN.fullmatch(piece)
        if match is None or match.group(1) not in keys:
            raise ConfigError(
                f"augment {spec!r}: unknown key {piece!r}; {_PRESET_OF_PREFIX[prefix]} takes {allowed} "
                f"(e.g. {'rand-m9-n2-mstd0.5' if prefix == 'rand' else 'augmix-m3-w3-a1'}). timm's inc/p/w0 keys "
                "are not supported: cvft runs torchvision's operation set."
            )
        name, text = keys[match.group(1)], match.group(2)
        value = float(text)
        if name in _INTEGER_KEYS:
            if not value.is_integer():
                raise ConfigError(f"augment {spec!r}: {match.group(1)} ({name}) must be an integer, got {text}.")
            value = int(value)
        options[name] = value
    return options
