"""RandAugment / TrivialAugment / AugMix presets and random erasing: torchvision's and timm's algorithms, exactly, and
reproducible under the pipeline's seed."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from timm.data.random_erasing import RandomErasing as TimmRandomErasing
from torchvision.transforms import v2

from cvft.data.auto_augment import AugMix, RandAugment, TrivialAugmentWide, auto_augment_step
from cvft.data.random_erasing import RandomErasing
from cvft.data.transforms import build_transforms, check_augment
from cvft.errors import ConfigError

POLICIES = ("randaugment", "trivialaugment", "augmix", "rand-m7-n3-mstd0.5", "augmix-m5-w4-d2")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _photo(channels: int = 3, seed: int = 0) -> np.ndarray:
    """A 48 x 40 image with structure (gradients and a bright square) so every operation changes something."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :40]
    base = np.stack([(xx * 6) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=2).astype(np.uint8)
    base[10:30, 12:28] = 230
    base = (base + rng.integers(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    return base[:, :, :channels] if channels == 3 else base.mean(axis=2, keepdims=True).astype(np.uint8)


def _outputs(preset: str, seed: int, channels: int = 3, count: int = 6, **options) -> list[torch.Tensor]:
    mean, std = (MEAN, STD) if channels == 3 else ((0.5,), (0.25,))
    pipeline = build_transforms(32, mean, std, train=True, preset=preset, seed=seed, **options)
    return [pipeline(image=_photo(channels, i))["image"] for i in range(count)]


@pytest.mark.parametrize("preset", POLICIES)
@pytest.mark.parametrize("channels", [3, 1])
def test_policy_presets_give_the_tensor_and_change_the_images(preset, channels):
    outputs = _outputs(preset, seed=0, channels=channels)
    assert all(out.shape == (channels, 32, 32) and out.dtype == torch.float32 for out in outputs)
    # the crop and flip draw the same numbers from the pipeline's generator in both: what differs is the policy
    default = _outputs("default", seed=0, channels=channels)
    assert sum(not torch.equal(a, b) for a, b in zip(outputs, default, strict=True)) >= 4


@pytest.mark.parametrize("preset", POLICIES)
def test_policy_presets_repeat_under_their_seed_and_differ_under_another(preset):
    first, again, other = _outputs(preset, 0), _outputs(preset, 0), _outputs(preset, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(not torch.equal(a, b) for a, b in zip(first, other, strict=True)) >= 5
    # a DataLoader worker reseeds the pipeline (seed_worker -> set_random_seed): same seed, same images
    pipeline = build_transforms(32, MEAN, STD, train=True, preset=preset, seed=123)
    pipeline.set_random_seed(0)
    assert torch.equal(pipeline(image=_photo(3, 0))["image"], first[0])


def test_a_policy_leaves_torch_global_random_state_alone():
    pipeline = build_transforms(32, MEAN, STD, train=True, preset="augmix", seed=0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    pipeline(image=_photo())
    assert torch.equal(torch.rand(3), expected)


def _as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("magnitude", [0, 10])
@pytest.mark.parametrize("seed", range(6))
def test_randaugment_magnitude_is_timms_0_to_10_scale_over_torchvisions_operations(magnitude, seed):
    """timm's m10 is each operation's largest change: torchvision's last bin; m0 its first."""
    image = _photo()
    ours = RandAugment(num_ops=2, magnitude=magnitude, magnitude_std=0.0, p=1.0).apply(image, torch_seed=seed)
    torch.manual_seed(seed)
    bins = 31
    reference = v2.RandAugment(num_ops=2, magnitude=magnitude * (bins - 1) // 10, num_magnitude_bins=bins,
                               interpolation=v2.InterpolationMode.BILINEAR)(_as_tensor(image))  # fmt: skip
    assert np.array_equal(ours, reference.permute(1, 2, 0).numpy())


def test_randaugment_draws_each_operations_magnitude_from_normal_m_mstd_clipped():
    """timm: magnitude ~ N(m, mstd) per operation, clipped to [0, mmax]; bin round(10 * magnitude) of 101."""
    image = _photo()
    for seed in range(4):
        ours = RandAugment(num_ops=2, magnitude=6, magnitude_std=3.0, magnitude_max=8, p=1.0).apply(
            image, torch_seed=seed
        )
        torch.manual_seed(seed)
        tensor = _as_tensor(image)
        for _ in range(2):
            drawn = min(max(6 + float(torch.randn(())) * 3.0, 0.0), 8.0)
            op = v2.RandAugment(num_ops=1, magnitude=round(drawn * 10), num_magnitude_bins=101,
                                interpolation=v2.InterpolationMode.BILINEAR)  # fmt: skip
            tensor = op(tensor)
        assert np.array_equal(ours, tensor.permute(1, 2, 0).numpy())


@pytest.mark.parametrize(
    ("step", "reference"),
    [
        (TrivialAugmentWide(p=1.0), v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)),
        (
            AugMix(severity=5, width=4, depth=2, alpha=0.5, p=1.0),
            v2.AugMix(
                severity=5, mixture_width=4, chain_depth=2, alpha=0.5, interpolation=v2.InterpolationMode.BILINEAR
            ),
        ),  # fmt: skip
    ],
    ids=["trivialaugment", "augmix"],
)
def test_trivialaugment_and_augmix_are_torchvisions(step, reference):
    image = _photo()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference(_as_tensor(image)).permute(1, 2, 0).numpy()
        assert np.array_equal(step.apply(image, torch_seed=seed), expected)


def test_policies_take_float_images_in_0_1_and_keep_their_dtype():
    image = _photo().astype(np.float32) / 255
    for step in (auto_augment_step("randaugment"), auto_augment_step("trivialaugment"), auto_augment_step("augmix")):
        step.set_random_seed(0)
        out = step(image=image)["image"]
        assert out.dtype == np.float32 and out.shape == image.shape and out.min() >= 0 and out.max() <= 1


def test_policy_strings_follow_timms_spelling():
    step = auto_augment_step("rand-m7-n3-mstd0.5-mmax9")
    assert (step.num_ops, step.magnitude, step.magnitude_std, step.magnitude_max) == (3, 7.0, 0.5, 9.0)
    assert auto_augment_step("rand-m9").magnitude_std == 0.0  # timm: no noise unless mstd is given
    preset = auto_augment_step("randaugment")
    assert (preset.num_ops, preset.magnitude, preset.magnitude_std) == (2, 9.0, 0.5)
    mix = auto_augment_step("augmix-m5-w4-d2-a0.5")
    assert (mix.severity, mix.width, mix.depth, mix.alpha) == (5, 4, 2, 0.5)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("rand-m9-inc1", "unknown key 'inc1'"),
        ("rand-m11", "magnitude (m) must lie in [0, mmax]"),
        ("rand-n2.5", "n (num_ops) must be an integer"),
        ("augmix-m0", "severity (m) must be an integer in 1..10"),
        ("randaugmnet", "Unknown augment preset 'randaugmnet'"),
    ],
)
def test_bad_policy_strings_are_refused_naming_the_fix(spec, expected):
    with pytest.raises(ConfigError) as error:
        check_augment(spec)
    assert expected in str(error.value)


# --- random erasing ----------------------------------------------------------------------------------------------


def _erased_box(erased: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero((erased == 0).all(axis=2))
    top, left = int(rows.min()), int(cols.min())
    height, width = int(rows.max()) - top + 1, int(cols.max()) - left + 1
    assert len(rows) == height * width  # one filled rectangle
    return top, left, height, width


@pytest.mark.parametrize("seed", range(8))
def test_random_erasing_draws_the_box_of_timms_algorithm(seed):
    """Same random draws as timm's RandomErasing (probability, area, log-aspect, top, left): the same box."""
    height, width = 40, 56
    random.seed(seed)
    reference = torch.ones(3, height, width)
    TimmRandomErasing(probability=1.0, mode="const", device="cpu")(reference)
    step = RandomErasing(mode="const", p=1.0)
    step.set_random_seed(0)
    step.py_random = random.Random(seed)
    step.py_random.random()  # timm draws the probability even at 1.0
    ours = step(image=np.ones((height, width, 3), np.float32))["image"]
    assert np.array_equal(ours, reference.permute(1, 2, 0).numpy())
    _, _, box_h, box_w = _erased_box(ours)
    assert 0.02 * height * width - box_h - box_w <= box_h * box_w <= height * width / 3 + box_h + box_w
    assert 0.3 - 0.1 <= box_h / box_w <= 1 / 0.3 + 0.5


def test_random_erasing_pixel_mode_fills_with_standard_normal_noise():
    step = RandomErasing(mode="pixel", p=1.0)
    step.set_random_seed(0)
    values = []
    for _ in range(30):
        image = np.full((64, 64, 3), 7.0, np.float32)
        erased = step(image=image)["image"]
        values.append(erased[erased != 7.0])
    noise = np.concatenate(values)
    assert noise.size > 30 * 0.02 * 64 * 64 * 3
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_random_erasing_probability_and_place_after_normalisation():
    white = np.full((40, 40, 3), 255, np.uint8)
    never = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=True, preset="light", seed=0, random_erasing=0.0)
    assert all(bool((never(image=white)["image"] == 1).all()) for _ in range(20))
    half = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=True, preset="light", seed=0, random_erasing=0.5,
                            random_erasing_mode="const")  # fmt: skip
    outputs = [half(image=white)["image"] for _ in range(200)]
    erased = [out for out in outputs if not bool((out == 1).all())]
    assert 70 <= len(erased) <= 130  # binomial(200, 0.5): 5 standard deviations
    # after Normalize: the box holds 0, the normalised mean colour, and the rest is white's normalised value 1
    assert all(set(torch.unique(out).tolist()) == {0.0, 1.0} for out in erased)


def test_random_erasing_refuses_uint8_images_before_normalisation():
    step = RandomErasing(p=1.0)
    step.set_random_seed(0)
    with pytest.raises(ValueError, match="after Normalize"):
        step(image=np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize(("value", "mode"), [(1.5, "pixel"), (-0.1, "pixel"), (0.25, "zeros")])
def test_bad_random_erasing_options_are_refused(value, mode):
    with pytest.raises(ConfigError, match="random_erasing"):
        check_augment("default", value, mode)


def test_random_erasing_area_fraction_stays_in_timms_range():
    step = RandomErasing(mode="const", p=1.0)
    step.set_random_seed(3)
    fractions = []
    for _ in range(100):
        erased = step(image=np.ones((50, 50, 1), np.float32))["image"]
        fractions.append(float((erased == 0).mean()))
    assert min(fractions) >= 0.02 * 0.8 and max(fractions) <= 1 / 3 * 1.2
    assert math.isclose(np.mean(fractions), (0.02 + 1 / 3) / 2, abs_tol=0.05)
