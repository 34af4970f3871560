"""Write the generated shapes object detection set (COCO json, YOLO labels and data.yaml) for demos and tests.

Usage:
    python datasets/make_detection_shapes.py data/shapes_detection
    python datasets/make_detection_shapes.py data/shapes_small --num-images 64 --image-size 96 --seed 1

See datasets/README.md for the layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cvft.data.detection import write_shapes_detection
from cvft.errors import DatasetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (absent or empty)")
    parser.add_argument("--num-images", type=int, default=400, help="number of images")
    parser.add_argument("--image-size", type=int, default=128, help="image width in pixels (height: same or 3/4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of backgrounds, shapes and the train/val split")
    parser.add_argument(
        "--category-ids", default="3,7,11", help="COCO ids of circle,square,triangle (ascending, comma-separated)"
    )
    parser.add_argument("--empty-fraction", type=float, default=0.1, help="share of images without any shape")
    args = parser.parse_args(argv)
    try:
        ids = [int(part) for part in args.category_ids.split(",")]
    except ValueError:
        print(f"error: --category-ids must be integers separated by commas, got {args.category_ids!r}", file=sys.stderr)
        return 2
    try:
        out = write_shapes_detection(
            args.out, args.num_images, args.image_size, args.seed, ids, empty_fraction=args.empty_fraction
        )
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    coco = json.loads((out / "annotations.json").read_text())
    splits = {split: len((out / f"{split}.txt").read_text().split()) for split in ("train", "val")}
    print(
        f"{out}: {len(coco['images'])} images ({splits['train']} train, {splits['val']} val), "
        f"{len(coco['annotations'])} boxes of {', '.join(c['name'] for c in coco['categories'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
