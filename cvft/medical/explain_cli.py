"""``cvft explain``: heat maps of what a trained classifier looks at, one PNG per image.

The checkpoint's own preprocessing is used (its data module's image size, normalisation and, for medical data,
reader options such as the CT window); DICOM, NIfTI, 16-bit PNG / TIFF and ordinary images are read::

    cvft explain --ckpt_path runs/cvft/version_0/checkpoints/best.ckpt --images a.png b.dcm --out explanations/
    cvft explain --adapter adapter.safetensors --weights base.safetensors --images scan.nii.gz --method gradcam
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cvft.checkpoints import load_checkpoint, load_module, weights_from_checkpoint
from cvft.errors import CvftError
from cvft.medical.explain.images import METHODS, Preprocessing, explain_images
from cvft.tasks import ImageClassifier

__all__ = ["load_explained_model", "main"]


def load_explained_model(
    ckpt_path: str | None = None, adapter: str | None = None, weights: str | None = None, pretrained: bool = False
) -> tuple[ImageClassifier, dict[str, Any]]:
    """The classifier of a checkpoint (or adapter) in eval mode, and its data module's hyperparameters (or ``{}``).

    Example:
        >>> load_explained_model()
        Traceback (most recent call last):
        ...
        cvft.errors.CvftError: Pass a checkpoint (--ckpt_path) or an adapter (--adapter) to explain.
    """
    if ckpt_path:
        checkpoint = load_checkpoint(ckpt_path, require_lightning=True)
        with weights_from_checkpoint():
            model = load_module(ImageClassifier, checkpoint, pretrained=False, weights=None)
        return model.eval(), dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if adapter:
        return ImageClassifier.from_adapter(adapter, pretrained=pretrained, weights=weights).eval(), {}
    raise CvftError("Pass a checkpoint (--ckpt_path) or an adapter (--adapter) to explain.")


def _window(text: str | None) -> str | tuple[float, float] | None:
    if text is None or "," not in text:
        return text
    try:
        center, width = (float(part) for part in text.split(","))
    except ValueError:
        raise CvftError(f"--window {text!r}: give a preset name or 'center,width' (e.g. -600,1500).") from None
    return center, width


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cvft explain``."""
    parser = argparse.ArgumentParser(prog="cvft explain", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", "--ckpt", help="Lightning checkpoint written by `cvft fit`")
    source.add_argument("--adapter", help="adapter .safetensors written by `cvft fit` (needs the base weights)")
    parser.add_argument("--weights", help="base weights file or built-in source, for --adapter")
    parser.add_argument("--pretrained", action="store_true", help="base weights from the hub, for --adapter")
    parser.add_argument("--images", nargs="+", required=True, help="image files (DICOM, NIfTI, PNG, JPEG, TIFF)")
    parser.add_argument("--method", choices=METHODS, default="auto", help="auto: rollout for ViTs, else Grad-CAM")
    parser.add_argument("--out", default="explanations", help="output folder (default: explanations/)")
    parser.add_argument("--target_class", help="class to explain, by name or index (default: the predicted one)")
    parser.add_argument("--window", help="CT window: a preset (lung, bone ...) or 'center,width'")
    parser.add_argument("--image_size", type=int, help="input size (default: the checkpoint's)")
    parser.add_argument("--alpha", type=float, default=0.45, help="heat-map opacity in the overlay")
    args = parser.parse_args(argv)

    model, data_hparams = load_explained_model(args.ckpt_path, args.adapter, args.weights, args.pretrained)
    if args.image_size:
        data_hparams["image_size"] = args.image_size
    if args.window is not None:
        data_hparams["window"] = _window(args.window)
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:
        raise CvftError(f"Image file(s) not found: {', '.join(missing)}. Check the --images paths.")
    written = explain_images(
        model,
        args.images,
        method=args.method,
        out_dir=args.out,
        preprocessing=Preprocessing.for_model(model, data_hparams),
        target_class=_class_index(args.target_class, model.class_names),
        alpha=args.alpha,
    )
    for path in written:
        print(f"wrote {path}")
    return 0


def _class_index(target: str | None, class_names: list[str]) -> int | None:
    if target is None:
        return None
    if target in class_names:
        return class_names.index(target)
    if target.isdigit() and int(target) < len(class_names):
        return int(target)
    raise CvftError(f"Unknown --target_class {target!r}; choose one of {', '.join(class_names)} or an index.")
