"""Write a small real-image classification folder (one sub-folder per class) for demos and tests.

Usage:
    python datasets/make_image_folder.py digits data/digits --limit-per-class 100
    python datasets/make_image_folder.py skimage data/textures --image-size 64
    python datasets/make_image_folder.py fashion-mnist data/fashion --limit-per-class 500

See datasets/README.md for each source and its licence.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from cvft.data.demo import DEMO_SOURCES, write_demo_image_folder
from cvft.errors import DatasetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=DEMO_SOURCES, help="where the images come from")
    parser.add_argument("out", type=Path, help="output folder (absent or empty)")
    parser.add_argument("--limit-per-class", type=int, default=None, help="keep at most N images per class")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing / cropping images")
    parser.add_argument("--image-size", type=int, default=None, help="side length in pixels")
    args = parser.parse_args(argv)
    try:
        out = write_demo_image_folder(args.source, args.out, args.limit_per_class, args.seed, args.image_size)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = Counter(p.parent.name for p in out.glob("*/*.png"))
    print(f"{out}: {sum(counts.values())} images in {len(counts)} classes ({', '.join(sorted(counts))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
