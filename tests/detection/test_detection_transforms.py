from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from cvft.data.detection import build_detection_transforms

RED, GREEN = 0, 1  # label = the channel the shape's colour is strong in


def _scene(width: int = 120, height: int = 80) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grey image with a red square and a green rectangle; their exact boxes and labels (0: red, 1: green)."""
    image = np.full((height, width, 3), 90, np.uint8)
    boxes = np.array([[10, 20, 40, 50], [width - 30, 10, width, 30]], np.float32)  # green touches the right edge
    for label, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        image[y0:y1, x0:x1] = (30, 30, 30)
        image[y0:y1, x0:x1, label] = 230
    return image, boxes, np.array([RED, GREEN], np.int64)


def _shape_box(image: np.ndarray, channel: int) -> np.ndarray | None:
    """Tight box of the pixels whose ``channel`` clearly dominates (the shape), or None when none is visible."""
    others = np.delete(image.astype(int), channel, axis=-1).max(-1)
    ys, xs = np.nonzero(image[..., channel].astype(int) - others > 80)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _run(pipeline: A.Compose, seed: int, scene=None) -> dict:
    image, boxes, labels = scene or _scene()
    pipeline.set_random_seed(seed)
    return pipeline(image=image, bboxes=boxes, labels=labels)


def _flip_probability(pipeline: A.Compose, p: float) -> A.Compose:
    flips = [t for t in pipeline.transforms if isinstance(t, A.HorizontalFlip)]
    assert len(flips) == 1
    flips[0].p = p
    return pipeline


def _assert_boxes_cover_shapes(out: dict, tolerance: float = 1.5) -> None:
    for box, label in zip(out["bboxes"], out["labels"], strict=True):
        found = _shape_box(out["image"], int(label))
        assert found is not None, f"label {label} kept but its shape is not in the image"
        np.testing.assert_allclose(box, found, atol=tolerance)


def test_eval_letterbox_scales_boxes_without_offset():
    out = _run(build_detection_transforms(96, train=False), seed=0)
    assert out["image"].shape == (96, 96, 3)
    _, boxes, _ = _scene()
    np.testing.assert_allclose(out["bboxes"], boxes * 0.8, atol=1e-4)  # 120 px -> 96 px, padding bottom only
    assert (out["image"][64:] == 0).all() and (out["image"][:64] > 0).all()
    _assert_boxes_cover_shapes(out, tolerance=1.0)


@pytest.mark.parametrize("seed", range(6))
def test_forced_flip_mirrors_boxes_and_they_still_cover_their_shapes(seed):
    flipped = _run(_flip_probability(build_detection_transforms(96, train=True, min_visibility=0.0), 1.0), seed)
    straight = _run(_flip_probability(build_detection_transforms(96, train=True, min_visibility=0.0), 0.0), seed)
    _assert_boxes_cover_shapes(flipped)
    _assert_boxes_cover_shapes(straight)
    np.testing.assert_array_equal(flipped["labels"], straight["labels"])  # same scale and crop, only mirrored
    mirrored = straight["bboxes"].copy()
    mirrored[:, [0, 2]] = 96 - straight["bboxes"][:, [2, 0]]
    np.testing.assert_allclose(flipped["bboxes"], mirrored, atol=1e-3)
    assert not np.array_equal(flipped["image"], straight["image"])


def test_scale_and_crop_keep_boxes_on_their_shapes_and_drop_those_below_min_visibility():
    min_visibility = 0.5
    pipeline = build_detection_transforms(64, train=True, augment="default", min_visibility=min_visibility)
    pipeline.save_applied_params = True
    scene = _scene(160, 60)
    outcomes = set()
    for seed in range(40):
        out = _run(pipeline, seed, scene)
        _assert_boxes_cover_shapes(out, tolerance=2.0)
        params = dict(reversed(out["applied_transforms"]))  # first of each name: the fit, not the final letterbox
        scaled = params["RandomCrop"]["shape"]  # image size after fit + random scale
        fitted = params["RandomScale"]["shape"]
        crop = params["RandomCrop"]["crop_coords"]
        scale = params["LongestMaxSize"]["scale"] * np.array([scaled[1] / fitted[1], scaled[0] / fitted[0]] * 2)
        for box, label in zip(scene[1], scene[2], strict=True):
            full = box * scale
            x0, y0 = max(full[0], crop[0]), max(full[1], crop[1])
            x1, y1 = min(full[2], crop[2]), min(full[3], crop[3])
            visible = max(0.0, x1 - x0) * max(0.0, y1 - y0) / ((full[2] - full[0]) * (full[3] - full[1]))
            if abs(visible - min_visibility) < 0.05:
                continue  # too close to call with rounded image sizes
            kept = label in out["labels"]
            assert kept == (visible >= min_visibility), (seed, label, visible)
            outcomes.add(("kept" if kept else "dropped", visible < 1.0))
    assert {("dropped", True), ("kept", True), ("kept", False)} <= outcomes  # partial keeps and drops both seen


def test_images_without_boxes_pass_through_every_pipeline():
    image = np.zeros((40, 70, 3), np.uint8)
    for train, augment in [(False, "none"), (True, "none"), (True, "default"), (True, "strong")]:
        out = build_detection_transforms(64, train=train, augment=augment, seed=0)(
            image=image, bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64)
        )
        assert out["image"].shape == (64, 64, 3)
        assert np.asarray(out["bboxes"]).reshape(-1, 4).shape == (0, 4)


def test_keep_ratio_false_stretches_and_bad_options_are_refused():
    out = _run(build_detection_transforms(60, train=False, keep_ratio=False), seed=0)
    _, boxes, _ = _scene()
    np.testing.assert_allclose(out["bboxes"], boxes * [0.5, 0.75, 0.5, 0.75], atol=1e-4)
    with pytest.raises(ValueError, match="augment"):
        build_detection_transforms(64, train=True, augment="heavy")
    with pytest.raises(ValueError, match="min_visibility"):
        build_detection_transforms(64, train=True, min_visibility=1.5)
